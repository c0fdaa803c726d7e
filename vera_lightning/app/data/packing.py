"""Batching causal-LM examples: padding, length-grouped batches, and packing several examples per row.

* :func:`collate` pads ``{"input_ids", "labels"}`` items on the right (labels -100 on padding).
* :class:`LengthGroupedBatchSampler` (``data.group_by_length: true``) draws the shuffled order from its
  sampler, sorts each mega-batch of ``mega_batch_mult × batch_size`` examples by length, cuts it into
  batches and shuffles the batches with the DataModule's generator: similar lengths share a batch, the
  order stays random and seeded, and a checkpoint's generator state resumes the same order. Under DDP
  Lightning injects its ``DistributedSampler`` as ``sampler`` and each rank groups its own share.
* :func:`pack` (``data.packing: true``) places examples into rows of at most ``max_length`` tokens
  (best fit, longest first). A packed row carries ``position_ids`` that restart at 0 for each example
  and no ``attention_mask``; ``transformers`` (>= 4.5x, ``masking_utils.find_packed_sequence_indices``)
  then builds a block-diagonal causal mask from them, for eager, sdpa and flex attention alike, **but
  only without a cache**: a llama-family model called with ``use_cache`` on makes an empty cache and
  skips that detection, so packed batches also carry ``use_cache=False``. The first token of each
  example is labelled -100, so no example is the target of the previous one's last token.
  :func:`check_packing` probes a model and refuses one that lets packed examples see each other.
"""

from __future__ import annotations

import bisect
import inspect
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, Sampler

__all__ = ["collate", "LengthGroupedBatchSampler", "pack_plan", "pack_items", "pack", "check_packing",
           "padding_fraction", "padded_width", "padding_of"]

IGNORE = -100


