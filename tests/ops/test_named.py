"""Named adapters: each equals its own model and PEFT, disable, training one, files, errors."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import TinyOptModule, snapshot, trainer_kwargs
from helpers.models import TINY_MODELS, model_inputs, run, tiny_opt
from helpers.named import NAMES, multi_adapter_model, named_config, randomize_named

from vera_lightning import (
    VeraCallback,
    VeraConfig,
    add_adapter,
    apply_vera,
    delete_adapter,
    disable_adapter,
    find_adapter,
    load_adapter,
    merge_vera,
    save_adapter,
    set_adapter,
    unmerge_vera,
)
from vera_lightning.core.lookup import vera_layers

pytestmark = pytest.mark.numerics

def _alone(pristine, kind, values, **fields):
    """A separately adapted model with the given λ's."""
    model = apply_vera(copy.deepcopy(pristine), named_config(kind, **fields))
    with torch.no_grad():
        for layer_name, layer in vera_layers(model):
            layer.vera_lambda_b.copy_(values[layer_name][0])
            layer.vera_lambda_d.copy_(values[layer_name][1])
    return model


def _lambdas_of(model, name):
    adapter = find_adapter(model)
    return {f"{n}.{a}": getattr(layer, a).detach().clone() for n, layer in vera_layers(model)
            for a in adapter.lambda_names(name)}


@pytest.mark.parametrize("kind", ["opt", "gpt2", "bert", "llama", "mlp"])
def test_each_named_adapter_equals_its_own_model(kind):
    pristine, model, values = multi_adapter_model(kind)
    inputs = model_inputs(kind)
    outputs = []
    for name in NAMES:
        set_adapter(model, name)
        alone = _alone(pristine, kind, values[name])
        with torch.no_grad():
            outputs.append(run(model, kind, inputs))
            assert torch.equal(outputs[-1], run(alone, kind, inputs)), name
        # with autograd recording (the lean path): same outputs and the same λ-gradients
        out, ref = run(model, kind, inputs), run(alone, kind, inputs)
        assert torch.equal(out, ref)
        out.square().mean().backward()
        ref.square().mean().backward()
        for (layer_name, layer), (_, lone) in zip(vera_layers(model), vera_layers(alone)):
            for mine, theirs in zip(layer.lambdas(), lone.lambdas()):
                assert torch.equal(mine.grad, theirs.grad), (name, layer_name)
        model.zero_grad(set_to_none=True)
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


@pytest.mark.parametrize("kind", ["opt", "bert"])
def test_named_adapters_match_peft_multi_adapter(kind):
    import peft

    pristine, model, values = multi_adapter_model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fields = {"r": 8, "target_modules": TINY_MODELS[kind][1], "init_weights": False}
        theirs = peft.get_peft_model(copy.deepcopy(pristine), peft.VeraConfig(**fields))
        for name in NAMES[1:]:
            theirs.add_adapter(name, peft.VeraConfig(**fields))
    with torch.no_grad():
        for name in NAMES:
            for layer_name, (lam_b, lam_d) in values[name].items():
                layer = theirs.base_model.model.get_submodule(layer_name)
                layer.vera_lambda_b[name].copy_(lam_b)
                layer.vera_lambda_d[name].copy_(lam_d)
        for name in NAMES:
            set_adapter(model, name)
            theirs.set_adapter(name)
            a, b = run(model, kind), run(theirs, kind)
            assert (a - b).abs().max().item() <= 1e-6 * max(1.0, b.abs().max().item()), name


def test_bfloat16_model_named_adapter_equals_its_own_model():
    torch.manual_seed(0)
    pristine = tiny_opt().to(torch.bfloat16)
    model = apply_vera(copy.deepcopy(pristine), named_config("opt"))
    add_adapter(model, "task_c", named_config("opt"))
    values = randomize_named(model, "task_c", seed=3)
    set_adapter(model, "task_c")
    alone = _alone(pristine, "opt", values)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "vera_lambda" in n)
    with torch.no_grad():
        assert torch.equal(run(model, "opt"), run(alone, "opt"))


@pytest.mark.parametrize("kind", ["opt", "gpt2", "bert"])
def test_disable_adapter_is_the_base_model_exactly(kind):
    pristine, model, _ = multi_adapter_model(kind)
    inputs = model_inputs(kind)
    with torch.no_grad():
        base = run(pristine, kind, inputs)
        for name in NAMES:
            set_adapter(model, name)
            adapted = run(model, kind, inputs)
            with disable_adapter(model) as same:
                assert same is model
                assert torch.equal(run(model, kind, inputs), base)
            assert torch.equal(run(model, kind, inputs), adapted) and not torch.equal(adapted, base)
    with disable_adapter(model):  # with autograd recording too
        assert torch.equal(run(model, kind, inputs), base)


