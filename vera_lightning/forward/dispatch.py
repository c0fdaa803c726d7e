"""How a :class:`~vera_lightning.VeraLinear` computes its update: the paths and the table dispatching them.

Every path gives the same values as PEFT's formulation ``λ_b ⊙ (B_s (λ_d ⊙ (A_s x)))``; they
differ in what autograd keeps for backward (see :mod:`vera_lightning.forward.lowrank`):

==========  ==============================================================================
``plain``   PEFT's graph under plain autograd (saves ``h`` and ``u`` per layer); also taken
            with active dropout (each layer draws its own mask) and under ``torch.compile``
``lean``    saves ``x`` (shared by sibling layers), recomputes ``h = x A_sᵀ`` in backward
``save_h``  saves ``h`` once per sibling group (faster backward, ``N x r`` more memory)
``merged``  one matmul with ``W0 + diag(λ_b) B_s diag(λ_d) A_s`` replacing the base layer's,
            exact λ-gradients from ``gᵀx`` (:mod:`vera_lightning.forward.merged`); saves ``x``
``nograd``  autograd does not record: no custom node, ``h`` still shared by siblings
``mixed``   per-row λ's of several named adapters (``adapter_batch``, :mod:`vera_lightning.ops.batching`)
``off``     no update at all: the base layer's output (``disable_adapter``)
==========  ==============================================================================

``auto`` (the default) takes, when autograd records and no dropout is active, the fastest of the
paths the memory preference allows (``lean``/``save_h``/``merged``; ``plain`` too with
``memory="speed"``): measured once per sibling-group shape by :mod:`vera_lightning.forward.autotune`,
or estimated by the cost model (:mod:`vera_lightning.forward.cost`) when tuning is off. A new path
is one :class:`VeraPath` member and one entry in :data:`PATH_TABLE`; a path that computes the base
product itself is also in :data:`REPLACES_BASE` (its entry gets ``None`` for the base output).
Tests and diagnostics observe the chosen paths with :class:`record_paths`; nothing is written on
the layer per call.
``mixed`` and ``off`` are forced on every layer while their context is open
(``VeraAdapter.forced_path``); the ``mixed`` entry is :mod:`vera_lightning.forward.mixed`'s.
Every path reads the active adapter's λ's through ``layer.lambdas()``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vera_lightning.forward import autotune
from vera_lightning.forward.lowrank import ProjectIn, SiblingGroup, VeraUpdate
from vera_lightning.forward.merged import merged_forward
from vera_lightning.forward.mixed import mixed_update
from vera_lightning.forward.protocol import AdaptedLayer, VeraPath

__all__ = [
    "VeraPath", "PATHS", "PATH_TABLE", "REPLACES_BASE", "choose_path", "apply_path", "vera_forward", "record_paths",
]


#: The paths a user may set with :func:`set_vera_path`.
PATHS = tuple(p.value for p in VeraPath if p not in (VeraPath.nograd, VeraPath.mixed, VeraPath.off))


def choose_path(layer: AdaptedLayer, x: torch.Tensor) -> VeraPath:
    """The concrete path (never ``auto``) ``layer`` takes for input ``x`` in the current grad mode."""
    forced = layer.adapter.forced_path
    if forced is not None:
        return forced
    wanted = layer.vera_path
    if wanted is VeraPath.plain or torch.compiler.is_compiling() or (
        layer.training and isinstance(layer.vera_dropout, nn.Dropout)
    ):
        return VeraPath.plain  # dropout: each layer draws its own mask, nothing to share or recompute
    lam_b, lam_d = layer.lambdas()
    records = torch.is_grad_enabled() and (x.requires_grad or lam_b.requires_grad or lam_d.requires_grad)
    if not records:
        return VeraPath.nograd
    if wanted is VeraPath.auto:
        return VeraPath(autotune.choose_path(layer, x, apply_path))
    if wanted is VeraPath.merged and layer.base_is_quantized:
        return VeraPath.lean  # the merged form needs a dequantized W0 (set_vera_path refuses; quantize_base came later)
    return wanted


def _plain(layer: AdaptedLayer, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PEFT's formulation under plain autograd."""
    lam_b, lam_d = layer.lambdas()
    a_s, b_s = layer.sliced_projections()
    if x.dtype != a_s.dtype:  # as PEFT: the adapter runs in the λ's dtype (or the adapter's compute dtype)
        x = x.to(a_s.dtype)
    update = lam_b * F.linear((lam_d * F.linear(layer.vera_dropout(x), a_s)).to(b_s.dtype), b_s)
    return (result + update).to(result.dtype)


