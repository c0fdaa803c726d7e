"""Frozen linear layers with 4-bit (NF4) or 8-bit (int8 weight-only) weights.

The tensor-level half of :mod:`vera_lightning.ops.quantize`: turning a weight into a quantized
tensor and back, the linear op over it, and :class:`QuantizedLinear` (an ``nn.Linear`` whose
frozen weight is quantized). Two backends, neither with kernels of ours:

* ``torchao`` (the default; CPU and CUDA): NF4 is ``torchao``'s ``NF4Tensor`` (``to_nf4``, the
  tensor torchtune's QLoRA trains on); int8 is ``quantize_`` with ``Int8WeightOnlyConfig``
  (symmetric, one scale per output row). Both are ``torch.Tensor`` subclasses held in an
  ordinary ``nn.Parameter``, so the state-dict key stays ``...weight``.
* ``bitsandbytes`` (CUDA, and CPU where its build supports it): ``Linear4bit`` (NF4) and
  ``Linear8bitLt`` layers, as PEFT uses them, either already in the model (loaded by
  ``transformers`` with a ``BitsAndBytesConfig``) or made by ``quantize_base(..., backend=...)``.
  A :class:`~vera_lightning.VeraLinear` over such a layer keeps it and calls its forward.

Backward: the quantized weight never gets a gradient; ``grad x = grad y · dequant(W)`` is
computed in backward from the quantized tensor (:class:`_QuantizedMatmul` saves nothing but a
reference to the frozen weight, never a float copy of it).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SCHEMES", "BACKENDS", "FLOAT_DTYPES", "QuantizedLinear", "quantize_weight", "dequantize_weight", "weight_scheme",
    "is_quantized_weight", "is_torchao_weight", "quantized_linear", "tensor_bytes", "is_bnb_module", "bnb_available",
    "float_dtype", "prepare_load",
]

SCHEMES = ("nf4", "int8")
BACKENDS = ("auto", "torchao", "bitsandbytes")
#: NF4 block (values sharing one absmax scale) and scale group (scales double-quantized together),
#: torchao's and QLoRA's defaults; a weight must hold a multiple of both (64 x 256 = 16384 values),
#: true of every layer whose sizes are multiples of 128. torchao's own ops (clone, deepcopy) assume them.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
NF4_MULTIPLE = NF4_BLOCK * NF4_SCALER_BLOCK
#: The dtypes a quantized weight dequantizes to, by the names accepted for them.
FLOAT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def _torchao():
    """Import torchao, quietly: on a CPU build its CUDA-only extensions fail to load (harmless), and
    torch deprecates one of its pytree registrations; both are logged as warnings at import."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError as error:
        raise ImportError(
            "quantize_base(backend='torchao') needs the torchao package: `pip install torchao` "
            f"(`make setup` installs it) ({error})"
        ) from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return tq


def bnb_available() -> bool:
    """Whether bitsandbytes can be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA setup raising at import
        return False
    return True


def is_bnb_module(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantized linear (``Linear4bit``/``Linear8bitLt``)."""
    return type(module).__module__.startswith("bitsandbytes") and isinstance(module, nn.Linear)


def weight_scheme(weight: Optional[torch.Tensor]) -> Optional[str]:
    """``"nf4"``/``"int8"`` for a quantized weight (either backend), ``None`` for a plain tensor."""
    name = type(weight).__name__
    if name in ("NF4Tensor", "Params4bit"):
        return "nf4" if getattr(weight, "quant_type", "nf4") == "nf4" else str(weight.quant_type)
    if name in ("Int8Tensor", "Int8Params"):
        return "int8"
    return None


def is_quantized_weight(weight: Optional[torch.Tensor]) -> bool:
    """Whether ``weight`` is a quantized tensor this module handles."""
    return weight_scheme(weight) is not None


def is_torchao_weight(weight: Optional[torch.Tensor]) -> bool:
    """Whether ``weight`` is a torchao quantized tensor (``NF4Tensor``/``Int8Tensor``), as ``quantize_weight`` makes."""
    return type(weight).__name__ in ("NF4Tensor", "Int8Tensor")


def float_dtype(value: Any, what: str = "dtype") -> torch.dtype:
    """The float dtype ``value`` names: a ``torch.dtype`` or a string of :data:`FLOAT_DTYPES` (``"bf16"``, ...).

    Raises:
        ValueError / TypeError: Anything else (an integer dtype would turn every weight into rounded
            integers), naming ``what``, the value and the accepted ones.
    """
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES.values():
        return value
    name = value.strip().lower().removeprefix("torch.") if isinstance(value, str) else None
    if name in FLOAT_DTYPES:
        return FLOAT_DTYPES[name]
    accepted = (f"torch.float32, torch.bfloat16, torch.float16, torch.float64 or one of the strings "
                f"{list(FLOAT_DTYPES)}")
    error = ValueError if isinstance(value, (str, torch.dtype)) else TypeError
    raise error(f"{what} got {value!r}: a quantized weight dequantizes to a float dtype only; use {accepted} "
                "(None keeps the dtype each layer was quantized from)")


