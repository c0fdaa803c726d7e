"""A split's rows and tokens as memory-mapped Arrow tables (Hugging Face ``datasets``), read, checked and tokenised
once per fingerprint (:mod:`vera_lightning.app.data.cache`).

:func:`load_split` streams the split's source row by row through the same checks as before (every message names the
file, the row and the fix; a bad row stops the build and nothing is kept), writes the checked rows to ``rows.arrow``
in blocks of :data:`BLOCK` rows, then tokenises them with ``Dataset.map(batched=True)`` into ``tokens.arrow``:

* ``format: sft``: ``input_ids``, ``labels`` (int32), ``length`` (0: the row was dropped by ``data.truncation``),
  ``cut`` (its prompt was cut from the left) and ``need`` (the fewest tokens a dropped row needs), so subsampling,
  the truncation warnings, length grouping and packing read columns, not rows;
* ``table``/``text``/``hf``: the tokenizer's columns (``input_ids``, ``attention_mask``, ``token_type_ids``),
  ``labels`` for classification, and ``length``.

Rows are stored as the readers give them: ``text``/``text_pair``/``label`` columns, or, for ``sft``, each row as one
JSON string (``row``), so any columns a ``prompt_template`` names survive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import datasets
import numpy as np
import pyarrow as pa

from vera_lightning.app.data import sft_rows, sft_tokens
from vera_lightning.app.data.cache import DataCache
from vera_lightning.app.data.fingerprint import cache_key, file_digest
from vera_lightning.app.data.tables import COLUMN_OPTIONS, columns_of, is_regression, iter_table, parse_label
from vera_lightning.app.data.text_files import iter_lines

__all__ = ["BLOCK", "SplitData", "split_records", "hf_records", "token_features", "tokenise_fn", "load_split"]

#: Rows per Arrow record batch and per ``Dataset.map`` batch.
BLOCK = 1000
_LIST = getattr(datasets, "List", None) or datasets.Sequence  # datasets >= 4 names it List


@dataclass(frozen=True)
class SplitData:
    """A split's checked rows and their tokens, both memory-mapped ``datasets.Dataset`` (one row per source row)."""

    rows: datasets.Dataset
    tokens: datasets.Dataset
    meta: dict[str, Any]

    def column(self, name: str) -> np.ndarray:
        """A whole token column as a numpy array (``length``, ``cut``, ``need``, classification ``labels``)."""
        return self.tokens.data.column(name).to_numpy()


def split_records(cfg: Mapping[str, Any], split: str, path: Path, tokenizer: Any) -> Iterator[dict[str, Any]]:
    """The split's checked records, streamed (``path`` is None for ``format: hf``)."""
    fmt = cfg.get("format")
    if fmt == "sft":
        where = f"data.{split}_file={path}"
        rows = sft_rows.iter_rows(path, cfg)
        number = 1
        while True:  # special-token text is checked per block: the same message, row by row
            block = list(islice(rows, BLOCK))
            if not block:
                return
            sft_rows.check_special_text(block, cfg, tokenizer, where, start=number)
            number += len(block)
            yield from ({"row": json.dumps(row, ensure_ascii=False)} for row in block)
    elif fmt == "text":
        yield from ({"text": line} for line in iter_lines(path) if line.strip())  # split on \n only, BOM stripped
    elif fmt == "table":
        yield from iter_table(path, columns_of(cfg), regression=is_regression(cfg))
    else:
        yield from hf_records(cfg, split)


def _hf_dataset(cfg: Mapping[str, Any], split: str) -> datasets.Dataset:
    return datasets.load_dataset(cfg["hf_name"], cfg.get("hf_subset"), split=cfg[f"hf_{split}_split"])


def hf_records(cfg: Mapping[str, Any], split: str) -> Iterator[dict[str, Any]]:
    """The records of a Hugging Face dataset's split (``format: hf``), labels checked, streamed."""
    columns, regression = columns_of(cfg), is_regression(cfg)
    for i, row in enumerate(_hf_dataset(cfg, split)):
        yield {COLUMN_OPTIONS[option]: parse_label(row[column], regression, f"{cfg['hf_name']}[{i}]", column)
               if option == "label_field" else row[column] for option, column in columns.items()}


