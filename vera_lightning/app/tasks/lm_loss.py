"""The causal-LM training loss with the output projection applied to the rows that are scored only.

Hugging Face's ``model(**batch).loss`` projects every position onto the vocabulary (``N × hidden × vocab``,
for SmolLM2 576 × 49,152: about a fifth of a training step) and then ignores the prompt and padding positions
(label -100). :func:`response_loss` runs the model's body, keeps the hidden states whose next-token label is
scored, and projects only those; the loss is the same mean token cross-entropy, computed in float32 (the logits
are cast before the softmax, as transformers does), whatever the model's dtype.

Only architectures whose logits are the plain output projection of the last hidden state are taken this way
(:data:`PLAIN_HEAD_TYPES`); any other model falls back to ``model(**batch).loss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PLAIN_HEAD_TYPES", "IGNORE_INDEX", "response_loss", "sequence_logps", "takes_plain_head"]

#: ``config.model_type`` values whose causal-LM logits are ``lm_head(last_hidden_state)`` with no scaling,
#: soft-capping or bias beyond the head's own.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox", "phi3", "smollm3"})
IGNORE_INDEX = -100


def takes_plain_head(model: nn.Module) -> bool:
    """Whether :func:`response_loss` may split ``model`` into its body and its output projection."""
    config = getattr(model, "config", None)
    prefix = getattr(model, "base_model_prefix", None)
    return (config is not None and getattr(config, "model_type", None) in PLAIN_HEAD_TYPES and bool(prefix)
            and isinstance(getattr(model, prefix, None), nn.Module)
            and callable(getattr(model, "get_output_embeddings", None))
            and model.get_output_embeddings() is not None
            and not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) is None)


def response_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy of the next-token labels (``labels`` shifted by one, -100 ignored), in float32."""
    if "labels" not in batch or not takes_plain_head(model):
        return model(**batch).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "use_cache")}  # packed rows carry use_cache
    hidden = getattr(model, model.base_model_prefix)(**inputs, use_cache=False)[0]
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
    if logits.shape[0] == 0:  # nothing scored: a zero that still reaches every trainable tensor
        return hidden.sum() * 0.0
    return F.cross_entropy(logits, targets[scored])


def sequence_logps(model: nn.Module, batch: dict[str, Any], average: bool = False) -> torch.Tensor:
    """Per row, the sum of ``log p(token)`` over the scored next-token labels (``labels`` shifted by one, -100
    skipped), in float32; ``average``: divided by the number of scored tokens (IPO's per-token form).

    Only the scored positions are projected onto the vocabulary (as :func:`response_loss`), where the model's head is
    plain (:func:`takes_plain_head`); any other model's full logits are used.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "use_cache")}  # packed rows carry use_cache
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    if takes_plain_head(model):
        hidden = getattr(model, model.base_model_prefix)(**inputs, use_cache=False)[0]
        logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][scored].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[scored]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)
    if average:
        return sums / scored.sum(dim=1).clamp(min=1)
    return sums