def padded_width(longest: int, multiple: int = 1, limit: Optional[int] = None) -> int:
    """The width of a batch whose longest row has ``longest`` tokens: rounded up to a multiple of ``multiple``, but
    never past ``limit`` (``data.max_length``, which the model's positions hold) unless the row itself is longer.

    A model with exactly ``data.max_length`` positions whose position ids run over the whole width (GPT-2, BERT)
    would index past its table otherwise (12 positions, rows cut to 12 tokens, padded to 16).
    """
    width = -(-longest // multiple) * multiple
    return width if limit is None else max(longest, min(width, limit))


def padding_of(cfg: Mapping[str, Any]) -> tuple[int, Optional[int]]:
    """``(multiple, limit)`` for :func:`padded_width` from a ``data`` config: ``data.pad_to_multiple_of`` (1 when
    unset) and ``data.max_length`` (None when unset)."""
    return int(cfg.get("pad_to_multiple_of") or 1), (int(cfg["max_length"]) if cfg.get("max_length") else None)


def collate(items: Sequence[dict[str, list[int]]], pad_id: int, multiple: int = 1,
            limit: Optional[int] = None) -> dict[str, Any]:
    """Right-pad a batch of ``{"input_ids", "labels"[, "position_ids"]}`` items into tensors, to the longest item's
    length rounded up to a multiple of ``multiple`` and at most ``limit`` (:func:`padded_width`).

    Unpacked items get an ``attention_mask``; packed rows (with ``position_ids``) get the padding as one
    more segment (positions from 0, labels -100) and ``use_cache=False`` instead (see the module docstring).
    """
    width = padded_width(max(len(item["input_ids"]) for item in items), multiple, limit)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, item in enumerate(items):
        ids[i, :len(item["input_ids"])] = torch.tensor(item["input_ids"])
        labels[i, :len(item["labels"])] = torch.tensor(item["labels"])
    if "position_ids" not in items[0]:
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, item in enumerate(items):
            mask[i, :len(item["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    positions = torch.zeros((len(items), width), dtype=torch.long)
    for i, item in enumerate(items):
        n = len(item["position_ids"])
        positions[i, :n] = torch.tensor(item["position_ids"])
        positions[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """The share of padding tokens when each batch (a list of indices) is padded to its longest."""
    real = sum(lengths[i] for batch in batches for i in batch)
    total = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1.0 - real / total if total else 0.0


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar lengths in a seeded random order (see the module docstring).

    Args:
        sampler: Yields the shuffled example indices (a ``RandomSampler`` on the DataModule's generator).
        batch_size: Examples per batch.
        drop_last: Drop batches smaller than ``batch_size``.
        lengths: Token length of every example of the dataset.
        generator: Shuffles the batch order (the DataModule's, so its state resumes the order).
        mega_batch_mult: Mega-batch size in batches: larger groups tighter, smaller keeps more randomness.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False, *, lengths: Sequence[int],
                 generator: Optional[torch.Generator] = None, mega_batch_mult: int = 50) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult={mega_batch_mult}: must be >= 1")
        self.lengths = lengths if isinstance(lengths, np.ndarray) else list(lengths)  # a column stays an array
        self.generator = generator
        self.mega_batch_mult = mega_batch_mult

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        size = self.batch_size * self.mega_batch_mult
        batches = []
        for start in range(0, len(order), size):
            mega = sorted(order[start:start + size], key=lambda i: -self.lengths[i])  # stable: ties keep the draw
            batches += [mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        n, size, mega = len(self.sampler), self.batch_size, self.batch_size * self.mega_batch_mult
        if not self.drop_last:
            return sum(-(-min(mega, n - s) // size) for s in range(0, n, mega))
        return sum(min(mega, n - s) // size for s in range(0, n, mega))


def pack_plan(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Which examples share a packed row (best fit decreasing; deterministic): rows of example indices, each sorted,
    the rows in the order of their first example. Reads only the lengths (a column), never the tokens.

    Raises:
        ValueError: If an example is longer than ``max_length`` (truncate first).
    """
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted: the tightest row that fits is found by bisect
    for i in order:
        n = int(lengths[i])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than data.max_length={max_length}")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            space, row = max_length - n, len(rows) - 1
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            space -= n
        bisect.insort(free, (space, row))
    return sorted(sorted(row) for row in rows)


def pack_items(items: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """One packed row of ``items``: their tokens in order, ``position_ids`` restarting at 0, each first label -100."""
    ids, labels, positions = [], [], []
    for item in items:
        ids += item["input_ids"]
        labels += [IGNORE] + list(item["labels"][1:])
        positions += range(len(item["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack(items: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most ``max_length`` tokens (:func:`pack_plan`, :func:`pack_items`).

    Raises:
        ValueError: If an example is longer than ``max_length`` (truncate first).
    """
    plan = pack_plan([len(item["input_ids"]) for item in items], max_length)
    return [pack_items([items[i] for i in members]) for members in plan]


def check_packing(model: nn.Module) -> None:
    """Refuse packing for a model that would let one packed example attend to another.

    Checks that ``forward`` takes ``position_ids`` and runs a 6-token probe: two 3-token examples packed
    in one row must give the logits each gives alone (eval mode, no grad; skipped on the meta device).

    Raises:
        ValueError: Naming the model class and ``data.packing``.
    """
    name = type(model).__name__
    refuse = f"data.packing=true cannot be honoured by {name}: "
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(refuse + "its forward takes no position_ids; set data.packing=false (data.group_by_length="
                         "true also cuts padding)")
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return
    vocab = int(getattr(model.config, "vocab_size", 8))
    ids = (torch.arange(6, device=param.device) * 7 + 3) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids[None], position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]], device=param.device),
                           use_cache=False).logits[0].float()
            alone = torch.cat([model(input_ids=ids[None, :3]).logits[0], model(input_ids=ids[None, 3:]).logits[0]])
    finally:
        model.train(was_training)
    alone = alone.float()
    tolerance = 1e-4 if param.dtype in (torch.float32, torch.float64) else 3e-2
    error = (packed - alone).abs().max().item() / max(1.0, alone.abs().max().item())
    if not error <= tolerance:
        raise ValueError(refuse + f"a probe of two packed examples differs from the examples alone by {error:.2g} "
                         "(relative): its attention does not restart at position_ids == 0. Set data.packing=false "
                         "(data.group_by_length=true also cuts padding)")
