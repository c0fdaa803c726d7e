"""Prompt/response and chat rows for causal LMs (``data.format: sft``): reading them and checking them.

A row is either a prompt and a response (``prompt_field`` + ``response_field``, optionally through
``prompt_template``, a format string over the row's columns) or a conversation (``messages_field``:
a list of ``{"role": "system"|"user"|"assistant", "content": str}`` turns, JSONL or a JSON string in a
CSV cell). Files are CSV, TSV or JSONL, chosen by extension and read by
:func:`~vera_lightning.app.data.tables.read_records`: a UTF-8 BOM is ignored, a JSONL row is one ``\\n``-separated
line, and bytes that are not UTF-8 are named by file, line and offset.

* :func:`check_config` refuses an inconsistent ``data`` config before any file is read.
* :func:`read_rows` reads and checks every row: the columns it needs (a CSV/TSV row with too few fields is told
  so, not sent to ``data.response_field``), responses and prompts that are not empty, conversations in order.
* :func:`check_special_text` refuses text holding one of the tokenizer's special tokens.

Formatting rows into prompts and references: :mod:`vera_lightning.app.data.sft`.

Rows are numbered from 1: the first data row after a CSV/TSV header is row 1; a JSONL row is its
line number (blank lines skipped but counted).
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from vera_lightning.app.data.tables import SUFFIXES, check_row_complete, iter_records, records_header

__all__ = ["ROLES", "TRUNCATIONS", "SUFFIXES", "check_config", "read_rows", "iter_rows", "check_special_text"]

ROLES = ("system", "user", "assistant")
TRUNCATIONS = ("left", "drop")


def _template_columns(template: str) -> list[str]:
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ValueError(f"data.prompt_template={template!r}: {err}; write columns as {{column}} and "
                         "a literal brace as {{ or }}") from None
    if any(not field or field[0].isdigit() for field in fields):
        raise ValueError(f"data.prompt_template={template!r}: name the columns, e.g. 'Describe: {{mr}}\\n'")
    return [re.split(r"[.\[]", field, maxsplit=1)[0] for field in fields]


def _columns(cfg: Mapping[str, Any], responses: bool) -> dict[str, str]:
    """``{column: option naming it}`` that every row must hold."""
    if cfg.get("messages_field"):
        return {cfg["messages_field"]: "data.messages_field"}
    columns = {}
    if cfg.get("prompt_template"):
        columns.update({c: "data.prompt_template" for c in _template_columns(cfg["prompt_template"])})
    else:
        columns[cfg["prompt_field"]] = "data.prompt_field"
    if responses:
        columns[cfg["response_field"]] = "data.response_field"
    return columns


def check_config(cfg: Mapping[str, Any], tokenizer: Any) -> None:
    """Refuse an inconsistent ``format: sft`` config before any file is read, listing every problem.

    Raises:
        ValueError: Naming each option, its value and the fix.
    """
    problems = []
    messages, prompt, response = cfg.get("messages_field"), cfg.get("prompt_field"), cfg.get("response_field")
    if (messages and (prompt or response)) or (not messages and not (prompt and response)):
        problems.append(f"data.messages_field={messages!r}, data.prompt_field={prompt!r}, data.response_field="
                        f"{response!r}: set either both prompt_field and response_field, or messages_field alone (with "
                        "data.prompt_field=null data.response_field=null)")
    if messages and cfg.get("prompt_template"):
        problems.append("data.prompt_template applies to prompt/response rows; with data.messages_field the chat "
                        "template formats the turns: set data.prompt_template=null")
    if cfg.get("system_prompt") and not cfg.get("chat_template"):
        problems.append(f"data.system_prompt={cfg.get('system_prompt')!r} is a system turn of the chat template, "
                        "but data.chat_template=false: set data.chat_template=true, or put the text in "
                        "data.prompt_template and set data.system_prompt=null")
    if messages and not cfg.get("chat_template"):
        problems.append(f"data.messages_field={messages!r} needs the tokenizer's chat template: set "
                        "data.chat_template=true")
    if cfg.get("chat_template") and not getattr(tokenizer, "chat_template", None):
        problems.append(f"data.chat_template=true but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')!r}) "
                        "has no chat template: set data.chat_template=false (and a data.prompt_template), or use a "
                        "chat model's tokenizer")
    if cfg.get("prompt_template"):
        try:
            _template_columns(cfg["prompt_template"])
        except ValueError as err:
            problems.append(str(err))
    if cfg.get("truncation", "left") not in TRUNCATIONS:
        problems.append(f"data.truncation={cfg.get('truncation')!r}: must be one of {list(TRUNCATIONS)}")
    if getattr(tokenizer, "eos_token_id", None) is None and getattr(tokenizer, "sep_token_id", None) is None:
        problems.append("the tokenizer has no EOS (or SEP) token to end each response; use a causal-LM tokenizer")
    if problems:
        raise ValueError("Invalid data config (format: sft):\n  - " + "\n  - ".join(problems))


def _conversation(value: Any, where: str, option: str, responses: bool) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: {option} is not a JSON list of turns ({err})") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {option} must be a non-empty list of {{'role', 'content'}} turns, got "
                         f"{type(value).__name__}")
    turns = []
    for i, turn in enumerate(value, start=1):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise ValueError(f"{where}: turn {i} of {option} has role {role!r}; roles must be one of {list(ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: turn {i} of {option} has no text 'content'")
        turns.append({"role": role, "content": turn["content"]})
    spoken = [(i, turn) for i, turn in enumerate(turns, start=1) if turn["role"] != "system"]
    if not spoken:
        raise ValueError(f"{where}: {option} holds only system turns; a conversation needs a user turn")
    if spoken[0][1]["role"] == "assistant":
        raise ValueError(f"{where}: turn {spoken[0][0]} of {option} is an assistant turn before any user turn; a "
                         "conversation starts with a user turn (after optional system turns): fix or drop the row")
    for i, turn in spoken[:-1]:
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise ValueError(f"{where}: turn {i} of {option} is an empty assistant turn; every assistant turn is "
                             "trained on: fill it or drop the row")
    if responses and turns[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last turn of {option} is a {turns[-1]['role']!r} turn; a training "
                         "conversation must end with the assistant's response")
    if responses and not turns[-1]["content"].strip():
        raise ValueError(f"{where}: empty response (the last assistant turn of {option}); fill or drop the row")
    if not responses and turns[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the last turn of {option} is an assistant turn; generation continues a "
                         "conversation that ends with a user turn: drop the final assistant turn (or give the row's "
                         "next user turn)")
    return turns


def read_rows(path: Path | str, data_cfg: Mapping[str, Any], *, responses: bool = True) -> list[dict[str, Any]]:
    """Read a CSV/TSV/JSONL file (by extension) into row dicts, checked against ``data_cfg``.

    Args:
        path: The file.
        data_cfg: The ``data`` config (``prompt_field``/``response_field``/``prompt_template`` or
            ``messages_field``).
        responses: Whether rows must hold a response (False for prompts to generate from: no response
            column, conversations may end with a user turn).

    Returns:
        Every row with all its columns; a conversation column parsed into ``[{"role", "content"}]``.

    Raises:
        ValueError: Naming the file (and 1-based row) for an unknown extension, a missing column (with the
            header and the option), a CSV/TSV row with too few fields, an empty response, an unknown role, bad
            JSON, or the line and offset of bytes that are not UTF-8.
    """
    return list(iter_rows(path, data_cfg, responses=responses))


def iter_rows(path: Path | str, data_cfg: Mapping[str, Any], *, responses: bool = True) -> Iterator[dict[str, Any]]:
    """The rows of :func:`read_rows`, streamed: checked one at a time, never the whole file in memory.

    Raises:
        ValueError: As :func:`read_rows`; a bad header before any row, a bad row when it is reached.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: data.format=sft reads {', '.join(SUFFIXES)} files (chosen by extension)")
    columns = _columns(data_cfg, responses)
    header = records_header(path)
    if header is not None:
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} not in the header {header}; set "
                             + ", ".join(f"{columns[c]} (now naming {c!r})" for c in missing))
    messages, response = data_cfg.get("messages_field"), data_cfg.get("response_field")
    for number, row in iter_records(path):
        where = f"{path}, row {number}"
        if header is not None:  # a CSV/TSV row lacks a field only when it is too short
            check_row_complete(path, where, row, header, columns)
        absent = [c for c in columns if row.get(c) is None]
        if absent:
            raise ValueError(f"{where}: no {absent} (the row has {sorted(row)}); set "
                             + ", ".join(f"{columns[c]} (now naming {c!r})" for c in absent))
        row = dict(row)
        if messages:
            row[messages] = _conversation(row[messages], where, f"data.messages_field={messages!r}", responses)
        elif responses and not isinstance(row[response], str):
            raise ValueError(f"{where}: the response in column {response!r} (data.response_field) is "
                             f"{json.dumps(row[response])}, not a string; write it as a JSON string or drop the row")
        elif responses and not row[response].strip():
            raise ValueError(f"{where}: empty response in column {response!r} (data.response_field); fill or drop "
                             "the row")
        if not messages and not data_cfg.get("prompt_template") and not str(row[data_cfg["prompt_field"]]).strip() \
                and not responses:
            raise ValueError(f"{where}: empty prompt in column {data_cfg['prompt_field']!r} (data.prompt_field); "
                             "fill or drop the row")
        yield row


