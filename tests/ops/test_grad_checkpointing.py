"""Activation checkpointing (transformers' gradient_checkpointing_enable) on every autograd path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.models import tiny_bert, tiny_llama, tiny_opt

from vera_lightning import VeraConfig, apply_vera, record_paths, set_vera_path
from vera_lightning.core.lookup import vera_layers
from vera_lightning.ops.grad_checkpointing import enable_gradient_checkpointing, reentrant_checkpointing

pytestmark = pytest.mark.numerics

MODELS = {"opt": (tiny_opt, ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]),
          "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])}


def _adapted(kind, dropout=0.0):
    torch.manual_seed(0)
    build, targets = MODELS[kind]
    model = apply_vera(build(), VeraConfig(r=16, target_modules=targets, init_weights=False, vera_dropout=dropout))
    return model.train()


def _checkpointed(model, reentrant):
    gc = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return gc


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # same dropout masks in both models
    with record_paths() as seen:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return {f"{n}.{p}": getattr(l, p).grad.clone() for n, l in vera_layers(model)
            for p in ("vera_lambda_b", "vera_lambda_d")}, {p.value for p in seen.values()}


def _assert_same(grads, ref, exact=True):
    """Bit-identical, or (``exact=False``) within 1e-5 relative (norm) as float32 rounding allows."""
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        if exact:
            assert torch.equal(g, ref[name]), name
        else:
            assert ((g - ref[name]).norm() / ref[name].norm()).item() <= 1e-5, name
    assert all(g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("path,share,seq,expected", [
    ("lean", True, 7, {"lean"}), ("lean", False, 7, {"lean"}), ("save_h", True, 7, {"save_h"}),
    ("merged", True, 7, {"merged"}), ("merged", False, 7, {"merged"}), ("plain", False, 7, {"plain"}),
    ("auto", True, 7, None), ("auto", True, 48, None),
])
def test_checkpointing_keeps_lambda_gradients(kind, reentrant, path, share, seq, expected):
    ref = set_vera_path(_adapted(kind), path, share=share)
    gc = _checkpointed(ref, reentrant)
    ids = torch.randint(0, 96, (2, seq), generator=torch.Generator().manual_seed(3))
    for _pass in range(3):  # step 0 learns the sibling groups, later steps use them (merged: one node per group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reentrant + frozen embeddings: the guard fixes it and says so
            g_ref, paths_ref = _step(ref, ids)
            g_gc, paths_gc = _step(gc, ids)
        # Reentrant checkpointing runs the blocks first without grad, where a layer adds the low-rank
        # update to W0·x (PEFT's formula), then recomputes them with grad: on the merged path the next
        # block's input then differs from the uncheckpointed run by float32 rounding only.
        _assert_same(g_gc, g_ref, exact=not (reentrant and "merged" in paths_ref))
        assert paths_gc == paths_ref and (expected is None or paths_ref == expected)
    cache_ref, cache_gc = ref.vera_projections.siblings, gc.vera_projections.siblings
    if share and path != "plain":
        assert cache_gc.hits > 0 and cache_ref.hits > 0
    else:
        assert cache_gc.hits == cache_ref.hits == 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_with_dropout_replays_the_plain_path(reentrant):
    ref = _adapted("opt", dropout=0.2)
    gc = _checkpointed(ref, reentrant)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g_ref, paths = _step(ref, ids)
        g_gc, _ = _step(gc, ids)
    assert paths == {"plain"}
    _assert_same(g_gc, g_ref)


def test_merged_siblings_become_one_node_and_stay_one_under_checkpointing():
    ref = set_vera_path(_adapted("opt"), "merged")
    gc = _checkpointed(ref, reentrant=False)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))

    def merged_nodes(model):
        out = model(input_ids=ids, labels=ids).loss
        seen, stack, count = set(), [out.grad_fn], 0
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            count += type(node).__name__ == "MergedLinearBackward"
            stack += [n for n, _ in node.next_functions]
        out.backward()
        return count

    # first step: the leader (q) has not seen its siblings yet: q, k, v, fc1, fc2 alone per block
    assert merged_nodes(ref) == 2 * 5
    assert merged_nodes(ref) == 2 * 3  # then q/k/v in one node
    g_ref, _ = _step(ref, ids)
    for _ in range(2):
        g_gc, _ = _step(gc, ids)
    _assert_same(g_gc, g_ref)


def test_reentrant_checkpointing_on_frozen_base_still_trains_the_lambdas():
    """The classic pitfall: a trainable head keeps the loss differentiable, the adapter gets nothing."""
    torch.manual_seed(0)
    ref = apply_vera(tiny_bert(), VeraConfig(r=8, target_modules=["query", "value"], init_weights=False,
                                             modules_to_save=["classifier"])).train()
    gc = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    # transformers >= 5 enables input gradients itself for input_ids models; older versions (and models
    # checkpointed by hand) do not: recreate that state.
    gc.disable_input_require_grads()
    assert reentrant_checkpointing(gc)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1])
    ref(input_ids=ids, labels=labels).loss.backward()
    unguarded = copy.deepcopy(gc)
    unguarded._forward_pre_hooks.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "None of the inputs have requires_grad=True", easy to miss
        unguarded(input_ids=ids, labels=labels).loss.backward()  # the pitfall is real: no λ gradient
    assert all(l.vera_lambda_d.grad is None for _, l in vera_layers(unguarded))
    assert unguarded.classifier.weight.grad is not None
    with pytest.warns(UserWarning, match="enable_input_require_grads"):
        gc(input_ids=ids, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(vera_layers(gc), vera_layers(ref)):
        assert a.vera_lambda_b.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(a.vera_lambda_b.grad, b.vera_lambda_b.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.vera_lambda_d.grad, b.vera_lambda_d.grad, rtol=1e-5, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fixed once: no second warning
        gc(input_ids=ids, labels=labels).loss.backward()


def test_inputs_embeds_without_grad_are_handled_under_reentrant_checkpointing():
    model = _adapted("opt")
    gc = _checkpointed(model, reentrant=True)
    emb = model.get_input_embeddings()(torch.randint(0, 96, (2, 7))).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(inputs_embeds=emb).logits.square().mean().backward()
        gc(inputs_embeds=emb).logits.square().mean().backward()
    assert not emb.requires_grad  # the caller's tensor is left alone
    for (_, a), (_, b) in zip(vera_layers(gc), vera_layers(model)):
        torch.testing.assert_close(a.vera_lambda_d.grad, b.vera_lambda_d.grad, rtol=1e-5, atol=1e-7)


def test_enable_gradient_checkpointing_helper():
    model = _adapted("opt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reentrant through the helper: fixed without a warning
        enable_gradient_checkpointing(model, use_reentrant=True)
        ids = torch.randint(0, 96, (2, 7))
        model(input_ids=ids, labels=ids).loss.backward()
    assert reentrant_checkpointing(model)
    assert all(l.vera_lambda_d.grad is not None for _, l in vera_layers(model))
    with pytest.raises(ValueError, match="model.gradient_checkpointing=false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_app_flag_trains_the_same_adapter(tmp_path):
    """``model.gradient_checkpointing=true``: same λ's after two steps as without it."""
    import os
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from vera_lightning.app.commands.train import register_configs, train
    from vera_lightning.app.models.load import build_model, build_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    adapters = {}
    for flag in ("false", "true"):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.output_dir={tmp_path / flag}", "experiment=smoke",
                                              f"model.gradient_checkpointing={flag}", "eval_before=false"])
        assert cfg.model.gradient_checkpointing == (flag == "true")
        built = build_model(cfg.model, build_tokenizer(cfg.model))
        assert any(getattr(m, "gradient_checkpointing", False) for m in built.modules()) == (flag == "true")
        assert not reentrant_checkpointing(built)
        metrics = train(cfg)
        assert metrics["steps"] == 2
        adapters[flag] = load_file(str(Path(metrics["adapter_dir"]) / "adapter_model.safetensors"))
    assert adapters["true"].keys() == adapters["false"].keys()
    for name, value in adapters["true"].items():
        torch.testing.assert_close(value, adapters["false"][name], rtol=1e-5, atol=1e-7, msg=name)
    assert any("lambda_b" in n and v.abs().max() > 0 for n, v in adapters["true"].items())  # it trained
