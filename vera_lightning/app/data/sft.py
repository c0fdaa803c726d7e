"""Prompt/response and chat data for causal LMs (``data.format: sft``): reading rows, formatting prompts.

A row is either a prompt and a response (``prompt_field`` + ``response_field``, optionally through
``prompt_template``, a format string over the row's columns) or a conversation (``messages_field``:
a list of ``{"role": "system"|"user"|"assistant", "content": str}`` turns, JSONL or a JSON string in a
CSV cell). Files are CSV, TSV or JSONL, chosen by extension; a UTF-8 BOM is ignored.

* **Prompt text** (:func:`format_prompt`) is what generation feeds the model: the template (or the
  prompt column), wrapped in the tokenizer's chat template as a user turn after an optional
  ``system_prompt`` when ``chat_template: true`` (``add_generation_prompt=True``). Training uses the same
  text, tokenised the same way (:func:`prompt_token_ids`), so generation after training sees exactly
  the prompt tokens training saw.
* **Responses** (:func:`reference_of`) are the response column, or a conversation's last assistant turn;
  rows sharing a prompt are its references (:func:`prompt_references`).

Tokenising with label masks (EOS, -100 on the prompt) and truncating: :mod:`vera_lightning.app.data.sft_tokens`.

Rows are numbered from 1: the first data row after a CSV/TSV header is row 1; a JSONL row is its
line number (blank lines skipped but counted).
"""

from __future__ import annotations

import csv
import json
import re
import string
from pathlib import Path
from typing import Any, Mapping, Optional

from vera_lightning.app.data.tables import check_header_names, check_row_width
from vera_lightning.app.data.text_files import undecodable_line

__all__ = ["ROLES", "TRUNCATIONS", "SUFFIXES", "check_config", "read_rows", "with_system", "prompt_turns",
           "conversation", "check_special_text", "format_prompt", "template_text",
           "encode_text", "prompt_token_ids", "reference_of", "prompt_references",
           "position_limit", "check_max_length"]

ROLES = ("system", "user", "assistant")
TRUNCATIONS = ("left", "drop")
SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None}


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def template_text(template: str) -> str:
    """``prompt_template`` with the escapes ``\\n`` (newline), ``\\t`` (tab) and ``\\\\`` (a backslash) applied.

    Hydra keeps a backslash in an override (``'data.prompt_template="Q: {prompt}\\n"'`` arrives as ``Q: {prompt}``
    plus a backslash and an ``n``), so a template written that way gets the newline it means; a YAML file's
    ``"...\\n"`` is already a newline and is unchanged.
    """
    return re.sub(r"\\(n|t|\\)", lambda m: _ESCAPES[m.group(1)], template)


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


def _table_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    delimiter = SUFFIXES[path.suffix.lower()]
    with path.open(encoding="utf-8-sig", newline="") as handle:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # as GLUE TSVs (bare quotes)
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        header = list(reader.fieldnames or [])
        check_header_names(path, header)
        rows = list(reader)
    for number, row in enumerate(rows, start=1):
        check_row_width(path, f"{path}, row {number}", row, header)
    return header, rows


def _jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, row {number}: not a JSON object ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, row {number}: a JSONL row must be an object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


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
            header and the option), an empty response, an unknown role, bad JSON or text that is not UTF-8.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: data.format=sft reads {', '.join(SUFFIXES)} files (chosen by extension)")
    columns = _columns(data_cfg, responses)
    try:
        if SUFFIXES[path.suffix.lower()] is None:
            numbered = _jsonl_rows(path)
        else:
            header, table = _table_rows(path)
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{path}: column(s) {missing} not in the header {header}; set "
                                 + ", ".join(f"{columns[c]} (now naming {c!r})" for c in missing))
            numbered = list(enumerate(table, start=1))
    except UnicodeDecodeError as err:
        raise undecodable_line(path, err) from None
    messages, response = data_cfg.get("messages_field"), data_cfg.get("response_field")
    rows = []
    for number, row in numbered:
        where = f"{path}, row {number}"
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
        rows.append(row)
    return rows


def check_special_text(rows: list[Mapping[str, Any]], data_cfg: Mapping[str, Any], tokenizer: Any, where: str) -> None:
    """Refuse a row whose prompt or response text holds one of the tokenizer's special tokens as text.

    The tokenizer reads ``</s>`` or ``<|im_end|>`` in a text as that token, so a response would end there (the rest
    trained after an EOS) and a prompt would close its turn early.

    Raises:
        ValueError: Naming ``where``, the row, the column and the token.
    """
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t.strip()},
                      key=len, reverse=True)
    if not specials:
        return
    messages = data_cfg.get("messages_field")
    for number, row in enumerate(rows, start=1):
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


