"""A model's precision and compilation: ``model.compute_dtype`` (``auto|fp32|bf16``), ``model.quantize`` and
``model.compile``, applied by :func:`~vera_lightning.app.models.load.build_model`.

* :func:`apply_precision` casts the model to the resolved dtype (``auto``: measured by
  :func:`vera_lightning.measure_precision`, one log line) and quantizes its frozen linears;
* :func:`use_base_precision` puts an adapted model with a bf16 base into the bf16 training form (projection
  products in bf16, float32 λ's), called by the task module's hooks once VeRA is in place;
* :func:`compile_wanted` / :func:`compile_body`: ``torch.compile`` of the model body.

Which tensor lives in which dtype, and why: ``docs/llm.md`` (*Precision*).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping, Optional

import torch
from torch import nn

from vera_lightning import (
    QUANTIZE_SCHEMES,
    bf16_native_cpu,
    measure_precision,
    quantize_base,
    set_projection_dtype,
    vera_layers,
)

__all__ = ["COMPUTE_DTYPES", "COMPUTE_DTYPE_CHOICES", "COMPILE_CHOICES", "precision_settings",
           "resolve_compute_dtype", "apply_precision", "use_base_precision", "compile_wanted", "compile_body"]


log = logging.getLogger(__name__)

#: ``model.compile`` values.
COMPILE_CHOICES = (True, False, "auto")


def compile_wanted(value: Any, cuda: Optional[bool] = None) -> bool:
    """Whether ``model.compile`` asks for ``torch.compile``: ``true``, ``false``, or ``auto`` (CUDA only).

    ``auto`` compiles on CUDA and not on a CPU, where it was measured slower over a whole fine-tune: its
    compile time is not paid back (``docs/llm.md``, *torch.compile*).

    Raises:
        ValueError: For another value, naming the option and the choices.
    """
    if value not in COMPILE_CHOICES or (value is not True and value is not False and value != "auto"):
        raise ValueError(f"model.compile={value!r}: use true, false or auto (auto: compile on CUDA only)")
    if value == "auto":
        return torch.cuda.is_available() if cuda is None else cuda
    return bool(value)


def compile_body(model: nn.Module) -> nn.Module:
    """``torch.compile`` the model's body (the transformer without its output head), in place and lazily.

    The body is what both the response-only loss and the model's own forward call, so one compiled graph serves
    training, validation and generation. VeRA layers take their ``plain`` path under compilation (PEFT's graph,
    which Dynamo traces without graph breaks); the λ's stay float32 parameters.
    """
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    (body if isinstance(body, nn.Module) else model).compile()
    return model


#: ``model.compute_dtype`` values and the dtype each casts the model to (``auto``: measured, see below).
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: The values ``model.compute_dtype`` accepts.
COMPUTE_DTYPE_CHOICES = ("auto", *COMPUTE_DTYPES)



def precision_settings(model_cfg: Mapping[str, Any]) -> tuple[Optional[torch.dtype], Optional[str]]:
    """``(compute dtype or None for auto, quantization scheme or None)`` of a ``model`` config, validated.

    Raises:
        ValueError: For a value other than those listed (naming the option and the choices).
    """
    dtype_name = model_cfg.get("compute_dtype") or "fp32"
    scheme = model_cfg.get("quantize")
    problems = []
    if dtype_name not in COMPUTE_DTYPE_CHOICES:
        problems.append(f"model.compute_dtype={dtype_name!r}: use one of {sorted(COMPUTE_DTYPE_CHOICES)} (auto: bf16 "
                        "where this machine runs it faster, by measurement)")
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        problems.append(f"model.quantize={scheme!r}: use one of {list(QUANTIZE_SCHEMES)} or null (no quantization)")
    if problems:
        raise ValueError("Invalid model precision settings:\n  - " + "\n  - ".join(problems))
    return COMPUTE_DTYPES.get(dtype_name), scheme


def _training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_compute_dtype(model: nn.Module, requested: Optional[torch.dtype]) -> torch.dtype:
    """The dtype ``model`` is stored and computed in: ``requested``, or the measured choice for ``auto`` (``None``).

    ``auto`` logs one line with the choice and both timings. An explicit bf16 on a CPU where bf16 is measured
    (or, with the tuner off, known from the CPU flags) to be slower than float32 gets a warning naming the slowdown.
    """
    device = _training_device()
    if requested is None:
        choice = measure_precision(model, device)
        log.info(choice.describe())
        return choice.dtype
    if requested == torch.bfloat16 and device.type == "cpu":
        choice = measure_precision(model, device)
        if choice.speedup is not None and choice.speedup < 1.0:
            warnings.warn(f"model.compute_dtype=bf16 is {1 / choice.speedup:.1f}x slower than float32 on this CPU "
                          f"(measured: {choice.ms_bf16:.2f} ms vs {choice.ms_fp32:.2f} ms per linear forward+backward; "
                          "it has no native bf16, so bf16 is emulated): use model.compute_dtype=auto or fp32",
                          UserWarning, stacklevel=2)
        elif choice.speedup is None and bf16_native_cpu() is False:
            warnings.warn("model.compute_dtype=bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16 flag): bf16 "
                          "products are emulated, typically tens of times slower than float32; use "
                          "model.compute_dtype=auto or fp32", UserWarning, stacklevel=2)
    return requested


def apply_precision(model: nn.Module, model_cfg: Mapping[str, Any]) -> nn.Module:
    """Cast ``model`` to ``model.compute_dtype`` and quantize its frozen linears (``model.quantize``).

    ``compute_dtype: auto`` measures which of bf16 and float32 is faster here
    (:func:`vera_lightning.measure_precision`). ``quantize`` (``nf4``, ``int8`` or null) runs
    :func:`vera_lightning.quantize_base` before VeRA is injected, leaving the config's ``modules_to_save``
    (trained in full) in full precision.
    """
    requested, scheme = precision_settings(model_cfg)
    dtype = resolve_compute_dtype(model, requested)
    if dtype != torch.float32:
        model = model.to(dtype)
    if scheme is not None:
        quantize_base(model, scheme, skip=list(model_cfg.get("modules_to_save") or []))
    return model


def use_base_precision(model: nn.Module) -> bool:
    """The bf16 training form on an adapted model with a bf16 base: projection products in bf16, λ's float32.

    Returns whether it applied (a model with VeRA layers over a half-precision base); idempotent.
    """
    layers = [layer for _, layer in vera_layers(model)]
    half = [layer for layer in layers if layer.weight.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return False
    set_projection_dtype(model, half[0].weight.dtype)
    return True
