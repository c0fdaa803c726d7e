"""Preference pairs for DPO (``data.format: preference``): reading, checking and tokenising chosen/rejected pairs.

Two row layouts (``data.preference_format``), in ``.jsonl``/``.csv``/``.tsv`` files:

* ``pairs``: ``prompt_field``, ``chosen_field`` and ``rejected_field`` per row. The prompt is a string (a user turn)
  or a list of ``{"role", "content"}`` turns; each response is a string or a one-turn list
  ``[{"role": "assistant", "content": ...}]``. With ``prompt_field: null`` the prompt is implicit: chosen and
  rejected are whole conversations (lists of turns) that share every turn but the last assistant turn.
* ``hh``: Anthropic HH-RLHF's raw transcripts, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` in ``chosen_field`` and
  ``rejected_field``. Each is split into chat turns; the turns both share are the prompt, the final assistant turns
  are the chosen and the rejected response.

Every row is checked when read (:func:`read_pairs`): missing fields, empty responses, chosen identical to rejected,
no shared prompt, a malformed transcript (no turn markers, two turns of one speaker in a row, not ending with the
assistant), special-token text. A problem names the file, the row and the fix; ``skip_invalid_rows: true`` drops
such rows instead, with one warning counting them.

Tokens (:func:`encode_pairs`): with ``chat_template: true`` the prompt turns and each response are rendered by the
tokenizer's chat template exactly as SFT renders a conversation
(:func:`~vera_lightning.app.data.sft_tokens.encode_row`), each response ending with one EOS; without it the prompt is
the text (a transcript: ``\\n\\nHuman: ...\\n\\nAssistant:``) and the response follows it. Labels are -100 on the
prompt. **Truncation keeps the responses**: the prompt is cut from the left (keeping at least
``min(prompt, max_length // 4)`` tokens); only a response that still does not fit is cut from its right.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

from vera_lightning.app.data.sft_tokens import IGNORE, encode_row
from vera_lightning.app.data.tables import SUFFIXES, read_records

__all__ = ["PREFERENCE_FORMATS", "RowProblem", "check_preference_config", "parse_transcript", "read_pairs",
           "encode_pair", "encode_pairs"]

log = logging.getLogger(__name__)

PREFERENCE_FORMATS = ("pairs", "hh")
_MARKER = re.compile(r"\n\n(Human|Assistant):[ ]?")
_ROLE = {"Human": "user", "Assistant": "assistant"}
_FIX = "fix or drop the row (or set data.skip_invalid_rows=true to drop every invalid row with one warning)"


class RowProblem(ValueError):
    """A row that cannot be used (the message names the file, the row and the fix)."""


def check_preference_config(cfg: Mapping[str, Any], tokenizer: Any) -> None:
    """Refuse an inconsistent ``format: preference`` config before any file is read, listing every problem.

    Raises:
        ValueError: Naming each option, its value and the fix.
    """
    problems = []
    fmt = cfg.get("preference_format")
    if fmt not in PREFERENCE_FORMATS:
        problems.append(f"data.preference_format={fmt!r}: must be one of {list(PREFERENCE_FORMATS)} (pairs: prompt/"
                        "chosen/rejected fields; hh: whole \\n\\nHuman:/\\n\\nAssistant: transcripts)")
    for key in ("chosen_field", "rejected_field"):
        if not cfg.get(key):
            problems.append(f"data.{key}={cfg.get(key)!r}: name the column holding the {key.split('_')[0]} response")
    if cfg.get("chosen_field") and cfg.get("chosen_field") == cfg.get("rejected_field"):
        problems.append(f"data.chosen_field and data.rejected_field both name {cfg.get('chosen_field')!r}; name two "
                        "columns")
    if fmt == "hh" and cfg.get("prompt_field"):
        problems.append(f"data.prompt_field={cfg.get('prompt_field')!r}: an hh transcript holds its prompt (the turns "
                        "chosen and rejected share); set data.prompt_field=null")
    if cfg.get("chat_template") and not getattr(tokenizer, "chat_template", None):
        problems.append("data.chat_template=true but the tokenizer has no chat template: set data.chat_template=false "
                        "or use a chat model's tokenizer")
    if cfg.get("system_prompt") and not cfg.get("chat_template"):
        problems.append("data.system_prompt is a turn of the chat template: set data.chat_template=true or "
                        "data.system_prompt=null")
    if cfg.get("truncation", "left") != "left":
        problems.append(f"data.truncation={cfg.get('truncation')!r}: preference data keeps the responses and cuts the "
                        "prompt from the left; set data.truncation=left")
    if cfg.get("preference_target") not in (None, "pairs", "chosen"):
        problems.append(f"data.preference_target={cfg.get('preference_target')!r}: must be pairs (DPO) or chosen (SFT "
                        "on the chosen responses)")
    if cfg.get("packing"):
        problems.append("data.packing=true: preference pairs are scored per sequence; set data.packing=false")
    if problems:
        raise ValueError("Invalid data config (format: preference):\n  - " + "\n  - ".join(problems))


def parse_transcript(text: Any, where: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` as chat turns ``[{"role": "user", ...}, {"role": "assistant", ...}]``.

    Raises:
        RowProblem: For text that is not a transcript (naming ``where``), two turns of one speaker in a row, or a
            transcript that does not start with the human.
    """
    if not isinstance(text, str):
        raise RowProblem(f"{where} is {type(text).__name__}, not a transcript string; {_FIX}")
    parts = _MARKER.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowProblem(f"{where} is not an HH transcript (it must start with '\\n\\nHuman: ' and mark each turn "
                         f"with '\\n\\nHuman: ' or '\\n\\nAssistant: '); {_FIX}")
    turns = [{"role": _ROLE[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]
    for i, (a, b) in enumerate(zip(turns, turns[1:]), start=2):
        if a["role"] == b["role"]:
            raise RowProblem(f"{where}: turns {i - 1} and {i} are both {a['role']} turns (a malformed transcript); "
                             f"{_FIX}")
    if turns[0]["role"] != "user":
        raise RowProblem(f"{where}: the transcript starts with the assistant; {_FIX}")
    return turns


def _turns(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.lstrip().startswith("[") else value
        except json.JSONDecodeError:
            pass
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value or not all(
            isinstance(t, dict) and t.get("role") in ("system", "user", "assistant") and isinstance(t.get("content"),
                                                                                                  str) for t in value):
        raise RowProblem(f"{where} must be a string or a non-empty list of {{'role': system|user|assistant, "
                         f"'content': str}} turns; {_FIX}")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def _split(chosen: list[dict[str, str]], rejected: list[dict[str, str]], where: str) -> tuple[list, str, str]:
    """(shared prompt turns, chosen reply, rejected reply) of two whole conversations."""
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowProblem(f"{where}: the {name} conversation ends with a {turns[-1]['role']} turn; it must end with "
                             f"the assistant's reply; {_FIX}")
    if chosen[:-1] != rejected[:-1]:
        raise RowProblem(f"{where}: chosen and rejected do not share a prompt (they differ before their final "
                         f"assistant turns); {_FIX}")
    if len(chosen) < 2:
        raise RowProblem(f"{where}: no prompt: the conversations hold only the assistant's reply; {_FIX}")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _response(value: Any, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == \
            "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    if not isinstance(value, str):
        raise RowProblem(f"{where} must be a string or one assistant turn [{{'role': 'assistant', 'content': ...}}]; "
                         f"{_FIX}")
    return value


def _pair(cfg: Mapping[str, Any], row: Mapping[str, Any], where: str) -> dict[str, Any]:
    c_key, r_key, p_key = cfg["chosen_field"], cfg["rejected_field"], cfg.get("prompt_field")
    missing = [k for k in (p_key, c_key, r_key) if k and row.get(k) is None]
    if missing:
        raise RowProblem(f"{where}: no {missing} (the row has {sorted(row)}); name the columns with "
                         "data.prompt_field / data.chosen_field / data.rejected_field, or " + _FIX)
    if cfg.get("preference_format") == "hh":
        prompt, chosen, rejected = _split(parse_transcript(row[c_key], f"{where}: {c_key!r}"),
                                          parse_transcript(row[r_key], f"{where}: {r_key!r}"), where)
    elif not p_key:
        prompt, chosen, rejected = _split(_turns(row[c_key], f"{where}: {c_key!r}"),
                                          _turns(row[r_key], f"{where}: {r_key!r}"), where)
    else:
        prompt = _turns(row[p_key], f"{where}: {p_key!r}")
        chosen, rejected = _response(row[c_key], f"{where}: {c_key!r}"), _response(row[r_key], f"{where}: {r_key!r}")
    if not any(t["content"].strip() for t in prompt if t["role"] != "system"):
        raise RowProblem(f"{where}: empty prompt; {_FIX}")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowProblem(f"{where}: empty {name} response; {_FIX}")
    if chosen.strip() == rejected.strip():
        raise RowProblem(f"{where}: chosen and rejected are the same response, so the pair prefers nothing; {_FIX}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _special_text(pair: Mapping[str, Any], specials: list[str], where: str) -> None:
    texts = [t["content"] for t in pair["prompt"]] + [pair["chosen"], pair["rejected"]]
    for text in texts:
        found = next((token for token in specials if token in text), None)
        if found is not None:
            raise RowProblem(f"{where}: holds {found!r}, the tokenizer's special token, as text (the model would read "
                             f"it as that token); remove it from the data, or {_FIX}")


def read_pairs(path: Path | str, cfg: Mapping[str, Any], tokenizer: Any = None) -> list[dict[str, Any]]:
    """Every pair of a preference file, checked (see the module docstring).

    Returns:
        ``[{"prompt": [turns], "chosen": str, "rejected": str, "row": number}]`` in file order.

    Raises:
        ValueError: Listing the first invalid rows (file, row, fix) and how many there are, unless
            ``cfg["skip_invalid_rows"]``; a file that is not ``.jsonl``/``.csv``/``.tsv``, or no valid row at all.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: data.format=preference reads {', '.join(SUFFIXES)} files (chosen by extension)")
    _, numbered = read_records(path)
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t.strip()},
                      key=len, reverse=True)
    pairs, problems = [], []
    for number, row in numbered:
        where = f"{path}, row {number}"
        try:
            pair = _pair(cfg, row, where)
            if specials:
                _special_text(pair, specials, where)
        except RowProblem as err:
            problems.append(str(err))
            continue
        pairs.append({**pair, "row": number})
    if problems and not cfg.get("skip_invalid_rows"):
        shown = "\n  - ".join(problems[:5])
        raise ValueError(f"{path}: {len(problems)} of {len(numbered)} rows are invalid:\n  - {shown}"
                         + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""))
    if problems:
        log.warning("%s: dropped %d of %d invalid rows (data.skip_invalid_rows=true); the first: %s", path,
                    len(problems), len(numbered), problems[0])
    if not pairs:
        raise ValueError(f"{path}: no valid preference pair (of {len(numbered)} rows); check data.preference_format"
                         f"={cfg.get('preference_format')!r} and the field names")
    return pairs


def _transcript(turns: list[dict[str, str]]) -> str:
    speaker = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{speaker[t['role']]}: {t['content']}" for t in turns) + "\n\nAssistant:"


def _side(cfg: Mapping[str, Any], tokenizer: Any, prompt: list[dict[str, str]], reply: str) -> tuple[list, int]:
    """``(ids, start)`` of one side, prompt then the response with its EOS (``ids[start:]``)."""
    if cfg.get("chat_template"):
        sft_cfg = {"messages_field": "messages", "chat_template": True, "system_prompt": cfg.get("system_prompt")}
        row = {"messages": [*prompt, {"role": "assistant", "content": reply}]}
    else:
        plain = len(prompt) == 1 and prompt[0]["role"] == "user" and cfg.get("preference_format") != "hh"
        sft_cfg = {"prompt_field": "p", "response_field": "r", "chat_template": False}
        row = {"p": prompt[0]["content"] if plain else _transcript(prompt), "r": reply if plain else " " + reply}
    ids, _, start = encode_row(sft_cfg, tokenizer, row)
    return ids, start


def encode_pair(cfg: Mapping[str, Any], tokenizer: Any, pair: Mapping[str, Any]) -> tuple[dict[str, list], bool, bool]:
    """One pair as ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}`` within ``max_length``.

    Returns:
        ``(item, prompt_cut, response_cut)``.
    """
    max_length = int(cfg.get("max_length") or 512)
    (c_ids, c_start), (r_ids, r_start) = (_side(cfg, tokenizer, pair["prompt"], pair[k])
                                          for k in ("chosen", "rejected"))
    prompt = c_ids[:c_start]
    replies = [c_ids[c_start:], r_ids[r_start:]]
    longest = max(len(r) for r in replies)
    keep = min(len(prompt), max(min(len(prompt), max_length // 4), max_length - longest))
    prompt_cut = keep < len(prompt)
    prompt = prompt[len(prompt) - keep:]
    replies_cut = [r[:max_length - keep] for r in replies]
    item = {}
    for name, reply in zip(("chosen", "rejected"), replies_cut):
        item[f"{name}_ids"] = prompt + reply
        item[f"{name}_labels"] = [IGNORE] * len(prompt) + reply
    return item, prompt_cut, replies_cut != replies


def encode_pairs(pairs: list[Mapping[str, Any]], cfg: Mapping[str, Any], tokenizer: Any,
                 where: str = "the data") -> list[dict[str, Any]]:
    """Tokenise every pair (:func:`encode_pair`), each item numbered by ``index``; one warning per kind of cut."""
    items, prompts_cut, replies_cut = [], 0, 0
    for index, pair in enumerate(pairs):
        item, prompt_cut, reply_cut = encode_pair(cfg, tokenizer, pair)
        prompts_cut += prompt_cut
        replies_cut += reply_cut
        items.append({**item, "index": index})
    max_length = cfg.get("max_length")
    if prompts_cut:
        log.warning("%s: cut the prompt of %d of %d pairs from the left to fit data.max_length=%s (responses kept)",
                    where, prompts_cut, len(pairs), max_length)
    if replies_cut:
        log.warning("%s: %d of %d pairs have a response longer than data.max_length=%s allows beside the prompt; "
                    "cut from its right (raise data.max_length to keep them whole)", where, replies_cut, len(pairs),
                    max_length)
    return items

