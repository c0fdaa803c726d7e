"""What each operation does in each state of a model, and the states it refuses.

The checks here are called by :mod:`vera_lightning.ops.inject`, :mod:`vera_lightning.ops.named` and
:mod:`vera_lightning.io.adapter_dir` before they change anything (see ``docs/reliability.md`` for the decisions):

* **merged** layers: ``load_adapter`` refuses (the weights hold ``W0 + ΔW`` of the current
  adapter; a new adapter would not take effect and a later unmerge would subtract the wrong
  update). Unmerge, load, merge again. ``set_adapter``, ``disable_adapter`` and ``adapter_batch``
  refuse them too, with the same check (:func:`check_not_merged`).
* **tied** weights (an ``lm_head`` sharing the input embedding): ``merge_vera`` and
  ``unload_vera(merge=True)`` refuse, since merging in place would change the other module too.
  The unmerged adapter is exact (the update is added to the head's output only).
* **meta** device: ``load_adapter``/``save_adapter`` refuse (meta tensors hold no data);
  ``apply_vera`` on a meta model keeps the adapter on meta and the adapter re-initialises itself
  (projections re-drawn from the seed, λ's set to their initial values) when ``to_empty``
  materialises it (:func:`materialised`).
* **open blocks** (``disable_adapter``/``adapter_batch``): merge, unmerge, unload, load, set, delete and
  re-adding a held name refuse while one is open, with the one check
  :func:`~vera_lightning.core.adapter.check_no_open_block` (it lives beside the state it reads, in
  :mod:`vera_lightning.core.adapter`, which imports this module).
* **targets** VeRA cannot honour: a matched module that is not ``nn.Linear``/``Conv1D``,
  ``nn.MultiheadAttention.out_proj`` (MHA reads its weight directly and never calls it),
  ``layers_to_transform`` indices the model does not have, an ``r`` whose projections do not
  fit in memory, a second adapter inside an adapted model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn

from vera_lightning.core.messages import shorten

__all__ = [
    "check_not_merged", "check_untied", "check_not_meta", "shared_parameters",
    "check_projection_memory", "materialised", "is_meta",
]


def is_meta(tensor: Optional[torch.Tensor]) -> bool:
    """Whether ``tensor`` lives on the ``meta`` device (holds no data)."""
    return tensor is not None and tensor.device.type == "meta"


def check_not_merged(layers: Iterable[tuple[str, nn.Module]], operation: str, why: str, then: str = "") -> None:
    """Refuse ``operation`` while VeRA layers are merged (the one merged-layer refusal).

    Args:
        layers: ``(name, layer)`` of the model's VeRA layers.
        operation: How the message starts, e.g. ``"set_adapter"``.
        why: Why a merged layer cannot take the operation.
        then: What to do after unmerging, appended to the fix (e.g. ``", then load, ..."``).

    Raises:
        ValueError: Naming the merged layers, why, and the fix.
    """
    merged = [name for name, layer in layers if getattr(layer, "merged", False)]
    if merged:
        raise ValueError(f"{operation}: layers {shorten(merged, 4)} are merged ({why}); "
                         f"call vera_lightning.unmerge_vera(model) first{then}")


def _span(param: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """``(storage, first byte, end byte)`` of the memory ``param`` covers (``None`` on meta/subclasses)."""
    if param.device.type == "meta" or param.numel() == 0:
        return None
    try:
        storage = param.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(param.shape, param.stride()))
    start = param.storage_offset() * param.element_size()
    return storage, start, start + extent * param.element_size()


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): its names}`` for every parameter the model holds under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {pid: sorted(found) for pid, found in names.items() if len(found) > 1}


def check_untied(model: nn.Module, layers: list[tuple[str, nn.Module]], operation: str) -> None:
    """Refuse merging a layer whose weight another module shares (tied embeddings).

    Merging writes ``W0 + ΔW`` into the weight in place; when the weight is tied (an
    ``lm_head`` sharing the input embedding) the other module would change too.

    Raises:
        ValueError: Naming the tied tensors and the fix, before any layer is merged.
    """
    params = list(model.named_parameters(remove_duplicate=False))
    spans = [(name, param, _span(param)) for name, param in params]
    problems = []
    for layer_name, layer in layers:
        if getattr(layer, "merged", False):
            continue
        own = f"{layer_name}.weight" if layer_name else "weight"
        mine = _span(layer.weight)
        sharing = set()
        for name, param, span in spans:  # the same tensor, or memory overlapping the weight's
            if param is layer.weight or (mine and span and span[0] == mine[0]
                                         and span[1] < mine[2] and mine[1] < span[2]):
                sharing.add(name)
        others = sorted(sharing - {own})
        if others:
            problems.append(f"{own} is tied to {others}")
    if problems:
        first = problems[0].split(" ", 1)[0].rsplit(".", 1)[0] or "layer"
        raise ValueError(
            f"{operation} refused, no layer was changed: " + "; ".join(problems) + ". Merging writes into the shared "
            "weight, which would change the tied module too. Keep the adapter unmerged (its outputs are exact), "
            f"or untie first: model.{first}.weight = torch.nn.Parameter(model.{first}.weight.detach().clone()) "
            "(and, for a transformers model you will save, model.config.tie_word_embeddings = False), then merge"
        )


def check_not_meta(model: nn.Module, operation: str) -> None:
    """Refuse reading or writing adapter values of a model whose tensors are on ``meta``.

    Raises:
        ValueError: Naming a meta tensor and the fix.
    """
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if is_meta(tensor):
            raise ValueError(
                f"{operation} refused: the model's tensors are on the meta device (e.g. {name}), which holds no "
                "data. Materialise it first: model.to_empty(device='cpu') (or your device), load the base "
                f"weights, then call {operation.split('(')[0]} again"
            )


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def projection_bytes(r: int, max_in: int, max_out: int) -> int:
    """Bytes of float32 ``vera_A`` (r x max_in) and ``vera_B`` (max_out x r)."""
    return 4 * r * (max_in + max_out)


def check_projection_memory(r: int, max_in: int, max_out: int, error: Optional[BaseException] = None) -> None:
    """Refuse an ``r`` whose projections cannot fit in this machine's memory.

    Args:
        r, max_in, max_out: The projection sizes.
        error: The allocator's error, if the allocation was tried and failed.

    Raises:
        ValueError: Naming ``r`` and the memory it would need.
    """
    need = projection_bytes(r, max_in, max_out)
    total = _physical_memory()
    if error is None and (total is None or need <= total):
        return
    have = f"this machine has {_human(total)} of memory" if total else "the allocation failed"
    raise ValueError(
        f"r={r}: the shared projections vera_A ({r} x {max_in}) and vera_B ({max_out} x {r}) need {_human(need)} "
        f"of float32, but {have}. Use a smaller r (the VeRA paper uses 256 to 1024)"
        + (f" (allocator: {str(error).splitlines()[0]})" if error is not None else "")
    )


def materialised(tensors: list[Optional[torch.Tensor]], before_meta: bool) -> bool:
    """Whether tensors that were on ``meta`` before a ``_apply`` now hold (uninitialised) storage."""
    return before_meta and any(t is not None and not is_meta(t) for t in tensors)
