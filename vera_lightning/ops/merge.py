"""Fold the VeRA update into the base weights and take it out again: merge, unmerge, unload.

Every operation here is model-wide, idempotent and refused before any layer changes where it would lose
the update (a quantized base) or change what an open ``disable_adapter``/``adapter_batch`` block serves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vera_lightning.core.adapter import ADAPTER_ATTR, VeraAdapter, check_no_open_block
from vera_lightning.core.layer import VeraLinear
from vera_lightning.core.lookup import vera_layers
from vera_lightning.core.qlinear import merge_refusal
from vera_lightning.core.refusals import check_untied

__all__ = ["merge_vera", "unmerge_vera", "unload_vera"]


def _refuse_quantized_merge(layers: list[tuple[str, VeraLinear]], what: str) -> None:
    for name, layer in layers:
        if layer.base_is_quantized and not layer.merged:
            raise merge_refusal(f"{what} ({name})", layer.weight)


def merge_vera(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Fold every VeRA update into its base weight (idempotent). Returns ``model``.

    With ``safe_merge=True`` every merged weight is checked for NaN/inf before any
    layer is written, so a failure leaves the whole model unchanged.

    Raises:
        ValueError: Over a quantized base (:func:`~vera_lightning.quantize_base`), before any layer
            changes: re-rounding W0+ΔW would lose the update; ``dequantize_base`` first. Inside an open
            ``disable_adapter``/``adapter_batch`` block (its layers would serve ``W0 + ΔW`` to every row).
    """
    layers = list(vera_layers(model))
    check_no_open_block(_adapter_of(layers), "merge_vera")
    _refuse_quantized_merge(layers, "merge_vera")
    check_untied(model, layers, "merge_vera")
    if safe_merge:
        with torch.no_grad():
            for name, layer in layers:
                if not layer.merged and not torch.isfinite(layer.weight + layer.delta_weight()).all():
                    raise ValueError(
                        f"safe_merge refused: merging {name} gives non-finite weights (NaN/inf in its λ's or "
                        "base weight); no layer was changed. Inspect its vera_lambda_b/vera_lambda_d."
                    )
    for _, layer in layers:
        layer.merge()
    return model


def unmerge_vera(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_vera` on every layer (idempotent). Returns ``model``.

    Raises:
        ValueError: Inside an open ``disable_adapter``/``adapter_batch`` block (close it first).
    """
    layers = list(vera_layers(model))
    check_no_open_block(_adapter_of(layers), "unmerge_vera")
    for _, layer in layers:
        layer.unmerge()
    return model


def _adapter_of(layers: list[tuple[str, VeraLinear]]) -> Optional[VeraAdapter]:
    """The adapter ``layers`` refer to (one per model), read from the first (``None``: no layer)."""
    return layers[0][1].adapter if layers else None


def unload_vera(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every VeraLinear by a plain ``nn.Linear``/``Conv1D`` and drop the projections.

    Args:
        model: An adapted model.
        merge: Keep the adaptation by folding it into the weights (``True``), or return
            the original base weights (``False``).

    Returns:
        The same ``model`` object, free of VeRA modules (its ``requires_grad`` flags are left as they were);
        quantized layers unload to :class:`~vera_lightning.core.qlinear.QuantizedLinear` (or their bitsandbytes layer).

    Raises:
        ValueError: ``merge=True`` over a quantized base, before anything changes (``dequantize_base`` first);
            inside an open ``disable_adapter``/``adapter_batch`` block (close it first).
    """
    layers = list(vera_layers(model))
    check_no_open_block(_adapter_of(layers), f"unload_vera(merge={merge})")
    if merge:
        _refuse_quantized_merge(layers, "unload_vera(merge=True)")
        check_untied(model, layers, "unload_vera(merge=True)")
    for name, layer in layers:
        model.set_submodule(name, layer.to_base(merge=merge))
    if isinstance(getattr(model, ADAPTER_ATTR, None), VeraAdapter):
        delattr(model, ADAPTER_ATTR)
    return model
