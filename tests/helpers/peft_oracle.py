"""The oracle: PEFT's VeRA on the same tiny models, and helpers to give both the same λ's."""

from __future__ import annotations

import warnings

import torch


def peft_vera(model, **fields):
    """The oracle: PEFT's VeRA on ``model`` (modified in place, as get_peft_model does)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.VeraConfig(**fields))


def peft_layer(peft_model, name: str):
    return peft_model.base_model.model.get_submodule(name)


def randomize_lambdas_(ours, peft_model, seed: int = 1) -> None:
    """Give our layers random λ's and copy the same values into PEFT's layers."""
    from vera_lightning import vera_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in vera_layers(ours):
            for pname in ("vera_lambda_b", "vera_lambda_d"):
                ours_p = getattr(layer, pname)
                ours_p.copy_(torch.randn(ours_p.shape, generator=g).to(ours_p.dtype))
                getattr(peft_layer(peft_model, name), pname)["default"].copy_(ours_p)


def adapt_both(twin, kind: str, **fields):
    """The same tiny model adapted by us and by PEFT with the same fields: ``(ours, theirs)``."""
    from helpers.models import TINY_MODELS

    from vera_lightning import VeraConfig, apply_vera

    base, other = twin(kind)
    fields.setdefault("target_modules", TINY_MODELS[kind][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = apply_vera(base, VeraConfig(**fields))
    theirs = peft_vera(other, **fields)
    return ours, theirs
