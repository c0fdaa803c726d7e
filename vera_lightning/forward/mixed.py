"""The ``mixed`` path: row ``i`` of a batch gets adapter ``i``'s update (opened by ``adapter_batch``).

The block (:func:`vera_lightning.adapter_batch`) gathers each layer's per-row λ's into the adapter's
``batch`` (``names``, ``lambdas[id(layer)] = (λ_b rows, λ_d rows)``, ``trainable``); this entry of the path
table only broadcasts them. See :mod:`vera_lightning.ops.batching` for the choices.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vera_lightning.forward.protocol import AdaptedLayer, VeraPath

__all__ = ["mixed_update"]


def _check_rows(layer: AdaptedLayer, x: torch.Tensor, batch: Any) -> None:
    rows = len(batch.names)
    if x.dim() < 2 or x.shape[0] != rows:
        raise ValueError(
            f"adapter_batch: the block maps {rows} rows to adapters, but a VeRA layer ({layer.in_features}->"
            f"{layer.out_features}) got an input of shape {tuple(x.shape)}. Rows must be the first dimension of every "
            "adapted layer's input and keep their number: generate() with num_beams > 1 or num_return_sequences > 1 "
            "expands rows (not supported: use greedy or sampling with one sequence per row), and models that flatten "
            "tokens into the first dimension cannot be served per row"
        )
    if batch.trainable and torch.is_grad_enabled():
        raise ValueError(
            f"adapter_batch: adapters {batch.trainable} have trainable λ's and autograd is recording, but inside "
            "adapter_batch the λ's are constants (no gradient would reach them). Serve under torch.no_grad() or "
            "torch.inference_mode(), and train one adapter at a time with set_adapter"
        )


def mixed_update(layer: AdaptedLayer, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``result`` plus row ``i``'s adapter update, for every row (the ``mixed`` entry of ``PATH_TABLE``)."""
    batch = layer.adapter.batch
    lambdas = batch.lambdas.get(id(layer))
    if lambdas is None:
        raise ValueError("adapter_batch: this VeRA layer is outside the module the block was opened on; open "
                         "adapter_batch on the whole adapted model")
    _check_rows(layer, x, batch)
    lam_b, lam_d = lambdas
    a_s, b_s = layer.sliced_projections()
    dtype = a_s.dtype
    if layer.training and isinstance(layer.vera_dropout, nn.Dropout):
        h = F.linear(layer.vera_dropout(x.to(dtype)), a_s)  # each layer draws its own mask: nothing to share
    else:
        cache, mode = layer.adapter.siblings, VeraPath.mixed.value
        hit = cache.lookup(x, a_s, mode, id(layer))
        if hit is None:
            h = F.linear(x.to(dtype), a_s)
            cache.store(x, a_s, mode, (h,), id(layer))
        else:
            h = hit[0]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
    return (result + lam_b.view(shape) * F.linear((lam_d.view(shape) * h).to(b_s.dtype), b_s)).to(result.dtype)
