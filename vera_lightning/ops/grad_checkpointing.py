"""Activation (gradient) checkpointing of ``transformers`` models carrying VeRA layers.

Every autograd path of :class:`~vera_lightning.VeraLinear` works under
``model.gradient_checkpointing_enable()`` (reentrant and non-reentrant): recomputation inside
backward replays the sibling groups and path choices of the original forward
(:class:`vera_lightning.forward.sharing.SiblingPlans`), so the λ-gradients equal those without it.

The classic pitfall is the reentrant variant on a frozen base: the input of the first
checkpointed block (the embedding output) does not require grad, so
``torch.utils.checkpoint`` records no backward for any block and the adapter gets no gradient,
silently when a trainable head keeps the loss differentiable. :func:`apply_vera` installs a
forward pre-hook (:func:`install_checkpointing_guard`) that fixes this the way ``transformers``
recommends (``enable_input_require_grads``: the embedding output requires grad; an
``inputs_embeds`` argument that does not is replaced by a detached copy that does) and warns once.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["enable_gradient_checkpointing", "fix_reentrant_inputs", "install_checkpointing_guard",
           "reentrant_checkpointing"]

_GUARD_ATTR = "_vera_checkpointing_guard"


def _is_hf(module: nn.Module) -> bool:
    return hasattr(module, "get_input_embeddings") and hasattr(module, "supports_gradient_checkpointing")


def _hf_roots(model: nn.Module) -> list[nn.Module]:
    """The outermost ``transformers`` models inside ``model`` (``model`` itself if it is one)."""
    if _is_hf(model):
        return [model]
    roots: list[nn.Module] = []
    for child in model.children():
        roots += _hf_roots(child)
    return roots


def reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether some block of ``model`` is checkpointed with the reentrant ``torch.utils.checkpoint``."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None) or {}
            if keywords.get("use_reentrant", True) is not False:  # torch's default is the reentrant variant
                return True
    return False


def _embeddings_frozen(hf: nn.Module) -> bool:
    try:
        embeddings = hf.get_input_embeddings()
    except NotImplementedError:
        return False
    if embeddings is None or getattr(hf, "_require_grads_hooks", None):
        return False
    return not any(p.requires_grad for p in embeddings.parameters())


def fix_reentrant_inputs(model: nn.Module) -> list[str]:
    """Make the embedding output require grad wherever reentrant checkpointing meets frozen embeddings.

    Returns:
        The class names of the models that were fixed (empty if nothing needed fixing).
    """
    fixed = []
    for hf in _hf_roots(model):
        if reentrant_checkpointing(hf) and _embeddings_frozen(hf):
            hf.enable_input_require_grads()
            fixed.append(type(hf).__name__)
    return fixed


def _guard(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    if not (module.training and torch.is_grad_enabled() and reentrant_checkpointing(module)):
        return None
    fixed = fix_reentrant_inputs(module)
    if fixed and not getattr(module, "_vera_quiet_fix", False):
        warnings.warn(
            f"{', '.join(fixed)} uses reentrant gradient checkpointing with frozen input embeddings: without a "
            "fix the VeRA λ's would get no gradient. vera-lightning called enable_input_require_grads() for you; "
            "to silence this, call it yourself or use gradient_checkpointing_kwargs={'use_reentrant': False}.",
            UserWarning,
            stacklevel=2,
        )
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and not embeds.requires_grad and embeds.is_floating_point():
        return args, {**kwargs, "inputs_embeds": embeds.detach().requires_grad_(True)}
    return None


def install_checkpointing_guard(model: nn.Module) -> None:
    """Register the reentrant-checkpointing guard on every outermost ``transformers`` model (idempotent)."""
    for hf in _hf_roots(model):
        if not getattr(hf, _GUARD_ATTR, False):
            hf.register_forward_pre_hook(_guard, with_kwargs=True)
            setattr(hf, _GUARD_ATTR, True)


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> nn.Module:
    """Turn on activation checkpointing of every ``transformers`` model in ``model``.

    Args:
        model: A ``transformers`` model, or a module holding some (a LightningModule).
        use_reentrant: Which ``torch.utils.checkpoint`` variant; the reentrant one also gets
            :func:`fix_reentrant_inputs` when the embeddings are frozen.

    Returns:
        ``model``.

    Raises:
        ValueError: If ``model`` holds no ``transformers`` model that supports checkpointing.
    """
    roots = [hf for hf in _hf_roots(model) if getattr(hf, "supports_gradient_checkpointing", False)]
    if not roots:
        raise ValueError(
            f"gradient_checkpointing=true: {type(model).__name__} holds no transformers model that supports "
            "gradient checkpointing; set model.gradient_checkpointing=false"
        )
    for hf in roots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the alias transformers deprecates
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        install_checkpointing_guard(hf)
        hf._vera_quiet_fix = True  # asked for through us: fixing the frozen-input case needs no warning
    return model