def _row_schema(cfg: Mapping[str, Any]) -> pa.Schema:
    if cfg.get("format") == "sft":
        return pa.schema([("row", pa.large_string())])
    fields = [("text", pa.large_string())]
    if cfg.get("format") != "text":
        columns = columns_of(cfg)
        if "text_pair_field" in columns:
            fields.append(("text_pair", pa.large_string()))
        if "label_field" in columns:
            fields.append(("label", pa.float64() if is_regression(cfg) else pa.int64()))
    return pa.schema(fields)


def _write_rows(records: Iterable[dict[str, Any]], schema: pa.Schema, path: Path) -> int:
    """Write records to an Arrow stream file (``datasets``' own format) block by block; the number written."""
    count = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        records = iter(records)
        while True:
            block = list(islice(records, BLOCK))
            if not block:
                return count
            writer.write_batch(pa.RecordBatch.from_pylist(block, schema=schema))
            count += len(block)


def token_features(cfg: Mapping[str, Any], tokenizer: Any) -> datasets.Features:
    """The token columns a split's rows are mapped to (see the module docstring)."""
    ids = _LIST(datasets.Value("int32"))
    if cfg.get("format") == "sft":
        return datasets.Features({"input_ids": ids, "labels": ids, "length": datasets.Value("int32"),
                                  "cut": datasets.Value("bool"), "need": datasets.Value("int32")})
    features = {"input_ids": ids, "attention_mask": _LIST(datasets.Value("int8"))}
    if "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
        features["token_type_ids"] = _LIST(datasets.Value("int8"))
    if cfg.get("task") == "classification" and "label_field" in columns_of(cfg):
        features["labels"] = datasets.Value("float32" if is_regression(cfg) else "int64")
    features["length"] = datasets.Value("int32")
    return datasets.Features(features)


def tokenise_fn(cfg: Mapping[str, Any], tokenizer: Any, features: datasets.Features):
    """The ``Dataset.map`` function: a batch of rows -> its token columns."""
    if cfg.get("format") == "sft":
        return lambda batch: sft_tokens.encode_columns([json.loads(r) for r in batch["row"]], cfg, tokenizer)
    max_length = int(cfg.get("max_length", 128))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        # a pair is truncated longest-first: tokens come off the longer side, so both sides survive
        encoded = tokenizer(batch["text"], batch.get("text_pair"), truncation="longest_first", max_length=max_length)
        out = {key: encoded[key] for key in features if key in encoded}
        if "labels" in features:
            out["labels"] = batch["label"]
        out["length"] = [len(ids) for ids in encoded["input_ids"]]
        return out

    return encode


def _source(cfg: Mapping[str, Any], split: str, path: Path | None) -> str:
    if cfg.get("format") == "hf":
        return "hf:" + _hf_dataset(cfg, split)._fingerprint
    return f"file:{path.suffix.lower()}:{file_digest(path)}"


def load_split(cfg: Mapping[str, Any], split: str, tokenizer: Any, tokenizer_fp: str, cache: DataCache,
               path: Path | None) -> SplitData:
    """Read, check and tokenise one split (``path``: its file; None for ``format: hf``), or reuse the cache's entry.

    Raises:
        ValueError: As the format's reader does, naming the file, the row and the fix.
    """
    key = cache_key(_source(cfg, split, path), tokenizer_fp, cfg)
    features = token_features(cfg, tokenizer)

    def build(folder: Path) -> dict[str, Any]:
        count = _write_rows(split_records(cfg, split, path, tokenizer), _row_schema(cfg), folder / "rows.arrow")
        rows = datasets.Dataset.from_file(str(folder / "rows.arrow"))
        if not count:  # map writes nothing for no rows: an empty table with the token columns
            _write_rows([], features.arrow_schema, folder / "tokens.arrow")
            return {"rows": 0, "source": str(path or cfg.get("hf_name")), "format": cfg.get("format")}
        rows.map(tokenise_fn(cfg, tokenizer, features), batched=True, batch_size=BLOCK, writer_batch_size=BLOCK,
                 remove_columns=rows.column_names, features=features, new_fingerprint=key,
                 cache_file_name=str(folder / "tokens.arrow"), desc=f"tokenising {path or cfg.get('hf_name')}")
        return {"rows": count, "source": str(path or cfg.get("hf_name")), "format": cfg.get("format")}

    folder, meta = cache.entry(key, build)
    return SplitData(datasets.Dataset.from_file(str(folder / "rows.arrow")),
                     datasets.Dataset.from_file(str(folder / "tokens.arrow")), meta)