def check_special_text(rows: Iterable[Mapping[str, Any]], data_cfg: Mapping[str, Any], tokenizer: Any, where: str,
                       start: int = 1) -> None:
    """Refuse a row whose prompt or response text holds one of the tokenizer's special tokens as text.

    The tokenizer reads ``</s>`` or ``<|im_end|>`` in a text as that token, so a response would end there (the rest
    trained after an EOS) and a prompt would close its turn early.

    Raises:
        ValueError: Naming ``where``, the row (``rows``' first is row ``start``), the column and the token.
    """
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t.strip()},
                      key=len, reverse=True)
    if not specials:
        return
    messages = data_cfg.get("messages_field")
    for number, row in enumerate(rows, start=start):
        if messages:
            texts = [(f"turn {i} of {messages!r}", turn["content"]) for i, turn in enumerate(row[messages], start=1)]
        else:
            texts = [(f"column {key!r}", str(value)) for key, value in row.items()
                     if key in _columns(data_cfg, False) or key == data_cfg.get("response_field")]
        for name, text in texts:
            found = next((token for token in specials if token in text), None)
            if found is not None:
                raise ValueError(f"{where}, row {number}: {name} holds {found!r}, the tokenizer's special token, as "
                                 "text; the model would read it as that token (a response would end there). Remove "
                                 "it from the data")