def test_disable_adapter_refuses_merged_layers_and_nesting():
    _, model, _ = multi_adapter_model("opt")
    merge_vera(model)
    with pytest.raises(ValueError, match=r"disable_adapter: layers .* are merged .*unmerge_vera"):
        with disable_adapter(model):
            pass
    unmerge_vera(model)
    with disable_adapter(model):
        with pytest.raises(ValueError, match="cannot be opened while another"):
            with disable_adapter(model):
                pass
    assert find_adapter(model).forced_path is None


def test_training_one_adapter_leaves_the_others_bit_identical():
    _, model, _ = multi_adapter_model("opt")
    model.train()
    set_adapter(model, "task_b")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(f"{n}.{a}" for n, _ in vera_layers(model)
                      for a in ("vera_lambda_b_task_b", "vera_lambda_d_task_b"))
    assert trainable == expected
    before = snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = model_inputs("opt")["input_ids"]
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == expected


def test_lightning_trains_the_active_named_adapter(tmp_path):
    module = TinyOptModule()
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj"])
    apply_vera(module, config)
    add_adapter(module, "task_b", config)
    set_adapter(module, "task_b")
    before = snapshot(module)
    trainer = pl.Trainer(max_steps=3, callbacks=[VeraCallback()], **trainer_kwargs(tmp_path))
    trainer.fit(module)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("_b_task_b", "_d_task_b")) for k in changed)
    assert find_adapter(module).active == "task_b"


def test_state_dict_layout_and_reload():
    _, model, values = multi_adapter_model("opt", names=("default", "task_b"))
    keys = [k for k in model.state_dict() if "vera" in k]
    layer = "model.decoder.layers.0.self_attn.q_proj"
    assert {f"{layer}.vera_lambda_b", f"{layer}.vera_lambda_d", f"{layer}.vera_lambda_b_task_b",
            f"{layer}.vera_lambda_d_task_b"} <= set(keys)
    assert {"vera_projections.vera_A", "vera_projections.vera_B"} <= set(keys)
    assert len(keys) == 2 + 4 * 4
    torch.manual_seed(0)
    fresh = apply_vera(tiny_opt(), named_config("opt"))
    add_adapter(fresh, "task_b", named_config("opt"))
    fresh.load_state_dict(model.state_dict())
    set_adapter(fresh, "task_b")
    set_adapter(model, "task_b")
    with torch.no_grad():
        assert torch.equal(run(fresh, "opt"), run(model, "opt"))


def test_primary_adapter_with_another_name_keeps_the_layout(tmp_path):
    torch.manual_seed(0)
    pristine = tiny_opt()
    model = apply_vera(copy.deepcopy(pristine), named_config("opt"), adapter_name="task_a")
    assert find_adapter(model).names == ["task_a"] and find_adapter(model).active == "task_a"
    assert "model.decoder.layers.0.self_attn.q_proj.vera_lambda_b" in model.state_dict()
    apply_vera(model, named_config("opt"), adapter_name="task_a")  # idempotent
    save_adapter(model, tmp_path / "a")
    other = load_adapter(copy.deepcopy(pristine), tmp_path / "a", adapter_name="task_a")
    assert find_adapter(other).names == ["task_a"]
    with torch.no_grad():
        assert torch.equal(run(other, "opt"), run(model, "opt"))


def test_delete_adapter_removes_its_lambdas():
    _, model, _ = multi_adapter_model("opt")
    delete_adapter(model, "task_b")
    assert find_adapter(model).names == ["default", "task_c"]
    assert not any("task_b" in k for k in model.state_dict())
    add_adapter(model, "task_b", named_config("opt"))  # the name is free again
    assert find_adapter(model).names == ["default", "task_c", "task_b"]


def test_active_adapter_dropout_follows_its_config():
    torch.manual_seed(0)
    model = apply_vera(tiny_opt(), named_config("opt"))
    add_adapter(model, "drop", named_config("opt", vera_dropout=0.25))
    layer = next(layer for _, layer in vera_layers(model))
    assert isinstance(layer.vera_dropout, torch.nn.Identity)
    set_adapter(model, "drop")
    assert isinstance(layer.vera_dropout, torch.nn.Dropout) and layer.vera_dropout.p == 0.25
    set_adapter(model, "default")
    assert isinstance(layer.vera_dropout, torch.nn.Identity)


