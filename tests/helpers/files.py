"""Adapter directories for the save and file-trust tests (test_atomic, test_guards, and their subprocesses)."""

from __future__ import annotations

import torch
from helpers.models import MLP

from vera_lightning import VeraConfig, apply_vera, load_adapter
from vera_lightning.core.lookup import vera_layers

CFG = dict(r=4, target_modules=["fc1", "fc2"])
WEIGHTS = "adapter_model.safetensors"


def filled_adapter(value: float):
    """An MLP adapter whose λ's all equal ``value`` (so a loaded version is recognisable)."""
    model = apply_vera(MLP(), VeraConfig(**CFG))
    with torch.no_grad():
        for _, layer in vera_layers(model):
            for p in layer.adapter_params().values():
                p.fill_(value)
    return model


def loaded_value(directory) -> float:
    """The one value every λ holds after loading ``directory`` into a fresh MLP."""
    model = load_adapter(MLP(), directory)
    values = {float(p.flatten()[0]) for _, layer in vera_layers(model) for p in layer.adapter_params().values()}
    assert len(values) == 1, values
    return values.pop()
