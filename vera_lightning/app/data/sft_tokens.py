"""Tokenising ``data.format: sft`` rows (see :mod:`vera_lightning.app.data.sft`): label masks and truncation.

* **Tokens**: prompt and response are tokenised separately and concatenated (the generation prompt is
  one piece, exactly as :func:`~vera_lightning.app.data.sft.prompt_token_ids` gives it to generation; a BPE
  merge across the boundary can never blur it). Without a chat template the tokenizer's leading special
  tokens (a BOS, BERT's ``[CLS]``) start the prompt. Each response ends with one EOS (the tokenizer's
  ``eos_token``, else its ``sep_token``): appended, unless the chat template already closes the turn with
  it (ChatML's ``<|im_end|>`` in SmolLM2), where the turn is cut just after it, so it is not doubled and
  the template's newline after it is not trained on.
* **Labels** are -100 on the prompt (``train_on_prompt: true`` keeps them) and on padding. In a
  conversation *every* assistant turn is a response (as TRL's ``assistant_only_loss``), each up to and
  including its end-of-turn token; the final one is the response generation is scored on.
* **Truncation** to ``max_length`` never leaves an example without its response: ``truncation: left``
  (default) drops tokens from the left of the prompt (in a conversation: of everything before the last
  response), keeping at least ``min(prompt length, max_length // 4)`` prompt tokens; ``truncation:
  drop`` drops every example longer than ``max_length``. Under both, an example whose final response
  (with EOS) does not fit beside that prompt reserve is dropped rather than cut (a response without its
  EOS would teach the model not to stop); one warning says how many were dropped, and one how many prompts
  (conversations: the turns before the last response) were cut from the left.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from vera_lightning.app.data.sft import conversation, encode_text, format_prompt, prompt_token_ids

__all__ = ["IGNORE", "eos_of", "encode_row", "encode_rows"]

log = logging.getLogger(__name__)

#: The label of a token the loss skips (``transformers``' and PyTorch's ``ignore_index``).
IGNORE = -100


def eos_of(tokenizer: Any) -> tuple[int, Optional[str]]:
    """``(id, text)`` of the token that ends every response: EOS, else SEP (BERT-style tokenizers)."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id, tokenizer.eos_token
    return tokenizer.sep_token_id, tokenizer.sep_token  # BERT-style tokenizers (model=tiny_opt borrows MiniLM's)


def _through_eos(tokenizer: Any, text: str) -> str:
    """``text`` up to and including its first EOS (what a chat template writes after a turn is not a target)."""
    _, eos_text = eos_of(tokenizer)
    return text[:text.index(eos_text) + len(eos_text)] if eos_text and eos_text in text else text


def _response_ids(tokenizer: Any, text: str) -> list[int]:
    """A response's tokens ending with exactly one EOS: the template's own, else appended."""
    ids = encode_text(tokenizer, _through_eos(tokenizer, text))
    eos_id, _ = eos_of(tokenizer)
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def _chat_pieces(cfg: Mapping[str, Any], tokenizer: Any, row: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """``(text, is_response)`` pieces of a conversation rendered by the chat template, in order."""
    turns = conversation(cfg, row)
    pieces, done = [], ""
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(turns[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns[:k + 1], tokenize=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError("data.chat_template=true: the tokenizer's chat template does not render a "
                             "conversation as a prefix of its continuation (it rewrites earlier turns), so "
                             "responses cannot be located; use single-turn rows or data.chat_template=false")
        response = _through_eos(tokenizer, full[len(prefix):])
        pieces += [(prefix[len(done):], False), (response, True)]
        done = prefix + response
    return pieces


def encode_row(data_cfg: Mapping[str, Any], tokenizer: Any, row: Mapping[str, Any]) -> tuple[list[int], list[int], int]:
    """Tokenise one training row (untruncated).

    Returns:
        ``(input_ids, labels, start)``: labels are the ids on response tokens (every token with
        ``train_on_prompt``) and -100 elsewhere; ``start`` is where the final response begins, so the
        ids from ``start`` on are the final response with its EOS (the last token).
    """
    if data_cfg.get("chat_template"):
        pieces = _chat_pieces(data_cfg, tokenizer, row)
        encoded = [(_response_ids(tokenizer, text) if is_response else encode_text(tokenizer, text), is_response)
                   for text, is_response in pieces]
    else:
        prompt = prompt_token_ids(data_cfg, tokenizer, format_prompt(data_cfg, tokenizer, row))
        encoded = [(prompt, False), (_response_ids(tokenizer, str(row[data_cfg["response_field"]])), True)]
    ids, labels = [], []
    for piece, is_response in encoded:
        ids += piece
        labels += piece if is_response or data_cfg.get("train_on_prompt") else [IGNORE] * len(piece)
    return ids, labels, len(ids) - len(encoded[-1][0])


def _fit(ids: list[int], labels: list[int], start: int, max_length: int, mode: str):
    if len(ids) <= max_length:
        return ids, labels
    reserve = min(start, max_length // 4)
    if mode == "drop" or len(ids) - start + reserve > max_length:
        return None
    return ids[-max_length:], labels[-max_length:]


def encode_rows(rows: list[Mapping[str, Any]], data_cfg: Mapping[str, Any], tokenizer: Any,
                where: str = "the data") -> list[dict[str, list[int]]]:
    """Tokenise rows into ``{"input_ids", "labels"}`` items of at most ``data_cfg["max_length"]`` tokens.

    Truncates or drops per ``data_cfg["truncation"]`` (see the module docstring); one warning counts the
    dropped rows, one the rows whose prompt was cut from the left.

    Raises:
        ValueError: If every row is dropped, naming ``where``, ``max_length`` and the shortest need.
    """
    max_length, mode = int(data_cfg.get("max_length") or 512), data_cfg.get("truncation") or "left"
    items, dropped, cut, shortest = [], 0, 0, None
    for row in rows:
        ids, labels, start = encode_row(data_cfg, tokenizer, row)
        fitted = _fit(ids, labels, start, max_length, mode)
        if fitted is None:
            dropped += 1
            need = len(ids) if mode == "drop" else len(ids) - start + min(start, max_length // 4)
            shortest = need if shortest is None else min(shortest, need)
            continue
        cut += len(fitted[0]) < len(ids)
        items.append({"input_ids": fitted[0], "labels": fitted[1]})
    if not items and rows:
        raise ValueError(f"{where}: all {len(rows)} rows are longer than data.max_length={max_length} under "
                         f"data.truncation={mode!r} (the shortest needs {shortest} tokens); raise data.max_length"
                         + (" or use data.truncation=left" if mode == "drop" else ""))
    if dropped:
        log.warning("%s: dropped %d of %d rows longer than data.max_length=%d (data.truncation=%s)",
                    where, dropped, len(rows), max_length, mode)
    if cut:
        log.warning("%s: cut the prompt of %d of %d rows from the left to fit data.max_length=%d "
                    "(data.truncation=left; their responses are whole); raise data.max_length to keep them whole",
                    where, cut, len(rows), max_length)
    return items
