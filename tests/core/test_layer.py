"""VeraLinear against PEFT (outputs, λ-gradients, merged weights, half precision) and its own contract."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.models import TINY_MODELS, model_inputs, random_lambdas_, run, tiny_opt
from helpers.peft_oracle import adapt_both, peft_layer, peft_vera, randomize_lambdas_
from torch import nn

from vera_lightning import VeraConfig, VeraLinear, apply_vera, merge_vera, unmerge_vera, vera_layers
from vera_lightning.core.layer import initial_lambdas, layer_shape

pytestmark = pytest.mark.numerics  # also run under every ATEN_CPU_CAPABILITY by .ci/run

KINDS = list(TINY_MODELS)


@pytest.mark.parametrize("kind", KINDS)
def test_same_outputs_with_same_lambdas(twin, kind):
    ours, theirs = adapt_both(twin, kind, r=16)
    randomize_lambdas_(ours, theirs)
    with torch.no_grad():
        out_ours, out_peft = run(ours, kind), run(theirs, kind)
    assert out_ours.abs().max() > 0
    assert (out_ours - out_peft).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_same_lambda_gradients(twin, kind):
    ours, theirs = adapt_both(twin, kind, r=16)
    randomize_lambdas_(ours, theirs)
    run(ours, kind).square().mean().backward()
    run(theirs, kind).square().mean().backward()
    for name, layer in vera_layers(ours):
        ref = peft_layer(theirs, name)
        for pname in ("vera_lambda_b", "vera_lambda_d"):
            torch.testing.assert_close(getattr(layer, pname).grad, getattr(ref, pname)["default"].grad,
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_same_merged_weights(twin, kind):
    ours, theirs = adapt_both(twin, kind, r=16)
    randomize_lambdas_(ours, theirs)
    merge_vera(ours)
    theirs.merge_adapter()
    for name, layer in vera_layers(ours):
        torch.testing.assert_close(layer.weight, peft_layer(theirs, name).base_layer.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_peft(twin, dtype):
    base, other = twin("opt")
    base, other = base.to(dtype), other.to(dtype)
    ours = apply_vera(base, VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    theirs = peft_vera(other, r=16, target_modules=["q_proj", "v_proj"])
    randomize_lambdas_(ours, theirs)
    with torch.no_grad():
        a, b = run(ours, "opt"), run(theirs, "opt")
    assert a.dtype == dtype
    assert torch.equal(ours.vera_projections.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(a, b)


def test_optimizer_step_changes_only_the_lambdas():
    model = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = model_inputs("opt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.endswith(("vera_lambda_b", "vera_lambda_d"))}


@pytest.mark.parametrize("kind", ["opt", "gpt2", "mlp"])
def test_merge_unmerge_idempotent_and_exact(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_vera(TINY_MODELS[kind][0](), VeraConfig(r=8, target_modules=TINY_MODELS[kind][1]))
    random_lambdas_(model)
    base_weights = {n: l.weight.clone() for n, l in vera_layers(model)}
    with torch.no_grad():
        unmerged = run(model, kind)
        merge_vera(model)
        merged_weights = {n: l.weight.clone() for n, l in vera_layers(model)}
        merge_vera(model)  # second merge: no-op
        assert all(torch.equal(l.weight, merged_weights[n]) for n, l in vera_layers(model))
        merged = run(model, kind)
        unmerge_vera(model)
        unmerge_vera(model)
        restored = run(model, kind)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert (restored - unmerged).abs().max().item() <= 1e-5
    assert all(not torch.equal(merged_weights[n], base_weights[n]) for n in base_weights)
    assert all(torch.allclose(l.weight, base_weights[n], atol=1e-6) for n, l in vera_layers(model))


def test_safe_merge_refuses_non_finite_and_leaves_every_weight_unchanged():
    model = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    random_lambdas_(model)
    with torch.no_grad():
        model.model.decoder.layers[1].self_attn.v_proj.vera_lambda_b[0] = float("inf")
    before = {n: l.weight.clone() for n, l in vera_layers(model)}
    with pytest.raises(ValueError, match=r"safe_merge refused: merging model\.decoder\.layers\.1\.self_attn\.v_proj"):
        merge_vera(model, safe_merge=True)
    assert all(torch.equal(l.weight, before[n]) and not l.merged for n, l in vera_layers(model))
    layer = model.model.decoder.layers[1].self_attn.v_proj
    with pytest.raises(ValueError, match="safe_merge refused"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, before["model.decoder.layers.1.self_attn.v_proj"])


def test_vera_linear_is_the_only_adapter_module_and_init_is_a_no_op():
    model = tiny_opt()
    with torch.no_grad():
        before = run(model, "opt")
    apply_vera(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"], d_initial=0.05))
    layer = model.model.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer, VeraLinear)
    assert torch.equal(layer.vera_lambda_b, torch.zeros(32))
    assert torch.equal(layer.vera_lambda_d, torch.full((8,), 0.05))
    with torch.no_grad():
        assert torch.equal(run(model, "opt"), before)


@pytest.mark.parametrize("kind", ["opt", "gpt2", "mlp"])
def test_layer_shape_is_in_out_for_every_supported_layer(kind):
    torch.manual_seed(0)
    base = TINY_MODELS[kind][0]()
    shapes = {}
    for name, module in base.named_modules():
        if name.endswith(tuple(TINY_MODELS[kind][1])):
            shapes[name] = layer_shape(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = apply_vera(base, VeraConfig(r=4, target_modules=TINY_MODELS[kind][1]))
    for name, layer in vera_layers(adapted):
        assert layer_shape(layer) == shapes[name] == (layer.in_features, layer.out_features)
        assert tuple(layer.vera_lambda_b.shape) == (shapes[name][1],)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        layer_shape(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_new_layers_take_the_mode_of_the_layer_they_replace(mode):
    model = tiny_opt().train(mode == "train")
    adapted = apply_vera(model, VeraConfig(r=4, target_modules=["q_proj"], vera_dropout=0.5))
    assert {layer.training for _, layer in vera_layers(adapted)} == {mode == "train"}


def test_initial_lambdas_are_the_one_rule_for_layers_named_adapters_and_re_initialisation():
    lam_b, lam_d = initial_lambdas(5, 3, init_weights=True, d_initial=0.25, dtype=torch.float32)
    assert torch.equal(lam_b, torch.zeros(5)) and torch.equal(lam_d, torch.full((3,), 0.25))
    torch.manual_seed(0)
    lam_b, lam_d = initial_lambdas(5, 3, init_weights=False, d_initial=0.25, dtype=torch.float64)
    torch.manual_seed(0)
    assert torch.equal(lam_b, torch.ones(5, dtype=torch.float64)) and torch.equal(lam_d, torch.randn(3).double())
    layer = apply_vera(nn.Sequential(nn.Linear(6, 5)), VeraConfig(r=3, target_modules=["0"], d_initial=0.25))[0]
    with torch.no_grad():
        layer.vera_lambda_b.fill_(7.0)
        layer.vera_lambda_d.fill_(7.0)
    layer.reset_lambdas_()
    assert torch.equal(layer.vera_lambda_b, torch.zeros(5)) and torch.equal(layer.vera_lambda_d, torch.full((3,), 0.25))


def test_a_foreign_base_is_held_unregistered():
    layer = apply_vera(nn.Sequential(nn.Linear(6, 5)), VeraConfig(r=3, target_modules=["0"]))[0]
    assert layer.foreign_base is None
    base = nn.Linear(6, 5)
    layer.set_foreign_base(base)
    assert layer.foreign_base is base and base not in list(layer.children())
    assert not any(name.startswith("_foreign_base") for name in layer.state_dict())
    layer.set_foreign_base(None)
    assert layer.foreign_base is None
