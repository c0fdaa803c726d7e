"""app/models/trained_float32.py: over a bf16 base, every trained tensor is a float32 master used in bf16.

The oracle is the same model with the trained tensors stored in bf16 (what the app did before): the forward must
compute exactly that (the master is rounded for the call), and the difference is only where the values live:
the master, its gradient and AdamW's state are float32, so small updates survive.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.models import tiny_bert

from vera_lightning import VeraConfig, apply_vera, enable_gradient_checkpointing, vera_layers
from vera_lightning.app.models.trained_float32 import (
    drop_float32_masters,
    float32_masters,
    half_base_dtype,
    keep_float32,
    keep_trained_float32,
)

IDS = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 1, 0])


def adapted(bias="none", seed=0):
    torch.manual_seed(seed)
    model = tiny_bert().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply_vera(model, VeraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                                            bias=bias)).train()


def trained(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["none", "vera_only", "all"])
def test_trained_tensors_become_masters_and_compute_as_their_bf16_rounding(bias):
    reference, model = adapted(bias), adapted(bias)
    names = keep_trained_float32(model)
    lambdas = {n for n in trained(model) if "vera_lambda" in n}
    assert set(names) == set(trained(model)) - lambdas  # every trained tensor but the λ's
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    if bias == "vera_only":
        assert "bert.encoder.layer.0.attention.self.query.bias" in names
        assert "bert.encoder.layer.0.attention.self.key.bias" not in names
    if bias == "all":
        assert "bert.encoder.layer.0.output.LayerNorm.bias" in names
    assert {p.dtype for p in trained(model).values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2} == {torch.bfloat16}
    assert set(float32_masters(model).values()) == {torch.bfloat16}

    out = model(input_ids=IDS, labels=LABELS)
    ref = reference(input_ids=IDS, labels=LABELS)
    assert out.logits.dtype == torch.bfloat16 and torch.equal(out.logits, ref.logits)  # the same computation
    out.loss.backward()
    ref.loss.backward()
    for name, p in trained(model).items():
        ref_grad = dict(reference.named_parameters())[name].grad
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, ref_grad.float(), rtol=0, atol=0)  # the bf16 gradient, kept in float32
    assert {p.dtype for p in trained(model).values()} == {torch.float32}  # the masters are back after the call


def test_small_updates_survive_and_adam_state_is_float32():
    model = adapted()
    keep_trained_float32(model)
    optimizer = torch.optim.AdamW(list(trained(model).values()), lr=1e-3)
    model(input_ids=IDS, labels=LABELS).loss.backward()
    optimizer.step()
    assert {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim()} == {torch.float32}
    before = model.classifier.weight.detach().clone()
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    torch.optim.SGD([model.classifier.weight], lr=1e-6).step()  # vanishes in a bf16 weight of ~0.02
    assert not torch.equal(model.classifier.weight.detach(), before)
    big = before.abs() > 1e-2
    rounded = before[big].to(torch.bfloat16)
    assert torch.equal((rounded.float() - 1e-6).to(torch.bfloat16), rounded)  # ... as it would in bf16


def test_the_masters_are_put_back_when_the_forward_raises():
    model = adapted()
    keep_trained_float32(model)
    with pytest.raises(RuntimeError):
        model.classifier(torch.ones(2, 3, dtype=torch.bfloat16))  # wrong width
    assert isinstance(model.classifier.weight, torch.nn.Parameter) and model.classifier.weight.dtype == torch.float32


def test_activation_checkpointing_recomputes_with_the_same_casts():
    plain, checkpointed = adapted("all"), adapted("all")
    for model in (plain, checkpointed):
        keep_trained_float32(model)
    enable_gradient_checkpointing(checkpointed, use_reentrant=False)
    for model in (plain, checkpointed):
        model(input_ids=IDS, labels=LABELS).loss.backward()
    for (name, p), q in zip(trained(plain).items(), trained(checkpointed).values()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_idempotent_and_a_float32_base_is_left_alone():
    model = adapted("vera_only")
    first = keep_trained_float32(model)
    hooks = len(model.classifier._forward_pre_hooks)
    assert keep_trained_float32(model) == first and len(model.classifier._forward_pre_hooks) == hooks == 1
    fp32 = tiny_bert()
    assert half_base_dtype(fp32) is None and keep_trained_float32(fp32) == []
    assert half_base_dtype(model) == torch.bfloat16


def test_a_deep_copy_keeps_the_masters():
    model = adapted()
    keep_trained_float32(model)
    twin = copy.deepcopy(model)
    assert float32_masters(twin) == float32_masters(model)
    torch.testing.assert_close(twin(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)


def test_drop_makes_the_stored_dtype_the_used_one():
    model = adapted()
    names = keep_trained_float32(model)
    model.float()
    assert drop_float32_masters(model) == sorted(names) and float32_masters(model) == {}
    assert model(input_ids=IDS).logits.dtype == torch.float32


def test_refusals():
    model = adapted()
    with pytest.raises(ValueError, match=r"keep_float32: BertForSequenceClassification has no parameter \['head'\]"):
        keep_float32(model, ["head"], torch.bfloat16)
    with pytest.raises(ValueError, match=r"keep_float32\(dtype=torch.float32\): the masters are used in a half dtype"):
        keep_float32(model, ["classifier.weight"], torch.float32)
    layer = next(layer for _, layer in vera_layers(model))
    assert layer.vera_lambda_b.dtype == torch.float32  # the λ's are the layer's own, never masters
    assert not any("vera_lambda" in n for n in keep_trained_float32(model))
