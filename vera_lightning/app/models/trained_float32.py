"""Trained tensors stay float32 in a half-precision base: float32 masters, used in the base's dtype in the forward.

In the bf16 training form the frozen base is stored in bf16, but whatever trains must not be: an update of 1e-4 to
a weight of 0.1 vanishes in bf16's 8-bit mantissa, for a ``modules_to_save`` head or a trained bias as for a λ. The
λ's are float32 by construction (the VeRA layer casts around them). Every other trained tensor is made a **float32
master** here, as autocast keeps them: it is stored, saved, and given to the optimizer in float32 (so AdamW's state
is float32 too), and its module sees it cast to the base's dtype for the duration of each call (a forward
pre-hook swaps the cast in, a forward hook swaps the master back, also when the forward raises). The cast is
differentiable, so gradients reach the master in float32. The base around the module is untouched, and so is what
flows between modules: hidden states stay bf16, and a module mixing a frozen bf16 weight with a trained bias
(``bias=vera_only|all``) computes as it did.

Because the module computes with the master rounded to the base's dtype, an evaluation that loads the saved float32
tensor into a bf16 model computes what validation computed during training.

The hooks run on every call of the module, so activation checkpointing's recomputation sees the same casts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Optional

import torch
from torch import nn

from vera_lightning import vera_layers

__all__ = ["HALF_DTYPES", "half_base_dtype", "keep_float32", "keep_trained_float32", "float32_masters",
           "drop_float32_masters"]

#: The dtypes a base may be stored in that trained tensors must not be.
HALF_DTYPES = (torch.bfloat16, torch.float16)
#: The attribute of a module holding ``{parameter name: dtype it is used in}`` for its float32 masters.
MASTERS_ATTR = "_float32_masters"
_SWAPPED_ATTR = "_float32_swapped"


def half_base_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The half dtype most of ``model``'s frozen floating parameters are stored in; ``None`` if not half."""
    counts: Counter = Counter()
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            counts[param.dtype] += param.numel()
    if not counts:
        return None
    dtype, _ = counts.most_common(1)[0]
    return dtype if dtype in HALF_DTYPES else None


def _swap_in(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: each master replaced by its cast for this call (the originals kept to put back)."""
    saved = {}
    for name, dtype in getattr(module, MASTERS_ATTR).items():
        master = module._parameters.get(name)
        if isinstance(master, nn.Parameter) and master.dtype != dtype:
            saved[name] = master
            module._parameters[name] = master.to(dtype)
    module.__dict__.setdefault(_SWAPPED_ATTR, []).append(saved)


def _swap_out(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (always called): the masters back in place."""
    stack = module.__dict__.get(_SWAPPED_ATTR)
    if stack:
        module._parameters.update(stack.pop())


def _register(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    masters = getattr(module, MASTERS_ATTR, None)
    if masters is None:
        masters = {}
        module.__dict__[MASTERS_ATTR] = masters
        module.register_forward_pre_hook(_swap_in)
        module.register_forward_hook(_swap_out, always_call=True)
    masters[name] = dtype


def keep_float32(model: nn.Module, names: Iterable[str], dtype: torch.dtype) -> list[str]:
    """Make the parameters ``names`` (as ``model.named_parameters()`` names them) float32 masters used in ``dtype``.

    Each is cast to float32 in place (the same ``Parameter`` object, so an optimizer built already still holds it)
    and its module computes with it cast to ``dtype``. Idempotent.

    Returns:
        The names, sorted.

    Raises:
        ValueError: For a name ``model`` has no parameter of, or a ``dtype`` that is not half.
    """
    if dtype not in HALF_DTYPES:
        raise ValueError(f"keep_float32(dtype={dtype!r}): the masters are used in a half dtype, one of {HALF_DTYPES}")
    wanted = set(names)
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(wanted - set(params))
    if unknown:
        raise ValueError(f"keep_float32: {type(model).__name__} has no parameter {unknown}")
    ids = {id(params[name]) for name in wanted}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) in ids:
                if param.dtype != torch.float32:
                    param.data = param.data.float()
                _register(module, name, dtype)
    return sorted(wanted)


def keep_trained_float32(model: nn.Module, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Make every trainable tensor of ``model`` except the λ's a float32 master (:func:`keep_float32`).

    Call it once the trainable set is final (VeRA injected and frozen: a Lightning ``setup``) and before the
    optimizer is built and a checkpoint restored, so AdamW's state is float32 from the first step.

    Args:
        model: The model, adapted or not (``finetune=head``).
        dtype: The dtype the base computes in; default :func:`half_base_dtype` (nothing to do for a float32 base).

    Returns:
        The names of the masters (empty for a float32 base).
    """
    dtype = dtype if dtype is not None else half_base_dtype(model)
    if dtype is None:
        return []
    layers = {id(layer) for _, layer in vera_layers(model)}
    names = []
    for module_name, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is None or not param.requires_grad or not param.is_floating_point():
                continue
            if id(module) in layers and name not in ("weight", "bias"):
                continue  # a VeRA layer's own tensors (the λ's) are float32 and cast by the layer itself
            names.append(f"{module_name}.{name}" if module_name else name)
    return keep_float32(model, names, dtype) if names else []


def float32_masters(model: nn.Module) -> dict[str, torch.dtype]:
    """``{parameter name: the dtype its module uses it in}`` of every float32 master of ``model``."""
    return {f"{module_name}.{name}" if module_name else name: dtype for module_name, module in model.named_modules()
            for name, dtype in (getattr(module, MASTERS_ATTR, None) or {}).items()}


def drop_float32_masters(model: nn.Module) -> list[str]:
    """Use every float32 master of ``model`` as it is stored again (a model cast to float32 throughout).

    Returns:
        The names that were masters.
    """
    names = sorted(float32_masters(model))
    for module in model.modules():
        masters = getattr(module, MASTERS_ATTR, None)
        if masters:
            masters.clear()  # the hooks stay, with nothing to swap
    return names
