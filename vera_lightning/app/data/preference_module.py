"""``PreferenceDataModule``: train/val loaders of chosen/rejected pairs for DPO (``data.format: preference``).

Rows are read, checked and tokenised by :mod:`vera_lightning.app.data.preference`. A batch of ``B`` pairs is one
tensor of ``2B`` rows, the ``B`` chosen sequences then the ``B`` rejected ones, right-padded to the longest
(``input_ids``, ``attention_mask``, ``labels`` with -100 on prompt and padding), so the policy scores both sides in
one forward; ``index`` (``B``) numbers each pair within its split (the key of precomputed reference log-probs).

``data.preference_target=chosen`` serves the chosen sides only, as SFT rows (``input_ids``, ``labels``): supervised
fine-tuning on the chosen responses, the usual step before DPO from an SFT adapter.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from vera_lightning.app.data.packing import collate as pad_items
from vera_lightning.app.data.packing import padding_of
from vera_lightning.app.data.preference import check_preference_config, encode_pairs, read_pairs

__all__ = ["PreferenceDataModule", "collate_pairs"]

#: The splits each Lightning stage reads.
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",)}


def collate_pairs(items: list[dict[str, Any]], pad_id: int, multiple: int = 1,
                  limit: Optional[int] = None) -> dict[str, torch.Tensor]:
    """``B`` encoded pairs as one batch of ``2B`` rows: chosen rows first, then rejected; ``index`` per pair; the
    width rounded up to a multiple of ``multiple``, at most ``limit`` (``data.max_length``)."""
    rows = [{"input_ids": item[f"{side}_ids"], "labels": item[f"{side}_labels"]}
            for side in ("chosen", "rejected") for item in items]
    batch = pad_items(rows, pad_id, multiple, limit)
    batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return batch


class PreferenceDataModule(pl.LightningDataModule):
    """Preference pairs (see the module docstring).

    Args:
        cfg: The ``data`` settings (``format: preference``; ``conf/data/preference.yaml``).
        tokenizer: The model's tokenizer (with a pad token).

    Raises:
        ValueError: For an inconsistent config (:func:`~vera_lightning.app.data.preference.check_preference_config`).
    """

    def __init__(self, cfg: Mapping[str, Any], tokenizer: Any) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.tokenizer = tokenizer
        if self.cfg.get("task") != "causal_lm":
            raise ValueError(f"data.format='preference' is causal-LM data but data.task={self.cfg.get('task')!r}; "
                             "set data.task=causal_lm (with a causal-LM model)")
        check_preference_config(self.cfg, tokenizer)
        #: ``data.preference_target=chosen``: prompt + chosen response rows for SFT (no pairs)
        self.chosen_only = self.cfg.get("preference_target") == "chosen"
        self.pad_multiple, self.pad_limit = padding_of(self.cfg)
        self.seed = int(self.cfg.get("seed") or 0)
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._train_generator: Optional[torch.Generator] = None
        self._resume_generator: Optional[torch.Tensor] = None

    def split_path(self, split: str) -> Path:
        """The file a split is read from (``data_dir``/``<split>_file``)."""
        directory = Path(str(self.cfg.get("data_dir"))).expanduser()
        if not self.cfg.get("data_dir") or not directory.is_dir():
            raise FileNotFoundError(f"data.data_dir={self.cfg.get('data_dir')!r} is not a directory; point it at the "
                                    f"folder holding {self.cfg.get('train_file')!r} and {self.cfg.get('val_file')!r}")
        return directory / str(self.cfg.get(f"{split}_file"))

    def rows(self, split: str) -> list[dict[str, Any]]:
        """Every checked pair of a split (before subsampling), read once."""
        if split not in self._rows:
            path = self.split_path(split)
            if not path.is_file():
                raise FileNotFoundError(f"data.{split}_file={self.cfg.get(f'{split}_file')!r}: {path} does not exist")
            self._rows[split] = read_pairs(path, self.cfg, self.tokenizer)
        return self._rows[split]

    def setup(self, stage: Optional[str] = None) -> None:
        """Read, subsample (``max_<split>_samples`` with ``seed``) and tokenise the splits ``stage`` needs, once."""
        for split in _STAGE_SPLITS.get(stage or "fit", ("train", "val")):
            if split in self.splits:
                continue
            pairs = self.rows(split)
            limit = self.cfg.get(f"max_{split}_samples")
            if limit is not None and int(limit) <= 0:
                raise ValueError(f"data.max_{split}_samples={limit}: must be a positive integer or null (every row)")
            if limit is not None and int(limit) < len(pairs):
                keep = sorted(random.Random(self.seed).sample(range(len(pairs)), int(limit)))
                pairs = [pairs[i] for i in keep]
            where = f"data.{split}_file={self.split_path(split)}"
            items = encode_pairs(pairs, self.cfg, self.tokenizer, where=where)
            if self.chosen_only:  # SFT on the chosen responses: prompt + chosen, labels on the response
                items = [{"input_ids": item["chosen_ids"], "labels": item["chosen_labels"]} for item in items]
            self.splits[split] = items

    def generation_examples(self, split: str) -> list[dict[str, Any]]:
        """No generation metrics for preference data (``[]``)."""
        return []

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.chosen_only:
            return pad_items(items, self.tokenizer.pad_token_id, self.pad_multiple, self.pad_limit)
        return collate_pairs(items, self.tokenizer.pad_token_id, self.pad_multiple, self.pad_limit)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        if shuffle:
            if self._resume_generator is not None:  # restored from a checkpoint: continue the same order
                generator.set_state(self._resume_generator)
                self._resume_generator = None
            self._train_generator = generator
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate,
                          num_workers=int(self.cfg.get("num_workers") or 0), generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", int(self.cfg.get("batch_size") or 8), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        size = int(self.cfg.get("eval_batch_size") or self.cfg.get("batch_size") or 8)
        return self._loader("val", size, shuffle=False)

    def ordered_loader(self, split: str, batch_size: int) -> DataLoader:
        """Every pair of ``split`` in file order (the reference log-probs are precomputed over it)."""
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=False, collate_fn=self.collate)

    def state_dict(self) -> dict[str, Any]:
        """The shuffle generator's state (a resumed run continues the same order)."""
        return {} if self._train_generator is None else {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_generator = state_dict.get("train_generator")
