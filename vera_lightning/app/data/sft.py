"""Prompt/response and chat data for causal LMs (``data.format: sft``): formatting rows into prompts and references.

Rows are read and checked by :mod:`vera_lightning.app.data.sft_rows` (a prompt and a response, optionally through
``prompt_template``, or a ``messages_field`` conversation).

* **Prompt text** (:func:`format_prompt`) is what generation feeds the model: the template (or the
  prompt column), wrapped in the tokenizer's chat template as a user turn after an optional
  ``system_prompt`` when ``chat_template: true`` (``add_generation_prompt=True``). Training uses the same
  text, tokenised the same way (:func:`prompt_token_ids`), so generation after training sees exactly
  the prompt tokens training saw.
* **Responses** (:func:`reference_of`) are the response column, or a conversation's last assistant turn;
  rows sharing a prompt are its references (:func:`prompt_references`).
* **Lengths**: :func:`position_limit` and :func:`check_max_length` hold ``data.max_length`` to the model's positions.

Tokenising with label masks (EOS, -100 on the prompt) and truncating: :mod:`vera_lightning.app.data.sft_tokens`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

__all__ = ["with_system", "prompt_turns", "conversation", "format_prompt", "template_text", "encode_text",
           "leading_specials", "prompt_token_ids", "reference_of", "prompt_references", "position_limit",
           "check_max_length"]

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def template_text(template: str) -> str:
    """``prompt_template`` with the escapes ``\\n`` (newline), ``\\t`` (tab) and ``\\\\`` (a backslash) applied.

    Hydra keeps a backslash in an override (``'data.prompt_template="Q: {prompt}\\n"'`` arrives as ``Q: {prompt}``
    plus a backslash and an ``n``), so a template written that way gets the newline it means; a YAML file's
    ``"...\\n"`` is already a newline and is unchanged.
    """
    return re.sub(r"\\(n|t|\\)", lambda m: _ESCAPES[m.group(1)], template)


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


def leading_specials(tokenizer: Any) -> list[int]:
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
    return leading_specials(tokenizer) + encode_text(tokenizer, prompt)


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
