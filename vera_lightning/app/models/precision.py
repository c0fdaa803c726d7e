"""A model's precision and compilation, applied: ``model.compute_dtype`` as decided, ``model.quantize`` and
``model.compile``, by :func:`~vera_lightning.app.models.load.build_model`.

* :func:`apply_precision` casts the model to a **decided** dtype (``fp32`` is enforced too: a model loaded in
  bf16 or fp16 is cast to float32), keeps ``modules_to_save`` float32 masters in a bf16 base, and quantizes its
  frozen linears. It never decides: :func:`~vera_lightning.app.models.precision_choice.decide_precision` does;
* :func:`check_load_dtype` refuses a ``from_pretrained_kwargs`` dtype that contradicts the compute dtype;
* :func:`use_base_precision` puts an adapted model with a bf16 base into the bf16 training form (projection
  products in bf16, float32 λ's), called by the task module's hooks once VeRA is in place;
* :func:`compile_wanted` / :func:`compile_body`: ``torch.compile`` of the model body.

Which tensor lives in which dtype, and why: ``docs/llm.md`` (*Precision*).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from vera_lightning import QUANTIZE_SCHEMES, quantize_base, set_projection_dtype, vera_layers
from vera_lightning.app.models.precision_decision import COMPUTE_DTYPE_CHOICES, COMPUTE_DTYPES
from vera_lightning.app.models.trained_float32 import HALF_DTYPES, keep_float32

__all__ = ["COMPILE_CHOICES", "precision_settings", "check_load_dtype", "apply_precision", "use_base_precision",
           "compile_wanted", "compile_body"]


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


#: The spellings of ``from_pretrained_kwargs.dtype`` / ``torch_dtype`` that mean each compute dtype.
_LOAD_DTYPE_NAMES = {"fp32": {"float32", "fp32", "torch.float32", torch.float32},
                     "bf16": {"bfloat16", "bf16", "torch.bfloat16", torch.bfloat16}}


def check_load_dtype(from_pretrained_kwargs: Optional[Mapping[str, Any]], compute_dtype: str) -> None:
    """Refuse ``from_pretrained_kwargs`` keys ``dtype``/``torch_dtype`` that contradict ``compute_dtype``.

    The compute dtype alone sets the model's dtype: a model loaded in another one would be cast (rounding a
    float32 checkpoint through it) or, before this check, silently trained in it. The same dtype (e.g.
    ``bfloat16`` with ``bf16``) is accepted: the model then loads straight into it. Under ``auto`` the dtype is
    not known yet, so any is refused.

    Raises:
        ValueError: Naming both options, their values and the fix.
    """
    kwargs = dict(from_pretrained_kwargs or {})
    for key in ("dtype", "torch_dtype"):
        if key in kwargs and kwargs[key] not in _LOAD_DTYPE_NAMES.get(compute_dtype, ()):
            raise ValueError(
                f"model.from_pretrained_kwargs.{key}={kwargs[key]!s} conflicts with model.compute_dtype="
                f"{compute_dtype}: the compute dtype alone sets the model's dtype; remove from_pretrained_kwargs."
                f"{key} and set model.compute_dtype=fp32|bf16 (or auto) instead")


def _dtype_of(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in COMPUTE_DTYPES.values():
        return dtype
    if dtype in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[dtype]
    raise ValueError(f"apply_precision(dtype={dtype!r}): apply a decided dtype, one of {list(COMPUTE_DTYPES)} "
                     "(decide_precision resolves auto)")


def _trained_in_full(model: nn.Module, modules_to_save: list[str]) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` inside the modules ``modules_to_save`` names (PEFT's rule: the full name, or its end)."""
    found = {}
    for module_name, module in model.named_modules():
        if module_name and any(module_name == m or module_name.endswith("." + m) for m in modules_to_save):
            found.update({f"{module_name}.{n}": p for n, p in module.named_parameters(remove_duplicate=False)
                          if p.is_floating_point()})
    return list(found.items())


def apply_precision(model: nn.Module, dtype: Union[str, torch.dtype], quantize: Optional[str] = None,
                    modules_to_save: Iterable[str] = ()) -> nn.Module:
    """Store ``model`` in the decided ``dtype``, then quantize its frozen linears; decides nothing.

    Every floating parameter and buffer is cast, float32 included: a model loaded in bf16 or fp16 (a
    ``from_pretrained_kwargs`` dtype, a bf16 checkpoint) is stored in float32 under ``fp32``. Under ``bf16`` the
    modules named in ``modules_to_save`` (trained in full) keep their float32 values and become float32 masters
    used in bf16 (:mod:`~vera_lightning.app.models.trained_float32`). ``quantize`` (``nf4``, ``int8`` or None) runs
    :func:`vera_lightning.quantize_base` before VeRA is injected, leaving ``modules_to_save`` in full precision.

    Raises:
        ValueError: For a dtype that is not decided (``auto``) or a quantization scheme outside the choices.
    """
    target = _dtype_of(dtype)
    if quantize is not None and quantize not in QUANTIZE_SCHEMES:
        raise ValueError(f"model.quantize={quantize!r}: use one of {list(QUANTIZE_SCHEMES)} or null (no quantization)")
    skip = list(modules_to_save or [])
    kept = {name: p.detach().float() for name, p in _trained_in_full(model, skip)} if target in HALF_DTYPES else {}
    model = model.to(target)
    if kept:
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, value in kept.items():
            params[name].data = value
        keep_float32(model, kept, target)
    if quantize is not None:
        quantize_base(model, quantize, skip=skip)
    return model


def use_base_precision(model: nn.Module) -> bool:
    """The bf16 training form on an adapted model with a bf16 base: projection products in bf16, λ's float32.

    The other trained tensors' float32 masters are made earlier, before the optimizer exists: by
    :func:`apply_precision` (``modules_to_save``) and ``finetune.TrainedInFloat32`` (trained biases).

    Returns whether it applied (a model with VeRA layers over a half-precision base); idempotent.
    """
    layers = [layer for _, layer in vera_layers(model)]
    half = [layer for layer in layers if layer.weight.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return False
    set_projection_dtype(model, half[0].weight.dtype)
    return True
