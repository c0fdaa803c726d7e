"""The precision a run trains in, decided once: ``model.compute_dtype`` resolved for the device, the fine-tuning
method and the Trainer's ``precision``, into one scheme.

:func:`decide_precision` decides; :func:`~vera_lightning.app.models.precision.apply_precision` applies what was
decided and never decides. A run decides once, records :meth:`PrecisionDecision.to_dict` (its plan, the adapter's
metadata), and every later command replays the record (:func:`replay_precision`) instead of deciding again on
another machine.

The schemes (one per run; ``docs/llm.md``, *Precision*):

* ``fp32``: everything float32 (Trainer ``32-true``);
* ``bf16-base``: the bf16 training form. The frozen base is stored in bf16; everything that trains (the λ's, the
  ``modules_to_save`` heads, trained biases) is stored in float32 (Trainer ``32-true``);
* ``bf16-mixed`` / ``fp16-mixed``: Lightning's autocast over a float32 model (Trainer ``bf16-mixed`` /
  ``16-mixed``). It is what a Trainer set to a mixed precision gets (``trainer=gpu``), and what ``finetune=full``
  gets where bf16 is chosen: every weight trains, so every weight keeps a float32 master.

Rules: on CUDA, bf16 only where it is native (compute capability 8.0 or above; not
``torch.cuda.is_bf16_supported()``, which counts emulation). On a CPU, ``auto`` is measured
(:func:`vera_lightning.measure_precision`, whose warm-up call never decides). A bf16 compute dtype needs the
Trainer at ``32-true``: a mixed Trainer precision and ``compute_dtype=bf16`` together would cast the base twice,
and are refused.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from vera_lightning import bf16_native_cpu, measure_precision
from vera_lightning.app.models.precision_decision import (
    COMPUTE_DTYPE_CHOICES,
    COMPUTE_DTYPES,
    SCHEMES,
    PrecisionDecision,
)

__all__ = ["COMPUTE_DTYPES", "COMPUTE_DTYPE_CHOICES", "SCHEMES", "BF16_CUDA_CAPABILITY", "PrecisionDecision",
           "decide_precision", "replay_precision", "trainer_precision_name"]

#: The CUDA compute capability from which bf16 is native (Ampere, sm_80).
BF16_CUDA_CAPABILITY = (8, 0)
#: Lightning's short spellings of the precisions a run may use.
_TRAINER_ALIASES = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
                    "16": "16-mixed", "16-mixed": "16-mixed"}
_MIXED = {"bf16-mixed": "bf16-mixed", "16-mixed": "fp16-mixed"}


def trainer_precision_name(value: Any) -> str:
    """Lightning's canonical name of a Trainer ``precision`` this app runs under.

    Raises:
        ValueError: For ``bf16-true``/``16-true``/``64-true`` and the like, naming the option and the fix.
    """
    name = _TRAINER_ALIASES.get(str(value))
    if name is None:
        raise ValueError(
            f"trainer.precision={value!r}: use 32-true (the default; model.compute_dtype=auto|fp32|bf16 sets the "
            "base's dtype), bf16-mixed or 16-mixed (autocast over a float32 model). A '-true' half or double "
            "precision casts every trained tensor (λ's, heads) and the optimizer state too")
    return name


def _device_type(device: Union[str, torch.device]) -> str:
    text = str(device)
    try:
        return "cuda" if text == "gpu" else torch.device(text).type
    except RuntimeError:
        raise ValueError(f"decide_precision(device={text!r}): pass the resolved device (cpu, cuda, cuda:N, gpu), not "
                         "an accelerator to resolve (auto)") from None


def _capability(device: Union[str, torch.device]) -> tuple[int, int]:
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; set trainer.accelerator=cpu "
                         "(or auto)")
    text = str(device)
    return tuple(torch.cuda.get_device_capability(torch.device("cuda" if text == "gpu" else text)))


def _gpu(capability: tuple[int, int]) -> str:
    return f"CUDA compute capability {capability[0]}.{capability[1]}"


def _measured(model: Optional[nn.Module], shape: Optional[tuple[int, int, int]]):
    """:func:`vera_lightning.measure_precision` on the CPU, for ``model`` or a stand-in linear of ``shape``."""
    if model is None and shape is None:
        raise ValueError("decide_precision: measuring on the CPU needs the model (a meta-device one will do) or "
                         "the linear shape (tokens, in, out) to time")
    if model is None:
        tokens, in_f, out_f = shape
        return measure_precision(nn.Linear(in_f, out_f, bias=False, device="meta"), torch.device("cpu"),
                                 tokens=tokens)
    return measure_precision(model, torch.device("cpu"))


def _timed_reason(choice) -> str:
    if choice.speedup is None:
        return choice.reason
    n, i, o = choice.shape
    return (f"{'cached: ' if choice.reason == 'cached' else ''}measured {choice.ms_fp32:.2f} ms fp32 vs "
            f"{choice.ms_bf16:.2f} ms bf16 per linear fwd+bwd ({n}x{i}x{o}, {choice.speedup:.2f}x)")


def _warn_emulated_bf16(model: Optional[nn.Module], shape: Optional[tuple[int, int, int]]) -> None:
    """An explicit bf16 on a CPU where it measured (or, untimed, is known from the flags to be) slower: warn."""
    choice = _measured(model, shape) if model is not None or shape is not None else None
    if choice is not None and choice.speedup is not None and choice.speedup < 1.0:
        warnings.warn(f"model.compute_dtype=bf16 is {1 / choice.speedup:.1f}x slower than float32 on this CPU "
                      f"(measured: {choice.ms_bf16:.2f} ms vs {choice.ms_fp32:.2f} ms per linear forward+backward; "
                      "it has no native bf16, so bf16 is emulated): use model.compute_dtype=auto or fp32",
                      UserWarning, stacklevel=3)
    elif (choice is None or choice.speedup is None) and bf16_native_cpu() is False:
        warnings.warn("model.compute_dtype=bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16 flag): bf16 "
                      "products are emulated, typically tens of times slower than float32; use "
                      "model.compute_dtype=auto or fp32", UserWarning, stacklevel=3)


def _stored_dtype(requested: str, device: str, capability: Optional[tuple[int, int]], model, shape):
    """``(dtype, reason, choice or None)`` of a ``32-true`` run."""
    if requested == "fp32":
        return "fp32", "requested", None
    if device == "cuda":
        native = tuple(capability) >= BF16_CUDA_CAPABILITY
        if requested == "bf16":
            if not native:
                raise ValueError(
                    f"model.compute_dtype=bf16 on a GPU with {_gpu(capability)}: it has no native bf16 (from 8.0, "
                    "Ampere on), so bf16 would be emulated; use model.compute_dtype=auto or fp32 (or "
                    "trainer.precision=16-mixed)")
            return "bf16", "requested", None
        if native:
            return "bf16", f"{_gpu(capability)} (native bf16)", None
        return "fp32", f"{_gpu(capability)}: no native bf16", None
    if device != "cpu":
        if requested == "bf16":
            return "bf16", "requested", None
        return "fp32", f"{device}: auto decides bf16 on CPU and CUDA only", None
    if requested == "bf16":
        _warn_emulated_bf16(model, shape)
        return "bf16", "requested", None
    choice = _measured(model, shape)
    return ("bf16" if choice.dtype == torch.bfloat16 else "fp32"), _timed_reason(choice), choice


def decide_precision(requested: str, device: Union[str, torch.device], *, model: Optional[nn.Module] = None,
                     cuda_capability: Optional[tuple[int, int]] = None, trainer_precision: Any = "32-true",
                     finetune: str = "vera", shape: Optional[tuple[int, int, int]] = None) -> PrecisionDecision:
    """Decide the precision of one run: the scheme, the model's stored dtype and the Trainer precision.

    Args:
        requested: ``model.compute_dtype``: ``auto``, ``fp32`` or ``bf16``.
        device: Where the run computes: ``cpu``, ``cuda`` (``cuda:N``, ``gpu``), or a ``torch.device``.
        model: The model, for a CPU measurement (its most frequent linear shape is timed; a meta-device model
            will do). Not needed on CUDA, for ``fp32``, or with ``shape``.
        cuda_capability: The GPU's compute capability (default: asked of ``torch.cuda`` for a CUDA ``device``).
        trainer_precision: The Trainer's ``precision`` as configured (``32-true``, ``bf16-mixed``, ``16-mixed``).
        finetune: ``vera``, ``head`` or ``full`` (``full`` trains every weight: bf16 comes as autocast).
        shape: ``(tokens, in, out)`` to time instead of ``model``'s shape.

    Returns:
        The decision; ``auto`` on a CPU with the timings.

    Raises:
        ValueError: For a value outside the choices; ``bf16`` on a GPU without native bf16; ``bf16`` with a mixed
            Trainer precision (two schemes at once); ``bf16-mixed`` on a GPU without native bf16. Each names the
            options, the values and the fix.

    Example::

        >>> decide_precision("auto", "cuda", cuda_capability=(8, 0)).scheme
        'bf16-base'
    """
    if requested not in COMPUTE_DTYPE_CHOICES:
        raise ValueError(f"model.compute_dtype={requested!r}: use one of {list(COMPUTE_DTYPE_CHOICES)} (auto: bf16 "
                         "where this device runs it natively and faster)")
    kind = _device_type(device)
    trainer = trainer_precision_name(trainer_precision)
    capability = None
    if kind == "cuda":
        capability = tuple(cuda_capability) if cuda_capability is not None else _capability(device)
    if trainer in _MIXED:
        if requested == "bf16":
            raise ValueError(
                f"model.compute_dtype=bf16 with trainer.precision={trainer}: two precision schemes at once (a bf16 "
                f"base under {trainer} autocast); use model.compute_dtype=bf16 with trainer.precision=32-true (the "
                f"bf16 training form), or model.compute_dtype=auto|fp32 with trainer.precision={trainer}")
        if trainer == "bf16-mixed" and capability is not None and tuple(capability) < BF16_CUDA_CAPABILITY:
            raise ValueError(
                f"trainer.precision=bf16-mixed on a GPU with {_gpu(capability)}: it has no native bf16 (from 8.0); "
                "use trainer.precision=16-mixed or 32-true")
        if trainer == "bf16-mixed" and kind == "cpu" and bf16_native_cpu() is False:
            warnings.warn("trainer.precision=bf16-mixed on a CPU without native bf16 (no avx512_bf16/amx_bf16 flag): "
                          "bf16 autocast is emulated, typically tens of times slower; use trainer.precision=32-true",
                          UserWarning, stacklevel=2)
        scheme = _MIXED[trainer]
        return PrecisionDecision(requested, kind, "fp32", scheme, trainer,
                                 f"trainer.precision={trainer}: Lightning autocasts a float32 model")
    dtype, reason, choice = _stored_dtype(requested, kind, capability, model, shape)
    timings = dict(shape=choice.shape, ms_fp32=choice.ms_fp32, ms_bf16=choice.ms_bf16) if choice is not None else {}
    if dtype == "bf16" and finetune == "full":
        return PrecisionDecision(requested, kind, "fp32", "bf16-mixed", "bf16-mixed",
                                 f"finetune=full trains every weight, so bf16 comes as autocast over float32 "
                                 f"weights ({reason})", **timings)
    return PrecisionDecision(requested, kind, dtype, "bf16-base" if dtype == "bf16" else "fp32", "32-true", reason,
                             **timings)


def replay_precision(recorded: Union[PrecisionDecision, Mapping[str, Any]], device: Union[str, torch.device], *,
                     override: Optional[str] = None, cuda_capability: Optional[tuple[int, int]] = None,
                     model: Optional[nn.Module] = None) -> tuple[PrecisionDecision, Optional[str]]:
    """The precision a later command (eval, predict, resume) runs a recorded run in, and a one-line note if it differs.

    The record is replayed as it is, on any device (the same numbers, even where bf16 is slow there); ``override``
    (a ``model.compute_dtype`` the user set explicitly, not ``auto``) replaces it when it asks for another dtype.

    Returns:
        ``(decision, note)``: ``note`` is ``None`` when the run's precision is replayed on a device that runs it
        natively, else one line saying what differs.
    """
    run = recorded if isinstance(recorded, PrecisionDecision) else PrecisionDecision.from_dict(recorded)
    kind = _device_type(device)
    if override not in (None, "auto") and override != run.compute:
        decision = decide_precision(override, device, model=model, cuda_capability=cuda_capability, shape=run.shape)
        return decision, (f"model.compute_dtype={override} overrides the run's recorded precision ({run.scheme}, "
                          f"decided on {run.device}: {run.reason}); results can differ from the run's validation")
    if run.compute != "bf16":
        return run, None
    if kind == "cuda":
        capability = tuple(cuda_capability) if cuda_capability is not None else _capability(device)
        slow = tuple(capability) < BF16_CUDA_CAPABILITY
        where = f"a GPU with {_gpu(capability)}"
    else:
        slow = kind == "cpu" and bf16_native_cpu() is False
        where = f"a {kind.upper()} without native bf16"
    if slow:
        return run, (f"replaying the run's {run.scheme} precision on {where}: the same numbers as its validation, "
                     "emulated and slower; model.compute_dtype=fp32 runs faster with slightly different numbers")
    return run, None