# ---------------------------------------------------------------------- files
def test_ours_to_peft_several_named_adapters(tmp_path):
    import peft

    pristine, model, _ = multi_adapter_model("bert", modules_to_save=None)
    save_adapter(model, tmp_path / "root", adapter_name="default")
    for name in NAMES[1:]:
        save_adapter(model, tmp_path / "root" / name, adapter_name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "root"))
        for name in NAMES[1:]:
            theirs.load_adapter(str(tmp_path / "root" / name), adapter_name=name)
    with torch.no_grad():
        outputs = set()
        for name in NAMES:
            set_adapter(model, name)
            theirs.set_adapter(name)
            a, b = run(model, "bert"), run(theirs, "bert")
            assert (a - b).abs().max().item() <= 1e-6, name
            outputs.add(tuple(a.flatten().tolist()))
    assert len(outputs) == 3


def test_peft_to_ours_reads_save_pretrained_subfolders(tmp_path):
    import peft

    torch.manual_seed(0)
    pristine = tiny_opt()
    fields = {"r": 8, "target_modules": ["q_proj", "v_proj"], "init_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(pristine), peft.VeraConfig(**fields))
        theirs.add_adapter("task_b", peft.VeraConfig(**fields))
        theirs.add_adapter("task_c", peft.VeraConfig(**fields))
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "task_b" / "adapter_config.json").is_file()
    ours = load_adapter(copy.deepcopy(pristine), tmp_path / "peft")
    for name in ("task_b", "task_c"):
        load_adapter(ours, tmp_path / "peft", adapter_name=name)
    assert find_adapter(ours).names == ["default", "task_b", "task_c"]
    with torch.no_grad():
        for name in ("default", "task_b", "task_c"):
            set_adapter(ours, name)
            theirs.set_adapter(name)
            assert (run(ours, "opt") - run(theirs, "opt")).abs().max().item() <= 1e-6, name


def test_load_into_existing_named_adapter_and_save_round_trip(tmp_path):
    pristine, model, _ = multi_adapter_model("opt")
    save_adapter(model, tmp_path / "c", adapter_name="task_c")
    expected = _lambdas_of(model, "task_c")
    randomize_named(model, "task_c", seed=99)
    load_adapter(model, tmp_path / "c", adapter_name="task_c")
    got = _lambdas_of(model, "task_c")
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    set_adapter(model, "task_c")
    save_adapter(model, tmp_path / "active")  # adapter_name=None: the active one
    other = load_adapter(copy.deepcopy(pristine), tmp_path / "active")
    with torch.no_grad():
        assert torch.equal(run(other, "opt"), run(model, "opt"))


# ---------------------------------------------------------------------- errors
def test_unknown_invalid_and_colliding_names():
    _, model, _ = multi_adapter_model("opt")
    before = snapshot(model)
    for call in (lambda: set_adapter(model, "nope"), lambda: delete_adapter(model, "nope"),
                 lambda: save_adapter(model, "/tmp/never-written", adapter_name="nope")):
        with pytest.raises(ValueError, match=r"no VeRA adapter named 'nope'; "
                                             r"the model holds \['default', 'task_b', 'task_c'\]"):
            call()
    with pytest.raises(ValueError, match="already holds an adapter named 'task_b'"):
        add_adapter(model, "task_b", named_config("opt"))
    with pytest.raises(ValueError, match=r"already carries VeRA adapters .*add_adapter\(model, 'other'"):
        apply_vera(model, named_config("opt"), adapter_name="other")
    for bad in ("", "a.b", "x/y", 3, "n" * 65):
        with pytest.raises(ValueError, match="adapter name .* is not valid"):
            add_adapter(model, bad, named_config("opt"))
    with pytest.raises(ValueError, match="'default' is the primary adapter .*unload_vera"):
        delete_adapter(model, "default")
    set_adapter(model, "task_b")
    with pytest.raises(ValueError, match="'task_b' is the active adapter; call set_adapter"):
        delete_adapter(model, "task_b")
    set_adapter(model, "default")
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_adapters_that_do_not_fit_are_refused_with_every_problem():
    _, model, _ = multi_adapter_model("opt")
    before = snapshot(model)
    bad = named_config("opt", r=16, projection_prng_key=3, target_modules=["q_proj"], bias="all")
    with pytest.raises(ValueError) as err:
        add_adapter(model, "bad", bad)
    text = str(err.value)
    assert "add_adapter('bad') refused, the model was not changed" in text
    assert "r=16: every adapter of a model shares the projections of the primary adapter 'default' (r=8)" in text
    assert "projection_prng_key=3" in text and "use projection_prng_key=0" in text
    assert "bias='all'" in text and "missing ['model.decoder.layers.0.self_attn.v_proj'" in text
    with pytest.raises(ValueError, match="modules_to_save=.*only the primary adapter"):
        add_adapter(model, "head", named_config("opt", modules_to_save=["lm_head"]))
    with pytest.raises(TypeError, match="expects a VeraConfig"):
        add_adapter(model, "x", {"r": 8})
    assert find_adapter(model).names == list(NAMES) and set(model.state_dict()) == set(before)


