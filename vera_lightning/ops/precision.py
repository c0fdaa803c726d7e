"""The bf16 training form: a frozen base stored in bf16, float32 λ's, projection products in bf16.

:func:`set_projection_dtype` sets the dtype the shared projections are used in (``VeraAdapter.compute_dtype``).
The λ's are never cast: they, their gradients and the optimizer's state stay in the dtype they were created in
(float32), so updates of 1e-4 do not vanish in bf16's 8-bit mantissa, as they would under Lightning's
``bf16-true``. See ``docs/llm.md`` (*Precision*) for which tensor lives in which dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vera_lightning.core.lookup import vera_layers

__all__ = ["PROJECTION_DTYPES", "set_projection_dtype"]

#: The dtypes the projections may be used in (``None``: the λ's dtype, PEFT's rule and the default).
PROJECTION_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def set_projection_dtype(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """Run the VeRA products of every adapted layer of ``model`` in ``dtype`` (``None``: the λ's dtype).

    With a bf16 base, ``torch.bfloat16`` makes ``x·A_sᵀ`` and ``(λ_d ⊙ h)·B_sᵀ`` bf16 products (as fast as the
    base's) instead of float32 ones; the λ-gradients are still float32 sums. The projections hold the same values
    either way (they were rounded through the base's dtype when the adapter was made). The merged path is not
    taken in this form (its ``ΔW`` is formed in the λ's dtype).

    Returns:
        ``model``.

    Raises:
        ValueError: For a dtype outside :data:`PROJECTION_DTYPES`, or a model with no VeRA layer.
    """
    if dtype not in PROJECTION_DTYPES:
        raise ValueError(f"set_projection_dtype(dtype={dtype!r}): use one of {PROJECTION_DTYPES}")
    adapters = {id(layer.adapter): layer.adapter for _, layer in vera_layers(model)}
    if not adapters:
        raise ValueError("set_projection_dtype: the model has no VeRA layer; call apply_vera first")
    for adapter in adapters.values():
        adapter.compute_dtype = dtype
    return model
