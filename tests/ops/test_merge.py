"""ops/merge.py: unload_vera gives back plain modules holding the merged (or the original) weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.models import TINY_MODELS, random_lambdas_, run
from torch import nn

from vera_lightning import VeraConfig, apply_vera, unload_vera
from vera_lightning.core.lookup import vera_layers


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_unload_returns_plain_modules(kind, merge):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = TINY_MODELS[kind][0]()
    reference = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_vera(base, VeraConfig(r=8, target_modules=TINY_MODELS[kind][1]))
    random_lambdas_(model)
    keys = set(reference.state_dict())
    with torch.no_grad():
        adapted = run(model, kind)
        unload_vera(model, merge=merge)
        out = run(model, kind)
        plain = run(reference, kind)
    assert not list(vera_layers(model)) and not hasattr(model, "vera_projections")
    assert set(model.state_dict()) == keys
    expected_type = Conv1D if kind == "gpt2" else nn.Linear
    names = [n for n, m in reference.named_modules() if type(m) is expected_type]
    assert all(type(model.get_submodule(n)) is expected_type for n in names)
    target = adapted if merge else plain
    assert (out - target).abs().max().item() <= 1e-5
    assert not torch.equal(adapted, plain)
