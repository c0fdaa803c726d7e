"""Models holding several named VeRA adapters with random λ's (shared by the named/batching/export tests)."""

from __future__ import annotations

import copy
import warnings

import torch
from helpers.models import TINY_MODELS

from vera_lightning import VeraConfig, add_adapter, apply_vera, find_adapter
from vera_lightning.core.lookup import vera_layers

NAMES = ("default", "task_b", "task_c")


def named_config(kind, **fields):
    fields = {"r": 8, "target_modules": TINY_MODELS[kind][1], "init_weights": False, **fields}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VeraConfig(**fields)


def randomize_named(model, name, seed):
    """Random λ's for adapter ``name``; returns ``{layer: (λ_b, λ_d)}`` copies."""
    adapter, g = find_adapter(model), torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for layer_name, layer in vera_layers(model):
            pair = []
            for attr in adapter.lambda_names(name):
                param = getattr(layer, attr)
                param.copy_(torch.randn(param.shape, generator=g).to(param.dtype))
                pair.append(param.detach().clone())
            values[layer_name] = tuple(pair)
    return values


def multi_adapter_model(kind, names=NAMES, **fields):
    """(base copy, model holding ``names`` with random λ's, {name: λ values})."""
    torch.manual_seed(0)
    base = TINY_MODELS[kind][0]()
    pristine = copy.deepcopy(base)
    model = apply_vera(base, named_config(kind, **fields), adapter_name=names[0])
    for name in names[1:]:
        add_adapter(model, name, named_config(kind, **fields))
    values = {name: randomize_named(model, name, seed) for seed, name in enumerate(names, start=1)}
    return pristine, model, values
