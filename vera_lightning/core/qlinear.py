"""Frozen linear layers over 4-bit (NF4) or 8-bit (int8 weight-only) weights.

The layer half of :mod:`vera_lightning.ops.quantize`, over the tensors of
:mod:`vera_lightning.core.qtensor`: the linear op over a quantized weight, :class:`QuantizedLinear`
(an ``nn.Linear`` whose frozen weight is quantized), and the hooks a
:class:`~vera_lightning.VeraLinear` over a quantized base calls (forward, merge refusal, unload).
A bitsandbytes layer (``Linear4bit``/``Linear8bitLt``) under a ``VeraLinear`` is kept and called.

Backward: the quantized weight never gets a gradient; ``grad x = grad y · dequant(W)`` is
computed in backward from the quantized tensor (:class:`_QuantizedMatmul` saves nothing but a
reference to the frozen weight, never a float copy of it).

``copy.deepcopy`` of a layer holding a torchao weight copies the packed tensors exactly
(:func:`deepcopy_layer`; torchao's own ``clone`` would re-quantize).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vera_lightning.core.qtensor import (
    copy_quantized,
    dequantize_weight,
    is_quantized_weight,
    is_torchao_weight,
    prepare_load,
    quantize_weight,
    weight_scheme,
)

__all__ = ["QuantizedLinear", "quantized_linear", "quantized_base_forward", "merge_refusal", "quantized_to_base",
           "deepcopy_layer"]


class _QuantizedMatmul(torch.autograd.Function):
    """``x Wᵀ`` through the backend's op; backward ``grad x = grad y · dequant(W)``, nothing float saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight  # the frozen parameter itself (alive anyway): no float copy is kept
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ dequantize_weight(ctx.weight, grad_out.dtype), None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a torchao quantized ``weight``, memory-lean under autograd."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.linear(x, weight, bias)  # inference, or the first layer: the backend's op as is
    out = _QuantizedMatmul.apply(x, weight)
    return out if bias is None else out + bias


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen ``weight`` is a torchao NF4/int8 tensor.

    Same constructor and state-dict keys as ``nn.Linear``; made by
    :func:`vera_lightning.ops.quantize.quantize_base`, or with :meth:`from_linear`.

    Example::

        >>> layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), "int8")
        >>> type(layer.weight).__name__, layer(torch.randn(2, 64)).shape
        ('Int8Tensor', torch.Size([2, 32]))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device or "meta", dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, name: str = "layer") -> "QuantizedLinear":
        """A quantized copy of ``linear``'s weight; the bias is shared, not copied."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight = nn.Parameter(quantize_weight(linear.weight, scheme, name), requires_grad=False)
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    @property
    def scheme(self) -> Optional[str]:
        """``"nf4"``/``"int8"``, or ``None`` once dequantized."""
        return weight_scheme(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_quantized_weight(self.weight):
            return F.linear(x, self.weight, self.bias)
        return quantized_linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A float ``weight`` is quantized as it loads; another quantization is refused (:func:`prepare_load`)."""
        key = prefix + "weight"
        if key in state_dict and is_torchao_weight(self.weight):
            value, problem = prepare_load(self.weight, state_dict[key], key)
            if problem is not None:
                raise ValueError(f"load_state_dict refused: {problem}")
            state_dict[key] = value  # torch's own copy of the caller's dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scheme={self.scheme}"

    def __deepcopy__(self, memo: dict) -> "QuantizedLinear":
        return deepcopy_layer(self, memo)


# ---------------------------------------------------------------- hooks for VeraLinear over a quantized base
def quantized_base_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``W0 x + b`` of a :class:`~vera_lightning.VeraLinear` whose ``weight`` is quantized."""
    foreign = layer.foreign_base
    if foreign is not None:  # a bitsandbytes layer: its own forward reads the same weight/bias
        return foreign(x)
    return quantized_linear(x, layer.weight, layer.bias)


def merge_refusal(what: str, weight: torch.Tensor) -> ValueError:
    """The error for merging VeRA into a quantized base weight (see docs/quantization.md)."""
    return ValueError(
        f"{what}: cannot merge VeRA into a quantized ({weight_scheme(weight)}) base weight: the merged "
        "W0+ΔW would be re-rounded to the quantization grid, whose step is larger than most of ΔW's entries, "
        "so most of the update would be lost. Keep the adapter unmerged over the quantized base, or export a "
        "merged float model: vera_lightning.dequantize_base(model, torch.bfloat16) (or torch.float32) first, "
        "then merge_vera(model) / unload_vera(model, merge=True)."
    )


def quantized_to_base(layer: nn.Module, merge: bool) -> nn.Module:
    """The plain layer an unloaded quantized :class:`~vera_lightning.VeraLinear` becomes (never merged)."""
    if merge:
        raise merge_refusal("unload_vera(merge=True)", layer.weight)
    layer.unmerge()
    foreign = layer.foreign_base
    if foreign is not None:
        plain = foreign
    else:
        plain = QuantizedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = layer.weight
    plain.bias = layer.bias
    plain.train(layer.training)
    return plain

def deepcopy_layer(layer: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy(layer, memo)`` with its torchao quantized parameters copied exactly (:func:`copy_quantized`)."""
    for param in layer._parameters.values():
        if param is not None and id(param) not in memo and is_torchao_weight(param):
            memo[id(param)] = nn.Parameter(copy_quantized(param), requires_grad=param.requires_grad)
    clone = type(layer).__new__(type(layer))
    memo[id(layer)] = clone
    clone.__setstate__(copy.deepcopy(layer.__dict__, memo))
    return clone