def with_system(cfg: Mapping[str, Any], turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """``turns`` after a ``system_prompt`` turn, unless unset or the conversation opens with its own."""
    system = cfg.get("system_prompt")
    if system and (not turns or turns[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *turns]
    return list(turns)


def _user_text(cfg: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    template = cfg.get("prompt_template")
    if not template:
        return str(row[cfg["prompt_field"]])
    try:
        return template_text(template).format(**row)
    except (KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"data.prompt_template={template!r} names {err} which the row does not hold (it has "
                         f"{sorted(row)})") from None


def prompt_turns(cfg: Mapping[str, Any], row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat turns before the final response (with ``system_prompt`` first when set)."""
    if cfg.get("messages_field"):
        turns = row[cfg["messages_field"]]
        return with_system(cfg, turns[:-1] if turns and turns[-1]["role"] == "assistant" else turns)
    return with_system(cfg, [{"role": "user", "content": _user_text(cfg, row)}])


def conversation(cfg: Mapping[str, Any], row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The whole training conversation of a row (chat formatting): prompt turns and response turn(s)."""
    if cfg.get("messages_field"):
        return with_system(cfg, row[cfg["messages_field"]])
    return prompt_turns(cfg, row) + [{"role": "assistant", "content": str(row[cfg["response_field"]])}]


def format_prompt(data_cfg: Mapping[str, Any], tokenizer: Any, row: Mapping[str, Any]) -> str:
    """The exact text generation feeds the model for ``row`` (no response, no EOS).

    With ``chat_template`` the tokenizer's template with ``add_generation_prompt=True`` (a conversation
    up to its last assistant turn); otherwise the template or prompt column, as is. Tokenise it with
    :func:`prompt_token_ids` (which adds the tokenizer's leading special tokens, as training does).
    """
    if data_cfg.get("chat_template"):
        return tokenizer.apply_chat_template(prompt_turns(data_cfg, row), tokenize=False, add_generation_prompt=True)
    return _user_text(data_cfg, row)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_specials(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS, ``[CLS]``; none for GPT-2/SmolLM2)."""
    plain, full = encode_text(tokenizer, "a"), list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def prompt_token_ids(data_cfg: Mapping[str, Any], tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a :func:`format_prompt` text, exactly as training has them before the response.

    A chat-template text is tokenised without added special tokens (the template writes its own); a plain
    prompt gets the tokenizer's leading special tokens (e.g. a BOS) and none at its end.
    """
    if data_cfg.get("chat_template"):
        return encode_text(tokenizer, prompt)
    return _leading_specials(tokenizer) + encode_text(tokenizer, prompt)


def reference_of(data_cfg: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The text a generation for ``row`` is scored against: its response, or its last assistant turn."""
    if data_cfg.get("messages_field"):
        return row[data_cfg["messages_field"]][-1]["content"]
    return str(row[data_cfg["response_field"]])


def prompt_references(rows: list[Mapping[str, Any]], data_cfg: Mapping[str, Any], tokenizer: Any) -> list[dict]:
    """``[{"prompt", "references"}]``: distinct prompts in first-appearance order, each with every reference."""
    grouped: dict[str, list[str]] = {}
    for row in rows:
        grouped.setdefault(format_prompt(data_cfg, tokenizer, row), []).append(reference_of(data_cfg, row))
    return [{"prompt": prompt, "references": refs} for prompt, refs in grouped.items()]


def position_limit(model: Any = None, tokenizer: Any = None) -> Optional[int]:
    """The most positions the model (config) and tokenizer accept; None when neither says."""
    config = getattr(model, "config", None)
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "max_sequence_length")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 10**7]  # tokenizers say 1e30 for "unset"
    return min(limits) if limits else None


def check_max_length(data_cfg: Mapping[str, Any], limit: Optional[int]) -> None:
    """Refuse a ``data.max_length`` longer than the model's positions (``limit``, see :func:`position_limit`)."""
    max_length = data_cfg.get("max_length")
    if limit is not None and max_length is not None and int(max_length) > limit:
        raise ValueError(f"data.max_length={max_length} exceeds the model's {limit} positions; set "
                         f"data.max_length={limit} or less")
