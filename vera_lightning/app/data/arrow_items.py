"""Lazy views of memory-mapped Arrow tables (:mod:`vera_lightning.app.data.arrow_splits`) for the DataLoader.

Nothing here copies a split into Python lists: an item is read from Arrow when a batch asks for it, so the memory a
run holds does not grow with the number of rows (the index arrays, 8 bytes a row, are the exception).

* :class:`TokenItems`: the tokenised examples at ``index`` (a subsample, without dropped rows), a
  ``torch.utils.data.Dataset`` whose ``__getitems__`` reads a whole batch in one Arrow query; ``lengths()`` is the
  stored ``length`` column (length grouping, packing).
* :class:`PackedItems`: packed rows (``data.packing``), each joined from its examples when a batch asks for it.
* :class:`RowsView`: the checked rows as dicts (generation prompts and references, checks).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional, Sequence, Union

import datasets
import numpy as np
from torch.utils.data import Dataset

from vera_lightning.app.data.packing import pack_items

__all__ = ["TokenItems", "PackedItems", "RowsView"]


class _Lazy(Dataset):
    """Indexing by position or slice, batch reads, iteration: each subclass says how to read a list of positions."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def __getitem__(self, position: Union[int, slice]) -> Any:
        if isinstance(position, slice):
            return self.__getitems__(list(range(*position.indices(len(self)))))
        if not -len(self) <= position < len(self):
            raise IndexError(f"position {position} out of range for {len(self)} items")
        return self.__getitems__([position % len(self)])[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), 1000):
            yield from self.__getitems__(list(range(start, min(start + 1000, len(self)))))


class TokenItems(_Lazy):
    """The examples of a token table at ``index``, read per batch.

    Args:
        table: The split's token table (``tokens.arrow``, memory-mapped).
        columns: The columns an item holds (e.g. ``input_ids``, ``labels``).
        index: The table rows, in order (None: all of them).
    """

    def __init__(self, table: datasets.Dataset, columns: Sequence[str], index: Optional[np.ndarray] = None) -> None:
        self.table = table
        self.columns = [c for c in columns if c in table.column_names]
        self.view = table.select_columns(self.columns)
        self.index = np.arange(len(table), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        if not len(positions):
            return []
        batch = self.view[[int(self.index[p]) for p in positions]]
        return [{c: batch[c][k] for c in self.columns} for k in range(len(positions))]

    def lengths(self) -> np.ndarray:
        """The token count of every item (the stored ``length`` column, read without the tokens)."""
        return self.table.data.column("length").to_numpy()[self.index]


class PackedItems(_Lazy):
    """Packed rows (``data.packing``): row ``i`` joins the items ``plan[i]`` (:func:`~.packing.pack_plan`)."""

    def __init__(self, items: TokenItems, plan: list[list[int]]) -> None:
        self.items = items
        self.offsets = np.cumsum([0] + [len(members) for members in plan], dtype=np.int64)
        self.members = np.fromiter((i for members in plan for i in members), dtype=np.int64,
                                   count=int(self.offsets[-1]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """The token count of every packed row (its examples' stored lengths, summed)."""
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(self.items.lengths()[self.members], self.offsets[:-1])

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        spans = [(int(self.offsets[p]), int(self.offsets[p + 1])) for p in positions]
        flat = self.items.__getitems__([int(m) for a, b in spans for m in self.members[a:b]])
        out, at = [], 0
        for a, b in spans:
            out.append(pack_items(flat[at:at + b - a]))
            at += b - a
        return out


class RowsView(_Lazy):
    """A split's checked rows (``rows.arrow``) as the readers gave them: dicts, a ``format: sft`` row decoded."""

    def __init__(self, table: datasets.Dataset) -> None:
        self.table = table
        self.encoded = table.column_names == ["row"]

    def __len__(self) -> int:
        return len(self.table)

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        if not len(positions):
            return []
        batch = self.table[[int(p) for p in positions]]
        if self.encoded:
            return [json.loads(text) for text in batch["row"]]
        return [{c: batch[c][k] for c in self.table.column_names} for k in range(len(positions))]
