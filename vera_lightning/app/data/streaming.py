"""Streaming training data (``data.streaming: true``): rows read, checked and tokenised as training consumes them.

For training files bigger than the disk's room for a cache or than memory: :class:`StreamedItems` is an
``IterableDataset`` that reads the training file in blocks of :data:`~.arrow_splits.BLOCK` rows (the same streamed
readers and checks as the cached path, :func:`~.arrow_splits.split_records`), tokenises each block with the same
function (:func:`~.arrow_splits.tokenise_fn`), shuffles it with a seeded generator (a different order each pass) and
yields its examples; rows that ``data.truncation`` drops are skipped. Nothing is cached and nothing is held beyond
one block. The validation split is read as usual (cached Arrow).

* ``trainer.max_steps`` is required (the number of rows is not known up front, as TRL requires for an
  ``IterableDataset``); ``group_by_length``, ``packing``, ``max_train_samples`` and ``num_workers > 0`` are refused
  (:func:`streaming_problems`).
* **Resume**: :meth:`StreamedItems.state_dict` is the pass and the number of examples the training steps consumed
  in it (each batch carries the position of its last example, recorded when the step takes it, so a prefetched
  batch is not counted); a resumed run skips that many examples of that pass and continues with the next one.
"""

from __future__ import annotations

import random
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Mapping

from torch.utils.data import IterableDataset

from vera_lightning.app.data.arrow_splits import BLOCK, split_records, token_features, tokenise_fn

__all__ = ["POSITION", "streaming_problems", "StreamedItems"]

#: The batch key that carries the stream position of a batch's last example (removed before the model sees it).
POSITION = "stream_position"


def streaming_problems(cfg: Mapping[str, Any]) -> list[str]:
    """What ``data.streaming=true`` cannot honour in this ``data`` config, each with its fix."""
    problems = []
    for key in ("group_by_length", "packing"):
        if cfg.get(key):
            problems.append(f"data.{key}=true needs every row's length before the first batch; data.streaming=true "
                            f"reads them as it trains: set data.{key}=false or data.streaming=false")
    if cfg.get("max_train_samples") is not None:
        problems.append("data.max_train_samples draws rows from the whole file; with data.streaming=true set it to "
                        "null and bound the run with trainer.max_steps")
    if int(cfg.get("num_workers") or 0) > 0:
        problems.append("data.streaming=true reads in the main process (its resume position is counted there): set "
                        "data.num_workers=0")
    if cfg.get("format") == "hf":
        problems.append("data.streaming=true reads local files; for data.format=hf set data.streaming=false")
    return problems


class StreamedItems(IterableDataset):
    """Training examples streamed from ``path`` (see the module docstring).

    Args:
        cfg: The ``data`` settings.
        path: The training file.
        tokenizer: The model's tokenizer.
        seed: Seeds each pass's shuffle (``seed + pass``).
    """

    def __init__(self, cfg: Mapping[str, Any], path: Path, tokenizer: Any, seed: int) -> None:
        self.cfg, self.path, self.tokenizer, self.seed = dict(cfg), Path(path), tokenizer, seed
        self.features = token_features(self.cfg, tokenizer)
        self.encode = tokenise_fn(self.cfg, tokenizer, self.features)
        self.columns = [c for c in self.features if c not in ("length", "cut", "need")]
        self.passes, self.skip, self.consumed = 0, 0, 0

    def blocks(self) -> Iterator[list[dict[str, Any]]]:
        """The tokenised examples of each block of rows, in file order (rows dropped by truncation left out)."""
        records = split_records(self.cfg, "train", self.path, self.tokenizer)
        while True:
            block = list(islice(records, BLOCK))
            if not block:
                return
            out = self.encode({name: [record.get(name) for record in block] for name in block[0]})
            yield [{c: out[c][k] for c in self.columns} for k in range(len(block)) if out["length"][k]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed + self.passes)
        position, skip = 0, self.skip
        self.skip = 0
        for items in self.blocks():
            rng.shuffle(items)
            for item in items:
                position += 1
                if position > skip:
                    yield {**item, POSITION: position}
        self.passes += 1
        self.consumed = 0

    def took(self, position: int) -> None:
        """Record that a training step took the examples up to ``position`` of this pass."""
        self.consumed = position

    def state_dict(self) -> dict[str, int]:
        """``{"passes", "consumed"}``: the pass and how many of its examples the training steps took."""
        return {"passes": self.passes, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue after the last example a checkpointed run's steps took (see :meth:`state_dict`)."""
        self.passes, self.skip = int(state.get("passes", 0)), int(state.get("consumed", 0))
        self.consumed = self.skip
