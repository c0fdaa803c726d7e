"""Quantized weight tensors: NF4 (4-bit) and int8 weight-only, made, read, copied and loaded.

The tensor half of quantization, below :mod:`vera_lightning.core.qlinear` (the layers and the linear op
over these tensors) and :mod:`vera_lightning.ops.quantize` (swapping a model's weights). Two backends,
neither with kernels of ours:

* ``torchao`` (the default; CPU and CUDA): NF4 is ``torchao``'s ``NF4Tensor`` (``to_nf4``, the
  tensor torchtune's QLoRA trains on); int8 is ``quantize_`` with ``Int8WeightOnlyConfig``
  (symmetric, one scale per output row). Both are ``torch.Tensor`` subclasses held in an
  ordinary ``nn.Parameter``, so the state-dict key stays ``...weight``.
* ``bitsandbytes`` (CUDA, and CPU where its build supports it): ``Params4bit``/``Int8Params``,
  read here (scheme, bytes, dequantization); their layers are made in :mod:`vera_lightning.ops.quantize`.

NF4 blocks: 64 values share one absmax scale (QLoRA's block); the scales are double-quantized in
groups of up to 256 (QLoRA's group), the largest group size that divides the weight's number of
blocks, so any weight holding a multiple of 64 values quantizes (SmolLM2's 576 x 576 attention
projections hold 5,184 blocks: groups of 216). torchao's own ``clone`` re-quantizes a copy with its
default group of 256 (lossy, and refused for other groups): :func:`copy_quantized` copies the packed
tensors exactly, and the layers' ``deepcopy`` uses it.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "SCHEMES", "BACKENDS", "FLOAT_DTYPES", "NF4_BLOCK", "quantize_weight", "dequantize_weight", "weight_scheme",
    "is_quantized_weight", "is_torchao_weight", "tensor_bytes", "is_bnb_module", "bnb_available", "float_dtype",
    "prepare_load", "nf4_scale_group", "nf4_shape_problem", "copy_quantized",
]

SCHEMES = ("nf4", "int8")
BACKENDS = ("auto", "torchao", "bitsandbytes")
#: NF4 block (values sharing one absmax scale) and the largest scale group (scales double-quantized
#: together): QLoRA's and torchao's defaults. A weight must hold a multiple of NF4_BLOCK values.
NF4_BLOCK, NF4_MAX_SCALE_GROUP = 64, 256
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
    problem = nf4_shape_problem(weight, name) if scheme == "nf4" else None
    if problem:
        raise ValueError(problem)


def nf4_shape_problem(weight: torch.Tensor, name: str) -> Optional[str]:
    """Why NF4 cannot block ``weight`` (not a multiple of :data:`NF4_BLOCK` values), naming ``name`` and the fix."""
    if weight.numel() % NF4_BLOCK == 0:
        return None
    return (f"{name}: {tuple(weight.shape)} has {weight.numel()} values, not a multiple of {NF4_BLOCK} (NF4 blocks "
            f"of {NF4_BLOCK} values); leave it out (skip=[...]) or use scheme='int8'")


def nf4_scale_group(numel: int) -> int:
    """How many NF4 block scales are double-quantized together for a weight of ``numel`` values: the
    largest divisor of its number of blocks up to 256 (QLoRA's group; 216 for a 576 x 576 weight)."""
    blocks = numel // NF4_BLOCK
    return next(g for g in range(min(NF4_MAX_SCALE_GROUP, blocks), 0, -1) if blocks % g == 0)


def quantize_weight(weight: torch.Tensor, scheme: str, name: str = "weight") -> torch.Tensor:
    """A torchao quantized copy of ``weight`` (``out x in``), frozen and detached.

    NF4 uses blocks of 64 values with double-quantized scales (groups of :func:`nf4_scale_group`), so
    the weight must hold a multiple of 64 values; int8 takes any shape.

    Raises:
        ValueError / TypeError: For an unknown scheme, a shape NF4 cannot block, a non-float
            weight, or a device other than CPU/CUDA (naming ``name`` and the fix).
    """
    _check_weight(weight, scheme, name)
    tq = _torchao()
    with torch.no_grad():
        weight = weight.detach().contiguous()
        if scheme == "nf4":
            return tq.to_nf4(weight, NF4_BLOCK, nf4_scale_group(weight.numel()))
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

def copy_quantized(weight: torch.Tensor) -> torch.Tensor:
    """An exact copy of a torchao quantized ``weight``: its packed tensors cloned, its layout kept.

    (``weight.clone()`` on an ``NF4Tensor`` dequantizes and re-quantizes with torchao's default scale
    group: values change, and a weight quantized with another group cannot be cloned at all.)
    """
    names, meta = weight.__tensor_flatten__()
    inner = {name: getattr(weight, name).detach().clone() for name in names}
    return type(weight).__tensor_unflatten__(inner, meta, weight.size(), weight.stride())