def _check_weight(weight: torch.Tensor, scheme: str, name: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"quantize scheme {scheme!r} is not supported; use one of {SCHEMES}")
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(f"{name}: can only quantize a 2-D floating-point weight, "
                        f"got {tuple(weight.shape)} {weight.dtype}")
    if weight.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"{name}: its weight is on device {weight.device.type!r}; the torchao backend quantizes on 'cpu' or "
            "'cuda'. Move the model there first (model.to('cpu')), or materialise meta weights (load them)."
        )
    if scheme == "nf4" and weight.numel() % NF4_MULTIPLE:
        raise ValueError(
            f"{name}: {tuple(weight.shape)} has {weight.numel()} values, not a multiple of {NF4_MULTIPLE} (NF4 "
            f"blocks of {NF4_BLOCK} values, scales in groups of {NF4_SCALER_BLOCK}); leave it out (skip=[...]) "
            "or use scheme='int8'"
        )


def quantize_weight(weight: torch.Tensor, scheme: str, name: str = "weight") -> torch.Tensor:
    """A torchao quantized copy of ``weight`` (``out x in``), frozen and detached.

    NF4 uses blocks of 64 values with double-quantized scales (groups of 256), so the weight must
    hold a multiple of 16384 values; int8 takes any shape.

    Raises:
        ValueError / TypeError: For an unknown scheme, a shape NF4 cannot block, a non-float
            weight, or a device other than CPU/CUDA (naming ``name`` and the fix).
    """
    _check_weight(weight, scheme, name)
    tq = _torchao()
    with torch.no_grad():
        weight = weight.detach().contiguous()
        if scheme == "nf4":
            return tq.to_nf4(weight, NF4_BLOCK, NF4_SCALER_BLOCK)
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(weight, requires_grad=False)
        tq.quantize_(holder, tq.Int8WeightOnlyConfig(set_inductor_config=False))
        return holder.weight.data


def dequantize_weight(weight: torch.Tensor, dtype: Optional[torch.dtype] = None,
                      module: Optional[nn.Module] = None) -> torch.Tensor:
    """A plain tensor with the values ``weight`` stands for (``weight`` itself when not quantized).

    ``module``: the bitsandbytes ``Linear8bitLt`` holding an ``Int8Params`` weight (its row scales move
    from the weight to the module's state at the first forward).
    """
    if dtype is not None:
        dtype = float_dtype(dtype, "dequantize_weight(weight, dtype)")
    name = type(weight).__name__
    with torch.no_grad():
        if name == "NF4Tensor":
            plain = weight.get_original_weight()
        elif name == "Int8Tensor":
            plain = weight.dequantize()
        elif name == "Params4bit":
            import bitsandbytes.functional as bf

            plain = bf.dequantize_4bit(weight.data, weight.quant_state)
        elif name == "Int8Params":
            import bitsandbytes.functional as bf

            scales = weight.SCB if weight.SCB is not None else getattr(getattr(module, "state", None), "SCB", None)
            if scales is None:
                raise ValueError("dequantize_weight: this bitsandbytes int8 weight's scales live on its Linear8bitLt; "
                                 "pass module=the layer (dequantize_base does)")
            plain = bf.int8_vectorwise_dequant(weight.data, scales)
        else:
            plain = weight.detach()
    return plain if dtype is None else plain.to(dtype)


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


def prepare_load(weight: torch.Tensor, value: Any, key: str) -> tuple[Any, Optional[str]]:
    """What ``load_state_dict`` should copy into the torchao quantized ``weight`` for ``value``, or why it cannot.

    A float tensor of the weight's shape is quantized with the weight's scheme as it loads (as a float32
    tensor loaded into a bfloat16 parameter is rounded); a tensor quantized the same way loads as it is;
    one quantized otherwise (another scheme, bitsandbytes) or an integer tensor cannot load.

    Returns:
        ``(value to load, None)``, or ``(value, the problem)`` naming ``key`` and the fix. Shapes that
        differ are left to ``load_state_dict``'s own size-mismatch report.
    """
    if not isinstance(value, torch.Tensor) or value is weight:
        return value, None
    scheme, incoming = weight_scheme(weight), weight_scheme(value)
    if type(value) is type(weight):
        return value, None
    if incoming is not None:
        bnb = type(value).__name__ in ("Params4bit", "Int8Params")
        how = f"{incoming!r}" + (", backend='bitsandbytes'" if bnb else "")
        return value, (f"{key}: the state dict holds a {incoming} weight ({type(value).__name__}), this model's is "
                       f"{scheme} ({type(weight).__name__}); save the source's state dict after "
                       "dequantize_base(source_model) (a float weight is quantized as it loads), or quantize this "
                       f"model the same way: dequantize_base(model), then quantize_base(model, {how})")
    if tuple(value.shape) != tuple(weight.shape) or value.device.type == "meta":
        return value, None
    if not value.dtype.is_floating_point:
        return value, (f"{key}: the state dict holds a {value.dtype} tensor; a quantized ({scheme}) weight loads a "
                       f"float tensor (quantized as it loads) or a {scheme} one")
    return quantize_weight(value.detach().to(device=weight.device, dtype=weight.dtype), scheme, key), None


def tensor_bytes(tensor: Optional[torch.Tensor]) -> int:
    """Bytes a tensor holds in memory; a quantized tensor counts its packed data and scales."""
    if tensor is None:
        return 0
    if type(tensor).__name__ in ("Params4bit",):
        state = tensor.quant_state
        inner = [tensor.data, getattr(state, "absmax", None), getattr(state, "code", None)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            inner += [nested.absmax, nested.code]
        return sum(t.numel() * t.element_size() for t in inner if isinstance(t, torch.Tensor))
    if type(tensor).__name__ == "Int8Params":  # int8 values + one float32 scale per row (on the weight or its layer)
        return tensor.data.numel() * tensor.data.element_size() + tensor.shape[0] * 4
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


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
