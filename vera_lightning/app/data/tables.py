"""Reading GLUE-style tables: the configured columns (text, optional text pair, label), labels as class ids
or floats (regression), and one clear error naming the file, the column, the header and the option to set.
A row with too few columns is named with its line (:func:`check_row_complete`); a row with more fields than the
header (an unquoted comma, a quoted tab in a TSV) and a header naming a column twice are refused
(:func:`check_header_names`, :func:`check_row_width`), never read with the extra text dropped; a UTF-8 byte-order
mark (Excel, Notepad) is not part of the first column's name, and bytes that are not UTF-8 are named by file, line
and offset (:func:`~vera_lightning.app.data.text_files.undecodable_line`).

:func:`read_records` reads every column of a ``.csv``/``.tsv``/``.tab``/``.jsonl`` file with the same checks, for
the prompt/response reader and predict's inputs; a JSONL row is one ``\\n``-separated line.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from vera_lightning.app.data.text_files import iter_lines, undecodable_line

__all__ = ["COLUMN_OPTIONS", "SUFFIXES", "is_regression", "columns_of", "parse_label", "check_labels",
           "check_header_names", "check_row_width", "check_row_complete", "check_columns", "read_table", "iter_table",
           "read_records", "records_header", "iter_records"]

#: The table files :func:`read_records` reads, by extension: their field separator (None: JSON lines).
SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None}

#: data.<option> -> the record key its column fills.
COLUMN_OPTIONS = {"text_field": "text", "text_pair_field": "text_pair", "label_field": "label"}


def is_regression(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("problem_type") == "regression"


def columns_of(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{option: column}`` for the columns a ``data`` config reads (labels only for labelled tasks)."""
    columns = {"text_field": cfg.get("text_field") or "sentence"}
    if cfg.get("text_pair_field"):
        columns["text_pair_field"] = cfg["text_pair_field"]
    if cfg.get("task") == "classification" and cfg.get("label_field"):
        columns["label_field"] = cfg["label_field"]
    return columns


def parse_label(value: Optional[str], regression: bool, where: str, column: str) -> Any:
    try:
        label = float(value) if regression else int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        kind = "a number" if regression else "an integer class id; convert the labels to 0..num_labels-1"
        raise ValueError(f"{where}: label {value!r} in column {column!r} is not {kind}") from None
    if regression and not math.isfinite(label):
        raise ValueError(f"{where}: label {value!r} in column {column!r} is not finite; fix or drop that row")
    return label


def check_labels(cfg: Mapping[str, Any], split: str, labels: Any) -> None:
    """Refuse class ids outside ``0..num_labels-1`` (and ``num_labels`` other than 1 for regression).

    Raises:
        ValueError: Naming the setting, the bad labels and the fix.
    """
    if is_regression(cfg):
        if cfg.get("num_labels") not in (None, 1):
            raise ValueError(
                f"data.problem_type='regression' predicts one value but data.num_labels="
                f"{cfg.get('num_labels')!r}; set data.num_labels=1"
            )
        return  # float labels, checked finite when read
    num_labels = int(cfg.get("num_labels") or 0)
    bad = sorted({int(label) for label in labels if not 0 <= label < num_labels})
    if bad:
        raise ValueError(
            f"data.num_labels={num_labels} but the {split} split has labels {bad[:5]}; set data.num_labels to "
            "the number of classes (labels must be 0..num_labels-1)"
        )


def _reader_delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _reader(path: Path, handle) -> csv.DictReader:
    delimiter = _reader_delimiter(path)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # GLUE TSVs contain bare quotes
    return csv.DictReader(handle, delimiter=delimiter, quoting=quoting)


def check_header_names(path: Path, header: list[str]) -> None:
    """Refuse a header that names a column twice (the later column would silently replace the earlier one).

    Raises:
        ValueError: Naming the file and the repeated names.
    """
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: the header names the column(s) {repeated} more than once ({header}); give every "
                         "column its own name")


def check_row_width(path: Path, where: str, row: Mapping[Any, Any], header: list[str]) -> None:
    """Refuse a ``csv.DictReader`` row with more fields than the header (its extra fields are under the key None).

    Raises:
        ValueError: Naming the file and row (``where``), the number of fields and of columns.
    """
    extra = row.get(None)
    if extra:
        separator = ("a tab inside a field (a TSV has no quoting: replace it)" if _reader_delimiter(path) == "\t"
                     else "an unquoted comma (quote fields that contain one)")
        raise ValueError(f"{where}: the row has {len(header) + len(extra)} fields but the header has {len(header)} "
                         f"columns ({header}); the extra text starts at {extra[0]!r}. Look for {separator}, or fix or "
                         "drop that row")


def _check_header(path: Path, header: list[str], columns: Mapping[str, str]) -> None:
    check_header_names(path, header)
    missing = {option: column for option, column in columns.items() if column not in header}
    if missing:
        raise ValueError(
            f"{path}: column(s) {list(missing.values())} not in the header {header}; set "
            + ", ".join(f"data.{option} (now {column!r})" for option, column in missing.items())
            + " to the right column names"
        )


