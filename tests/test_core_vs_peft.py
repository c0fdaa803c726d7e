"""Our core against the installed PEFT (the oracle) on tiny models of every supported family."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import TINY_MODELS, peft_layer, peft_vera, randomize_lambdas_, run
from vera_lightning import VeraConfig, apply_vera, count_parameters, merge_vera
from vera_lightning.inject import vera_layers

pytestmark = pytest.mark.numerics  # also run under every ATEN_CPU_CAPABILITY by .ci/run

KINDS = list(TINY_MODELS)


def _adapt_both(twin, kind, **fields):
    base, other = twin(kind)
    fields.setdefault("target_modules", TINY_MODELS[kind][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = apply_vera(base, VeraConfig(**fields))
    theirs = peft_vera(other, **fields)
    return ours, theirs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", [0, 1234])
def test_projections_bit_identical(twin, kind, key):
    ours, theirs = _adapt_both(twin, kind, r=16, projection_prng_key=key)
    assert torch.equal(ours.vera_projections.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.vera_projections.vera_B, theirs.base_model.vera_B["default"])


@pytest.mark.parametrize("kind", KINDS)
def test_same_outputs_with_same_lambdas(twin, kind):
    ours, theirs = _adapt_both(twin, kind, r=16)
    randomize_lambdas_(ours, theirs)
    with torch.no_grad():
        out_ours, out_peft = run(ours, kind), run(theirs, kind)
    assert out_ours.abs().max() > 0
    assert (out_ours - out_peft).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_same_lambda_gradients(twin, kind):
    ours, theirs = _adapt_both(twin, kind, r=16)
    randomize_lambdas_(ours, theirs)
    run(ours, kind).square().mean().backward()
    run(theirs, kind).square().mean().backward()
    for name, layer in vera_layers(ours):
        ref = peft_layer(theirs, name)
        for pname in ("vera_lambda_b", "vera_lambda_d"):
            torch.testing.assert_close(getattr(layer, pname).grad, getattr(ref, pname)["default"].grad,
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_same_trainable_parameter_count(twin, kind):
    fields = {"modules_to_save": ["classifier"]} if kind == "bert" else {}
    ours, theirs = _adapt_both(twin, kind, r=16, **fields)
    peft_trainable, _ = theirs.get_nb_trainable_parameters()
    assert count_parameters(ours)[0] == peft_trainable


@pytest.mark.parametrize("kind", KINDS)
def test_same_merged_weights(twin, kind):
    ours, theirs = _adapt_both(twin, kind, r=16)
    randomize_lambdas_(ours, theirs)
    merge_vera(ours)
    theirs.merge_adapter()
    for name, layer in vera_layers(ours):
        torch.testing.assert_close(layer.weight, peft_layer(theirs, name).base_layer.weight, rtol=0, atol=1e-6)


def test_all_linear_matches_peft_on_causal_lm(twin):
    ours, theirs = _adapt_both(twin, "opt", r=8, target_modules="all-linear")
    peft_names = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "vera_lambda_b")}
    assert {n for n, _ in vera_layers(ours)} == peft_names
    assert "lm_head" not in peft_names


@pytest.mark.parametrize("fields", [
    {"target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"},
    {"target_modules": ["q_proj", "fc2"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
])
def test_targeting_matches_peft(twin, fields):
    ours, theirs = _adapt_both(twin, "opt", r=8, **fields)
    peft_names = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "vera_lambda_b")}
    assert {n for n, _ in vera_layers(ours)} == peft_names and peft_names


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
