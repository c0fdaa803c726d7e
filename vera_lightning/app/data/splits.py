"""Where a ``data/`` config's splits are: the data folder, each split's file, reading a split as a list of records, and
deterministic subsampling (``max_train_samples``/``max_val_samples`` with ``seed``).

:func:`read_split` reads a whole split into a list (small data, tests); the DataModule streams the same readers into
Arrow instead (:mod:`~vera_lightning.app.data.arrow_splits`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Optional

from vera_lightning.app.data import sft_rows
from vera_lightning.app.data.arrow_splits import hf_records
from vera_lightning.app.data.tables import columns_of, is_regression, read_table
from vera_lightning.app.data.text_files import read_lines

__all__ = ["DEMO_DIR", "FORMATS", "data_dir_of", "split_file", "read_split", "subsample"]

#: The built-in demo data (the project's own sentences, see ``tools/make_demo_data.py``).
DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
FORMATS = ("table", "text", "hf", "sft")


def data_dir_of(cfg: Mapping[str, Any]) -> Path:
    """The folder holding the split files (``data.data_dir``; null: the built-in demo data), checked to exist."""
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
    path = data_dir_of(cfg) / cfg[f"{split}_file"]
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
