r"""Mixed-adapter batches: ``with adapter_batch(model, names): model(...)``, row ``i`` served by ``names[i]``.

Every adapter of a model shares ``A_s``/``B_s``, so for a batch whose rows use different adapters

.. math::

    y_i = W_0 x_i + b + \lambda_{b}^{(i)} \odot B_s \big(\lambda_{d}^{(i)} \odot A_s x_i\big)

needs one ``h = x A_sᵀ`` for the whole batch (shared by sibling layers, as in the other paths), one
``(λ_d ⊙ h) B_sᵀ`` for the whole batch, and two per-row scalings. When the block opens, each layer's
λ's of the adapters named in the batch are stacked into a table (row 0: zeros, the base model, for
``None``) and gathered once into per-row tensors ``(rows, out)`` / ``(rows, r)``; the forward then
only broadcasts them (the ``mixed`` path, :mod:`vera_lightning.forward.mixed`). Its cost per token does not
depend on how many distinct adapters the batch holds, and the per-row arithmetic is the ``nograd``
path's, so row ``i`` equals adapter ``names[i]``'s own output over the same batch bit for bit (and a
``None`` row the base model's).

Choices, and why:

* **Rows are the leading dimension** of every adapted layer's input. ``generate()`` of a causal LM keeps
  the batch's rows in place at every step (prefill and each cached incremental step; padding is the
  caller's: left padding for decoder-only models), so the mapping set at the start holds throughout.
  Beam search and ``num_return_sequences > 1`` expand rows; a layer that sees another number of rows
  (or a model that flattens tokens into the first dimension) raises an error naming the cause, never
  mixes adapters up.
* **Inference only.** The λ's are gathered when the block opens, as constants: if autograd records
  while an adapter in the batch has trainable λ's, the forward refuses (no gradient would reach them).
  Train one adapter at a time with :func:`vera_lightning.set_adapter`.
* Merged layers are refused (their weight holds one adapter's update), as is nesting inside
  ``disable_adapter`` or another ``adapter_batch``. Active dropout (training mode) is applied per layer.
* **The open block is a state.** The λ's are gathered when the block opens, so what would change them or
  the rows' adapters (``merge_vera``, ``unmerge_vera``, ``unload_vera``, ``load_adapter``, ``set_adapter``,
  ``delete_adapter``, ``add_adapter`` of a held name) is refused inside it, before any change, naming the
  block (:func:`~vera_lightning.core.adapter.check_no_open_block`); ``add_adapter`` of a new name is allowed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from vera_lightning.core.adapter import VeraAdapter
from vera_lightning.core.refusals import check_not_merged
from vera_lightning.forward.protocol import VeraPath
from vera_lightning.ops.named import forcing, require_adapter

if TYPE_CHECKING:  # pragma: no cover
    from vera_lightning.core.layer import VeraLinear

__all__ = ["adapter_batch", "MixedBatch"]


class MixedBatch:
    """The per-row λ's of an open :func:`adapter_batch` block.

    Attributes:
        names: The adapter of each row (``None``: the base model).
        lambdas: ``id(layer) -> (λ_b rows (rows, out), λ_d rows (rows, r))``.
        trainable: Adapters of the batch whose λ's require grad.
    """

    __slots__ = ("names", "lambdas", "trainable")

    def __init__(self, adapter: VeraAdapter, layers: list["VeraLinear"], names: list[Optional[str]]) -> None:
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        slot = {name: i + 1 for i, name in enumerate(distinct)}
        index = torch.tensor([0 if n is None else slot[n] for n in names], dtype=torch.long)
        self.names = names
        self.lambdas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        trainable = set()
        attrs = [adapter.lambda_names(n) for n in distinct]
        with torch.no_grad():
            for layer in layers:
                pairs = [(getattr(layer, name_b), getattr(layer, name_d)) for name_b, name_d in attrs]
                trainable |= {n for n, pair in zip(distinct, pairs) if any(p.requires_grad for p in pair)}
                like_b, like_d = layer.vera_lambda_b, layer.vera_lambda_d
                table_b = torch.stack([torch.zeros_like(like_b)] + [b for b, _ in pairs])  # (1 + K, out)
                table_d = torch.stack([torch.zeros_like(like_d)] + [d for _, d in pairs])  # (1 + K, r)
                rows = index.to(like_b.device)
                self.lambdas[id(layer)] = (table_b.index_select(0, rows), table_d.index_select(0, rows))
        self.trainable = sorted(trainable)


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """``with adapter_batch(model, names): model(...)``: row ``i`` of the batch uses adapter ``names[i]``.

    Args:
        model: A model holding named VeRA adapters (see :mod:`vera_lightning.ops.named`).
        names: One entry per row of the batch: an adapter name, or ``None`` for the base model.

    Yields:
        ``model``.

    Raises:
        ValueError: For unknown names, an empty list, merged layers or a nested block; inside the block,
            for inputs whose first dimension is not the rows (see the module docstring), and for the
            operations that would change what the block serves.

    Example::

        >>> from vera_lightning import VeraConfig, add_adapter, apply_vera
        >>> cfg = VeraConfig(r=4, target_modules=["0"], init_weights=False)
        >>> net = add_adapter(apply_vera(torch.nn.Sequential(torch.nn.Linear(8, 4)), cfg), "b", cfg)
        >>> with torch.no_grad(), adapter_batch(net, ["default", None, "b"]):
        ...     y = net[0](torch.randn(3, 8))  # (nn.Sequential would also call the attached adapter)
        >>> tuple(y.shape)
        (3, 4)
    """
    found = require_adapter(model, "adapter_batch")
    adapter = found.adapter
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise ValueError(f"adapter_batch: names must be a list with one adapter name (or None) per row, got {names!r}")
    names = list(names)
    if not names:
        raise ValueError("adapter_batch: names is empty; give one adapter name (or None for the base model) per row")
    unknown = sorted({repr(n) for n in names if n is not None and (not isinstance(n, str) or n not in adapter.names)})
    if unknown:
        raise ValueError(f"adapter_batch: unknown adapter name(s) {', '.join(unknown)}; the model holds "
                         f"{adapter.names} (None selects the base model)")
    check_not_merged(found.layers, "adapter_batch", "their weight holds one adapter's update for every row")
    batch = MixedBatch(adapter, [layer for _, layer in found.layers], names)
    with forcing(adapter, VeraPath.mixed, "adapter_batch", batch):
        yield model
