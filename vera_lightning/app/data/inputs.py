"""What ``scripts/predict.py`` reads from ``input=FILE``, read and checked in full before any model is built.

* Classification (:func:`read_inputs`): a ``.tsv``/``.csv`` column ``data.text_field`` (and
  ``data.text_pair_field`` for sentence pairs), else one sentence per line (blank lines skipped).
* Causal LM (:func:`read_prompt_input`): with prompt/response data (``data.format=sft``) a
  ``.csv``/``.tsv``/``.jsonl`` holding the data group's prompt column(s), or one prompt per line filling
  ``data.prompt_field`` (or the user turn of a ``messages_field`` conversation); with plain text data the
  ``data.text_field`` column, or the lines as they are. An empty prompt and a conversation ending with an
  assistant turn are refused (:func:`~vera_lightning.app.data.sft_rows.read_rows`).

Tables are read as training reads them: a header naming a column twice, or a row with more or fewer fields than
the header, is refused naming the file and row (:mod:`~vera_lightning.app.data.tables`).

Lines are split on ``\\n`` only (a CRLF file's ``\\r`` dropped), so each output row is one input line: U+2028, a
form feed or another character ``str.splitlines`` treats as a break stays inside its row. A UTF-8 byte-order mark
is not part of the first example, and bytes that are not UTF-8 are refused naming the file, line and byte offset
(:mod:`~vera_lightning.app.data.text_files`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

from vera_lightning.app.data import sft, sft_rows
from vera_lightning.app.data.tables import check_row_complete, read_records, read_table
from vera_lightning.app.data.text_files import read_lines

__all__ = ["TABLES", "Example", "read_inputs", "PromptInput", "read_prompt_input"]

#: Input suffixes read as tables (the rest: one example per line).
TABLES = (".csv", ".tsv", ".tab", ".jsonl")

#: One input example: a text, or a ``(text, text_pair)`` pair.
Example = Union[str, tuple[str, str]]


def read_inputs(path: Path, text_field: str, pair_field: Optional[str] = None) -> list[Example]:
    """The examples of ``path``: ``.tsv``/``.csv`` column ``text_field`` (and ``pair_field``), else one per line.

    Returns:
        One entry per example: the text, or ``(text, text_pair)`` when ``pair_field`` is given.

    Raises:
        ValueError: If a pair task gets a plain text file, or a column is missing (naming the option), or the
            file, line and byte offset of bytes that are not UTF-8.
    """
    table = path.suffix.lower() in (".tsv", ".tab", ".csv")
    if pair_field:
        if not table:
            raise ValueError(
                f"input={str(path)!r}: data.text_pair_field={pair_field!r} makes this a sentence-pair task, which "
                f"needs a .tsv/.csv input with a header holding the columns {text_field!r} and {pair_field!r}"
            )
        records = read_table(path, {"text_field": text_field, "text_pair_field": pair_field})
        return [(record["text"], record["text_pair"]) for record in records]
    if table:
        return [record["text"] for record in read_table(path, {"text_field": text_field})]
    return [line for line in read_lines(path) if line.strip()]


class PromptInput(NamedTuple):
    """A causal-LM input file: ``echo[i]`` is written with prompt ``i``'s generation.

    ``rows`` (prompt/response data): the rows to format with :func:`~vera_lightning.app.data.sft.format_prompt`
    once the tokenizer exists; ``prompts`` (plain text data): the prompt texts themselves.
    """

    echo: list[dict[str, Any]]
    rows: Optional[list[dict[str, Any]]]
    prompts: Optional[list[str]]


def read_prompt_input(path: Path, data_cfg: Mapping[str, Any]) -> PromptInput:
    """Read a causal-LM input file (see the module docstring), checking it before any model is built.

    Raises:
        ValueError: Naming the file, row and option for a missing column or empty text, or a text file
            whose lines cannot fill ``data.prompt_template``.
    """
    table = path.suffix.lower() in TABLES
    if data_cfg.get("format") == "sft":
        if table:
            rows = sft_rows.read_rows(path, data_cfg, responses=False)
            return PromptInput(rows, rows, None)
        messages, field = data_cfg.get("messages_field"), data_cfg.get("prompt_field")
        lines = read_inputs(path, "text")
        rows = [{messages: [{"role": "user", "content": line}]} if messages else {field: line} for line in lines]
        if rows and not messages:
            try:  # a template naming other columns cannot be filled from a line: say so before any work
                sft.format_prompt({**data_cfg, "chat_template": False}, None, rows[0])
            except ValueError as err:
                raise ValueError(f"input={str(path)!r}: each line of a text file fills data.prompt_field={field!r} "
                                 f"only, but {err}; give a .csv/.tsv/.jsonl holding those columns") from None
        return PromptInput([{"prompt": line} for line in lines], rows, None)
    column = str(data_cfg.get("text_field") or "text")
    if not table:
        lines = read_inputs(path, column)
        return PromptInput([{"prompt": line} for line in lines], None, lines)
    header, numbered = read_records(path)
    for number, row in numbered:
        if header is not None:
            check_row_complete(path, f"{path}, row {number}", row, header, [column])
        if not str(row.get(column) or "").strip():
            raise ValueError(f"{path}, row {number}: no text in column {column!r} (data.text_field); the row has "
                             f"{sorted(row)}")
    rows = [row for _, row in numbered]
    return PromptInput(rows, None, [row[column] for row in rows])