def test_set_adapter_refuses_while_merged():
    _, model, _ = multi_adapter_model("opt")
    merge_vera(model)
    with pytest.raises(ValueError, match=r"set_adapter: layers .* are merged \(their weights hold adapter 'default'"):
        set_adapter(model, "task_b")
    set_adapter(model, "default")  # no switch: fine
    unmerge_vera(model)
    set_adapter(model, "task_b")


def test_load_refuses_files_whose_projections_or_shapes_do_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    pristine, model, _ = multi_adapter_model("opt")
    save_adapter(model, tmp_path / "a", adapter_name="task_b")
    before = snapshot(model)
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] + 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="base_model.vera_A differs from the projections the model's adapters share"):
        load_adapter(model, tmp_path / "a", adapter_name="new")
    torch.manual_seed(0)
    bigger = apply_vera(tiny_opt(hidden=64), named_config("opt"))
    save_adapter(bigger, tmp_path / "big")
    with pytest.raises(ValueError,
                       match=r"(?s)load_adapter\(.*adapter_name='big'\) refused.*shape of base_model.vera_A"):
        load_adapter(model, tmp_path / "big", adapter_name="big")
    torch.manual_seed(0)
    other_r = apply_vera(tiny_opt(), named_config("opt", r=4))
    save_adapter(other_r, tmp_path / "r4")
    with pytest.raises(ValueError, match="r=4: every adapter of a model shares"):
        load_adapter(model, tmp_path / "r4", adapter_name="r4")
    assert find_adapter(model).names == list(NAMES)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"(?s)refused.*r: the adapter has r=4"):  # into the primary of a multi model
        load_adapter(model, tmp_path / "r4", adapter_name="default")


def test_merge_folds_the_active_named_adapter():
    _, model, _ = multi_adapter_model("opt")
    set_adapter(model, "task_b")
    weight = model.model.decoder.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        unmerged = run(model, "opt")
        merge_vera(model)
        merged = run(model, "opt")
        unmerge_vera(model)
        set_adapter(model, "default")
        other = run(model, "opt")
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert (merged - other).abs().max().item() > 1e-2
    assert (model.model.decoder.layers[0].self_attn.q_proj.weight - weight).abs().max().item() <= 1e-6


def test_slim_checkpoint_keeps_every_adapter_and_resumes(tmp_path):
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj"])

    def module_with_adapters():
        module = TinyOptModule()
        apply_vera(module, config)
        add_adapter(module, "task_b", config)
        return module

    module = module_with_adapters()
    pl.Trainer(max_steps=2, callbacks=[VeraCallback()], **trainer_kwargs(tmp_path)).fit(module)  # trains default
    set_adapter(module, "task_b")
    trainer = pl.Trainer(max_steps=2, callbacks=[VeraCallback()], **trainer_kwargs(tmp_path))
    trainer.fit(module)  # trains task_b; default's trained λ's are frozen now
    trainer.save_checkpoint(tmp_path / "slim.ckpt")
    state = torch.load(tmp_path / "slim.ckpt", weights_only=False)["state_dict"]
    layer = "model.model.decoder.layers.0.self_attn.q_proj"
    assert {f"{layer}.vera_lambda_b", f"{layer}.vera_lambda_b_task_b"} <= set(state)
    assert f"{layer}.weight" not in state  # still slim: the frozen base is dropped
    fresh = set_adapter(module_with_adapters(), "task_b")
    trainer = pl.Trainer(max_steps=2, callbacks=[VeraCallback()], **trainer_kwargs(tmp_path))
    trainer.fit(fresh, ckpt_path=tmp_path / "slim.ckpt")
    for name in ("default", "task_b"):
        mine, theirs = _lambdas_of(fresh, name), _lambdas_of(module, name)
        assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    key = f"{layer}.vera_lambda_d"
    assert not torch.equal(_lambdas_of(fresh, "default")[key], _lambdas_of(module_with_adapters(), "default")[key])