def check_row_complete(path: Path, where: str, row: Mapping[Any, Any], header: list[str],
                       columns: Iterable[str]) -> None:
    """Refuse a ``csv.DictReader`` row too short to hold ``columns`` (the fields it lacks are None).

    Raises:
        ValueError: Naming the file and row (``where``), the number of fields and of columns, and the fix.
    """
    absent = [column for column in columns if row.get(column) is None]
    if absent:
        fields = sum(value is not None for key, value in row.items() if key is not None)
        separator = "tabs" if _reader_delimiter(path) == "\t" else "commas (quote fields that contain one)"
        raise ValueError(
            f"{where}: the row has too few columns ({fields} of the header's {len(header)}: {header}), so it has "
            f"no {absent} field; separate the fields with {separator}, or fix or drop that row"
        )


def check_columns(cfg: Mapping[str, Any], directory: Path) -> None:
    """Check from the headers alone that the table files present in ``directory`` hold the configured columns.

    Lets a mistyped ``text_field``/``text_pair_field``/``label_field`` stop a run before any work;
    a file that is absent is reported when its split is read.

    Raises:
        ValueError: As :func:`read_table` does for a missing column.
    """
    for split in ("train", "val"):
        path = directory / str(cfg.get(f"{split}_file"))
        if cfg.get(f"{split}_file") and path.is_file():
            try:
                with path.open(encoding="utf-8-sig", newline="") as handle:
                    header = _reader(path, handle).fieldnames or []
            except UnicodeDecodeError as err:  # the codec decodes ahead of the header, so any line can raise
                raise undecodable_line(path, err) from None
            _check_header(path, header, columns_of(cfg))


def read_table(path: Path, columns: Mapping[str, str], regression: bool = False) -> list[dict[str, Any]]:
    """Read a ``.tsv``/``.csv`` file with a header into records (every row of :func:`iter_table`)."""
    return list(iter_table(path, columns, regression))


def iter_table(path: Path, columns: Mapping[str, str], regression: bool = False) -> Iterator[dict[str, Any]]:
    """The records of a ``.tsv``/``.csv`` file with a header, streamed (one row in memory at a time).

    Args:
        path: The file.
        columns: ``{data option: column name}`` (see :data:`COLUMN_OPTIONS`).
        regression: Parse labels as floats instead of integer class ids.

    Raises:
        ValueError: Naming the file, each missing column with its option, and the header; the line of a row
            with too few or too many columns; or the file, line and byte of text that is not UTF-8.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = _reader(path, handle)
            header = reader.fieldnames or []
            _check_header(path, header, columns)
            for line, row in enumerate(reader, start=2):
                check_row_width(path, f"{path}:{line}", row, header)
                check_row_complete(path, f"{path}:{line}", row, header, columns.values())
                record: dict[str, Any] = {}
                for option, column in columns.items():
                    key = COLUMN_OPTIONS[option]
                    value = row[column]
                    record[key] = parse_label(value, regression, f"{path}:{line}", column) if key == "label" else value
                yield record
    except UnicodeDecodeError as err:
        raise undecodable_line(path, err) from None


def read_records(path: Path) -> tuple[Optional[list[str]], list[tuple[int, dict[str, Any]]]]:
    """Every row of a ``.csv``/``.tsv``/``.tab``/``.jsonl`` file (by extension), with all its columns.

    Rows are numbered from 1: the first data row after a CSV/TSV header is row 1; a JSONL row is its line number
    (blank lines skipped but counted). A CSV/TSV row shorter than the header keeps None in the fields it lacks:
    check the columns you need with :func:`check_row_complete`.

    Returns:
        ``(header, [(number, row)])``; the header is None for JSONL.

    Raises:
        ValueError: Naming the file (and row) for an unknown extension, a repeated header name, a row with more
            fields than the header, a JSONL line that is not a JSON object, or bytes that are not UTF-8.
    """
    return records_header(path), list(iter_records(path))


def records_header(path: Path) -> Optional[list[str]]:
    """The header of a ``.csv``/``.tsv``/``.tab`` file (checked: no name twice); None for ``.jsonl``.

    Raises:
        ValueError: As :func:`read_records`.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: reads {', '.join(SUFFIXES)} files (chosen by extension)")
    if SUFFIXES[suffix] is None:
        return None
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = list(_reader(path, handle).fieldnames or [])
    except UnicodeDecodeError as err:
        raise undecodable_line(path, err) from None
    check_header_names(path, header)
    return header


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The ``(number, row)`` pairs of :func:`read_records`, streamed (one row in memory at a time).

    Raises:
        ValueError: As :func:`read_records`, when the row at fault is reached.
    """
    header = records_header(path)
    if header is None:
        for number, line in enumerate(iter_lines(path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, row {number}: not a JSON object ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, row {number}: a JSONL row must be an object, got {type(row).__name__}")
            yield number, row
        return
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            for number, row in enumerate(_reader(path, handle), start=1):
                check_row_width(path, f"{path}, row {number}", row, header)
                yield number, row
    except UnicodeDecodeError as err:
        raise undecodable_line(path, err) from None
