"""The one way to find a model's VeRA adapter and its layers.

:func:`find_adapted` finds, in one walk of ``named_modules``, the :class:`~vera_lightning.core.adapter.VeraAdapter`
serving a module (the module holding it, or any part of a model whose layers refer to it), its
:class:`~vera_lightning.VeraLinear` layers and the ``transformers`` models around them, as an :class:`Adapted`.
An operation calls it once, at its entry point, and passes the result down (one save = one lookup).

:func:`locate_adapter` / :func:`find_adapter` (the adapter alone), :func:`vera_layers` (the layers alone) and
:func:`adapter_root` (the one rule for the module PEFT names tensors relative to) are the same walk for
callers that need one piece. Each public function here walks the module once and calls no other.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from torch import nn

from vera_lightning.core.adapter import VeraAdapter
from vera_lightning.core.layer import VeraLinear

__all__ = ["Adapted", "adapter_root", "find_adapted", "find_adapter", "locate_adapter", "vera_layers"]

Named = tuple[tuple[str, nn.Module], ...]


@dataclass(frozen=True)
class Adapted:
    """A module's VeRA adapter and layers, as one walk of its submodules found them.

    Attributes:
        module: The module searched.
        name: Where the adapter is attached in ``module`` (``""``: it or outside it, found through its layers).
        adapter: The :class:`VeraAdapter` serving ``module``.
        layers: ``(name, layer)`` of every :class:`~vera_lightning.VeraLinear` of ``module``, in
            ``named_modules`` order (what :func:`vera_layers` yields).
        models: ``(name, model)`` of the ``transformers`` models in ``module`` (for :meth:`at_root`).
    """

    module: nn.Module
    name: str
    adapter: VeraAdapter
    layers: tuple[tuple[str, VeraLinear], ...]
    models: Named = ()

    def at_root(self) -> Adapted:
        """The same adapter seen from :func:`adapter_root` of ``module``, with layer names relative to it.

        The names are those the walk found under the root (no second walk), unless a layer was first
        reached outside it (a module shared by two parents): then the root is searched itself.
        """
        name, root = _root_of(self.module, self.layers, self.models)
        if root is self.module:
            return self
        prefix = name + "."
        layers = tuple((n[len(prefix):], layer) for n, layer in self.layers if n.startswith(prefix))
        if len(layers) != len(self.layers):
            return _adapted(root, *_walk(root))  # type: ignore[misc]  # the root holds every layer: not None
        models = tuple((n[len(prefix):], m) for n, m in self.models if n.startswith(prefix))
        inner = self.name[len(prefix):] if self.name.startswith(prefix) else ""
        return Adapted(root, inner, self.adapter, layers, models)


def _pretrained_model_class() -> Optional[type]:
    # a model holding a transformers model has imported the class already: no import (seconds) for other models
    return getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)


def _walk(module: nn.Module) -> tuple[list[tuple[str, VeraAdapter]], list[tuple[str, VeraLinear]], Named]:
    """One walk of ``module.named_modules()``: its adapters, its VeRA layers, its ``transformers`` models."""
    pretrained = _pretrained_model_class()
    adapters, layers, models = [], [], []
    for name, sub in module.named_modules():
        if isinstance(sub, VeraAdapter):
            adapters.append((name, sub))
        elif isinstance(sub, VeraLinear):
            layers.append((name, sub))
        elif pretrained is not None and isinstance(sub, pretrained):
            models.append((name, sub))
    return adapters, layers, tuple(models)


def _serving(
    module: nn.Module, adapters: list[tuple[str, VeraAdapter]], layers: list[tuple[str, VeraLinear]]
) -> Optional[tuple[str, VeraAdapter]]:
    if len(adapters) > 1:
        names = [name or "<root>" for name, _ in adapters]
        raise ValueError(
            f"{type(module).__name__} holds {len(adapters)} separate VeRA adapters ({names}), from apply_vera on "
            "nested modules; one model carries one adapter. Unload them (vera_lightning.unload_vera) and apply one "
            "config to the module containing every layer to adapt"
        )
    referenced = {id(layer.adapter): layer.adapter for _, layer in layers}
    if len(referenced) > 1 or (adapters and referenced and id(adapters[0][1]) not in referenced):
        raise ValueError(
            f"{type(module).__name__} holds VeRA layers that belong to different adapters; adapt the whole model "
            "with one apply_vera call"
        )
    if adapters:
        return adapters[0]
    if referenced:
        return "", next(iter(referenced.values()))
    return None


def _adapted(module: nn.Module, adapters, layers, models: Named) -> Optional[Adapted]:
    located = _serving(module, adapters, layers)
    return None if located is None else Adapted(module, located[0], located[1], tuple(layers), models)


def _root_of(module: nn.Module, layers, models: Named) -> tuple[str, nn.Module]:
    ids = {id(layer) for _, layer in layers}
    for name, model in models:
        if ids and ids <= {id(m) for m in model.modules()}:
            return name, model
    return "", module


def find_adapted(module: nn.Module) -> Optional[Adapted]:
    """The adapter serving ``module`` with its layers (see :class:`Adapted`), or ``None`` if it carries no VeRA.

    The adapter is found among ``module``'s submodules; for a part of an adapted model (e.g. the
    ``transformers`` model inside a LightningModule that was adapted as a whole) it is the one its
    layers refer to, and its name is ``""``.

    Raises:
        ValueError: If ``module`` holds several adapters, or layers that refer to different ones.
    """
    return _adapted(module, *_walk(module))


def vera_layers(module: nn.Module) -> Iterator[tuple[str, VeraLinear]]:
    """Yield ``(name, layer)`` for every :class:`~vera_lightning.VeraLinear` in ``module``."""
    for name, sub in module.named_modules():
        if isinstance(sub, VeraLinear):
            yield name, sub


def locate_adapter(module: nn.Module) -> Optional[tuple[str, VeraAdapter]]:
    """``(name, adapter)`` of the adapter serving ``module`` (see :func:`find_adapted`), or ``None``."""
    adapters, layers, _ = _walk(module)
    return _serving(module, adapters, layers)


def find_adapter(module: nn.Module) -> Optional[VeraAdapter]:
    """The :class:`VeraAdapter` serving ``module`` (see :func:`find_adapted`), or ``None``."""
    adapters, layers, _ = _walk(module)
    located = _serving(module, adapters, layers)
    return located[1] if located is not None else None


def adapter_root(module: nn.Module) -> nn.Module:
    """The module whose parameter names match PEFT's: the outermost ``transformers`` model holding every
    adapted layer of ``module`` (e.g. the model inside a LightningModule). Adapter files name tensors
    relative to it.

    Falls back to ``module`` itself when no such model exists (plain ``nn.Module`` s).
    """
    _, layers, models = _walk(module)
    return _root_of(module, layers, models)[1]
