"""The one way to find a model's VeRA adapter and its layers.

:func:`locate_adapter` / :func:`find_adapter` find the :class:`~vera_lightning.core.adapter.VeraAdapter`
serving a module (the module holding it, or any part of a model whose layers refer to it);
:func:`vera_layers` enumerates the :class:`~vera_lightning.VeraLinear` layers; :func:`adapter_root` is the
one rule for the module PEFT names tensors relative to. An operation resolves the adapter once, at its
entry point, and passes it down.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

from torch import nn

from vera_lightning.core.adapter import VeraAdapter
from vera_lightning.core.layer import VeraLinear

__all__ = ["adapter_root", "find_adapter", "locate_adapter", "vera_layers"]


def vera_layers(module: nn.Module) -> Iterator[tuple[str, VeraLinear]]:
    """Yield ``(name, layer)`` for every :class:`~vera_lightning.VeraLinear` in ``module``."""
    for name, sub in module.named_modules():
        if isinstance(sub, VeraLinear):
            yield name, sub


def locate_adapter(module: nn.Module) -> Optional[tuple[str, VeraAdapter]]:
    """``(name, adapter)`` of the adapter serving ``module``, or ``None`` if it carries no VeRA.

    The adapter is found among ``module``'s submodules; for a part of an adapted model (e.g. the
    ``transformers`` model inside a LightningModule that was adapted as a whole) it is the one its
    layers refer to, and its name is ``""``.

    Raises:
        ValueError: If ``module`` holds several adapters, or layers that refer to different ones.
    """
    found = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, VeraAdapter)]
    if len(found) > 1:
        names = [name or "<root>" for name, _ in found]
        raise ValueError(
            f"{type(module).__name__} holds {len(found)} separate VeRA adapters ({names}), from apply_vera on "
            "nested modules; one model carries one adapter. Unload them (vera_lightning.unload_vera) and apply one "
            "config to the module containing every layer to adapt"
        )
    referenced = {id(layer.adapter): layer.adapter for _, layer in vera_layers(module)}
    if len(referenced) > 1 or (found and referenced and id(found[0][1]) not in referenced):
        raise ValueError(
            f"{type(module).__name__} holds VeRA layers that belong to different adapters; adapt the whole model "
            "with one apply_vera call"
        )
    if found:
        return found[0]
    if referenced:
        return "", next(iter(referenced.values()))
    return None


def find_adapter(module: nn.Module) -> Optional[VeraAdapter]:
    """The :class:`VeraAdapter` serving ``module`` (see :func:`locate_adapter`), or ``None``."""
    located = locate_adapter(module)
    return located[1] if located is not None else None


def adapter_root(module: nn.Module) -> nn.Module:
    """The module whose parameter names match PEFT's: the outermost ``transformers`` model holding every
    adapted layer of ``module`` (e.g. the model inside a LightningModule). Adapter files name tensors
    relative to it.

    Falls back to ``module`` itself when no such model exists (plain ``nn.Module`` s).
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return module
    layers = {id(layer) for _, layer in vera_layers(module)}
    for _, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and layers and layers <= {id(m) for m in sub.modules()}:
            return sub
    return module