def _shared_h(layer: AdaptedLayer, x: torch.Tensor, a_s: torch.Tensor, path: VeraPath):
    """``(h, group)`` for this layer: a sibling's if it read the same ``x``, else a new one."""
    cache, dtype = layer.adapter.siblings, a_s.dtype
    hit = cache.lookup(x, a_s, path.value, id(layer))
    if path is VeraPath.nograd and cache.enabled:  # sibling groups are learned here too: reentrant
        if hit is not None:                          # checkpointing runs no grad-recording forward outside backward
            cache.plans.join(layer, x)
        else:
            cache.plans.lead(layer, x)
    if hit is not None:
        return hit
    if path is VeraPath.nograd:
        value = (F.linear(x.to(dtype), a_s), None)
    else:
        value = (ProjectIn.apply(x, a_s, dtype), SiblingGroup(a_s, dtype))
    cache.store(x, a_s, path.value, value, id(layer))
    return value


def _nograd(layer: AdaptedLayer, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a_s, b_s = layer.sliced_projections()
    h, _ = _shared_h(layer, x, a_s, VeraPath.nograd)
    lam_b, lam_d = layer.lambdas()
    return (result + lam_b * F.linear((lam_d * h).to(b_s.dtype), b_s)).to(result.dtype)


def _custom(save_h: bool) -> Callable[[AdaptedLayer, torch.Tensor, torch.Tensor], torch.Tensor]:
    path = VeraPath.save_h if save_h else VeraPath.lean

    def update(layer: AdaptedLayer, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a_s, b_s = layer.sliced_projections()
        h, group = _shared_h(layer, x, a_s, path)
        group.members += 1
        lam_b, lam_d = layer.lambdas()
        return VeraUpdate.apply(result, h, x, lam_b, lam_d, b_s, group, save_h)

    update.__name__ = f"_{path.value}"
    return update


def _off(layer: AdaptedLayer, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The adapter is disabled: the base output, untouched."""
    return result


#: Concrete path -> ``update(layer, base_output, x) -> output`` (``base_output`` is ``None`` for
#: the paths in :data:`REPLACES_BASE`).
PATH_TABLE: dict[VeraPath, Callable[[AdaptedLayer, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    VeraPath.plain: _plain,
    VeraPath.lean: _custom(save_h=False),
    VeraPath.save_h: _custom(save_h=True),
    VeraPath.merged: merged_forward,
    VeraPath.nograd: _nograd,
    VeraPath.off: _off,
    VeraPath.mixed: mixed_update,
}

#: Paths whose entry computes the base product itself (the base forward is not run for them).
REPLACES_BASE: frozenset[VeraPath] = frozenset({VeraPath.merged})

_recorders: list["record_paths"] = []


def apply_path(layer: AdaptedLayer, x: torch.Tensor, path: VeraPath) -> torch.Tensor:
    """``layer``'s output for ``x`` on ``path`` (the base forward, unless the path replaces it, then the entry)."""
    result = None if path in REPLACES_BASE else layer.base_forward(x)
    return PATH_TABLE[path](layer, result, x)


def vera_forward(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    """The adapted layer's output for ``x`` (base plus VeRA update), by the path :func:`choose_path` picks."""
    path = choose_path(layer, x)
    if _recorders and not torch.compiler.is_compiling():
        for recorder in _recorders:
            recorder[layer] = path
    return apply_path(layer, x, path)


class record_paths(dict):
    """Context manager recording the path each layer took: ``{layer: VeraPath}`` (its last forward).

    Example::

        >>> from vera_lightning import VeraConfig, apply_vera
        >>> net = apply_vera(torch.nn.Sequential(torch.nn.Linear(4, 4)), VeraConfig(r=4, target_modules=["0"]))
        >>> with record_paths() as seen:
        ...     _ = net[0](torch.randn(2, 4))
        >>> sorted(p.value for p in seen.values())
        ['lean']
    """

    def __enter__(self) -> "record_paths":
        _recorders.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _recorders.remove(self)

    def __hash__(self) -> int:  # identity, so `_recorders.remove` finds this very recorder
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


