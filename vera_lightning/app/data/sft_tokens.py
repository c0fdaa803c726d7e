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
from typing import Any, Mapping, Optional, Sequence

from vera_lightning.app.data.sft import conversation, format_prompt, leading_specials

__all__ = ["IGNORE", "eos_of", "encode_batch", "encode_row", "fit_row", "report_fit", "encode_columns",
           "encode_rows"]

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


def _pieces(cfg: Mapping[str, Any], tokenizer: Any, row: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """``(text, is_response)`` pieces of a training row: the chat template's, else the prompt and the response."""
    if cfg.get("chat_template"):
        return _chat_pieces(cfg, tokenizer, row)
    return [(format_prompt(cfg, tokenizer, row), False), (str(row[cfg["response_field"]]), True)]


def encode_batch(data_cfg: Mapping[str, Any], tokenizer: Any,
                 rows: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], list[int], int]]:
    """:func:`encode_row` of every row, with one call of the tokenizer for all their pieces (much faster)."""
    pieces = [_pieces(data_cfg, tokenizer, row) for row in rows]
    texts = [_through_eos(tokenizer, text) if is_response else text for row in pieces for text, is_response in row]
    tokenised = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    lead = [] if data_cfg.get("chat_template") else leading_specials(tokenizer)
    eos_id, _ = eos_of(tokenizer)
    out, k = [], 0
    for row in pieces:
        ids, labels, last = [], [], 0
        for _, is_response in row:
            piece = list(tokenised[k])
            k += 1
            if is_response and not (piece and piece[-1] == eos_id):
                piece.append(eos_id)  # a response ends with exactly one EOS: the template's own, else appended
            elif not is_response and not data_cfg.get("chat_template"):
                piece = lead + piece  # a plain prompt starts with the tokenizer's leading specials (a BOS)
            ids += piece
            labels += piece if is_response or data_cfg.get("train_on_prompt") else [IGNORE] * len(piece)
            last = len(piece)
        out.append((ids, labels, len(ids) - last))
    return out


def encode_row(data_cfg: Mapping[str, Any], tokenizer: Any, row: Mapping[str, Any]) -> tuple[list[int], list[int], int]:
    """Tokenise one training row (untruncated).

    Returns:
        ``(input_ids, labels, start)``: labels are the ids on response tokens (every token with
        ``train_on_prompt``) and -100 elsewhere; ``start`` is where the final response begins, so the
        ids from ``start`` on are the final response with its EOS (the last token).
    """
    return encode_batch(data_cfg, tokenizer, [row])[0]


def fit_row(ids: list[int], labels: list[int], start: int, max_length: int, mode: str):
    """``(ids, labels)`` cut to ``max_length`` (see the module docstring), or ``(None, need)`` for a dropped row,
    ``need`` being the fewest tokens that would keep it."""
    if len(ids) <= max_length:
        return ids, labels
    reserve = min(start, max_length // 4)
    if mode == "drop" or len(ids) - start + reserve > max_length:
        return None, (len(ids) if mode == "drop" else len(ids) - start + reserve)
    return ids[-max_length:], labels[-max_length:]


def report_fit(where: str, total: int, dropped: int, cut: int, shortest: Optional[int],
               data_cfg: Mapping[str, Any]) -> None:
    """Say how many of ``total`` rows truncation dropped and cut (one warning each).

    Raises:
        ValueError: If every row is dropped, naming ``where``, ``max_length`` and the shortest need.
    """
    max_length, mode = int(data_cfg.get("max_length") or 512), data_cfg.get("truncation") or "left"
    if total and dropped == total:
        raise ValueError(f"{where}: all {total} rows are longer than data.max_length={max_length} under "
                         f"data.truncation={mode!r} (the shortest needs {shortest} tokens); raise data.max_length"
                         + (" or use data.truncation=left" if mode == "drop" else ""))
    if dropped:
        log.warning("%s: dropped %d of %d rows longer than data.max_length=%d (data.truncation=%s)",
                    where, dropped, total, max_length, mode)
    if cut:
        log.warning("%s: cut the prompt of %d of %d rows from the left to fit data.max_length=%d "
                    "(data.truncation=left; their responses are whole); raise data.max_length to keep them whole",
                    where, cut, total, max_length)


def encode_columns(rows: Sequence[Mapping[str, Any]], data_cfg: Mapping[str, Any], tokenizer: Any) -> dict[str, list]:
    """Tokenised, fitted columns of ``rows`` (a ``Dataset.map`` batch): ``input_ids`` and ``labels`` (empty for a
    dropped row), ``length`` (0: dropped), ``cut`` (the prompt was cut from the left) and ``need`` (a dropped row's
    fewest tokens)."""
    max_length, mode = int(data_cfg.get("max_length") or 512), data_cfg.get("truncation") or "left"
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "cut": [], "need": []}
    for ids, labels, start in encode_batch(data_cfg, tokenizer, rows):
        fitted, second = fit_row(ids, labels, start, max_length, mode)
        dropped = fitted is None
        columns["input_ids"].append([] if dropped else fitted)
        columns["labels"].append([] if dropped else second)
        columns["length"].append(0 if dropped else len(fitted))
        columns["cut"].append(not dropped and len(fitted) < len(ids))
        columns["need"].append(second if dropped else 0)
    return columns


def encode_rows(rows: list[Mapping[str, Any]], data_cfg: Mapping[str, Any], tokenizer: Any,
                where: str = "the data") -> list[dict[str, list[int]]]:
    """Tokenise rows into ``{"input_ids", "labels"}`` items of at most ``data_cfg["max_length"]`` tokens.

    Truncates or drops per ``data_cfg["truncation"]`` (see the module docstring); one warning counts the
    dropped rows, one the rows whose prompt was cut from the left.

    Raises:
        ValueError: If every row is dropped, naming ``where``, ``max_length`` and the shortest need.
    """
    columns = encode_columns(rows, data_cfg, tokenizer)
    needs = [need for need, length in zip(columns["need"], columns["length"]) if not length]
    report_fit(where, len(rows), len(needs), sum(columns["cut"]), min(needs) if needs else None, data_cfg)
    return [{"input_ids": ids, "labels": labels}
            for ids, labels, length in zip(columns["input_ids"], columns["labels"], columns["length"]) if length]
