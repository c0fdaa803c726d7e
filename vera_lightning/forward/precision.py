"""The compute precision ``auto`` picks: bf16 where this machine runs it faster, float32 elsewhere, by measurement.

On CUDA, bf16 is chosen without timing where it is native: compute capability 8.0 or above (Ampere on). Not
``torch.cuda.is_bf16_supported()``, which also counts the emulation of a V100 or T4. On a CPU the answer depends
on the chip: with AVX-512 BF16 or AMX a bf16 product is several times a float32 one; without them bf16 is
emulated and tens of times slower. So :func:`measure_precision` times one forward + backward of the model's most
frequent linear shape (a frozen weight, an input that needs its gradient, as in training) in both dtypes and
picks bf16 when it is at least :data:`MIN_SPEEDUP` times faster. Each dtype's first call (kernel selection, cold
caches) is a warm-up that is never timed and never ends the measuring: only timed calls decide.

It shares the autotuner's machinery (:mod:`vera_lightning.forward.tune_settings`): its on/off switch
(``VERA_LIGHTNING_AUTOTUNE=0``: no timing, float32 on a CPU), its cache file (one entry per machine and shape,
kept with the path choices) and its budget (the bf16 timing stops early once it is clearly slower, so an
emulating CPU pays about a second once).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vera_lightning.forward.autotune import TUNER
from vera_lightning.forward.tune_cache import TuneFile, machine_key
from vera_lightning.forward.tune_settings import Settings

__all__ = ["MIN_SPEEDUP", "BF16_CUDA_CAPABILITY", "PrecisionChoice", "representative_shape", "measure_precision",
           "bf16_native_cpu", "bf16_native_cuda"]

#: bf16 must be at least this many times faster than float32 to be chosen (a clear margin over timing noise).
MIN_SPEEDUP = 1.3
#: Rows of the timed input (a typical batch's tokens).
TOKENS = 512
#: The CUDA compute capability from which bf16 products are native (Ampere, sm_80).
BF16_CUDA_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` chose and why.

    Attributes:
        dtype: ``torch.bfloat16`` or ``torch.float32``.
        reason: ``"measured"``, ``"cached"``, ``"cuda"`` (native bf16 from compute capability 8.0),
            ``"tuning off"`` or ``"no linear layer"``.
        shape: ``(tokens, in, out)`` that was timed (``None`` when nothing was timed).
        ms_fp32, ms_bf16: Milliseconds per forward + backward (``None`` when not timed).
    """

    dtype: torch.dtype
    reason: str
    shape: Optional[tuple[int, int, int]] = None
    ms_fp32: Optional[float] = None
    ms_bf16: Optional[float] = None

    @property
    def speedup(self) -> Optional[float]:
        """float32 time / bf16 time (> 1: bf16 is faster)."""
        if self.ms_fp32 is None or not self.ms_bf16:
            return None
        return self.ms_fp32 / self.ms_bf16

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def describe(self) -> str:
        """One log line: the choice, the two timings and the ratio."""
        if self.speedup is None:
            return f"precision auto: {self.name} ({self.reason})"
        n, i, o = self.shape
        return (f"precision auto: {self.name} ({self.reason}: one forward+backward of a {n}x{i}x{o} linear takes "
                f"{self.ms_fp32:.2f} ms in float32, {self.ms_bf16:.2f} ms in bf16, {self.speedup:.2f}x; bf16 needs "
                f">= {MIN_SPEEDUP}x)")


def bf16_native_cpu() -> Optional[bool]:
    """Whether this CPU reports native bf16 (``avx512_bf16`` or ``amx_bf16``); ``None`` where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    return ("avx512_bf16" in flags or "amx_bf16" in flags) if flags else None


def bf16_native_cuda(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability runs bf16 natively (:data:`BF16_CUDA_CAPABILITY` or above)."""
    return tuple(capability) >= BF16_CUDA_CAPABILITY


def representative_shape(model: nn.Module, tokens: int = TOKENS) -> Optional[tuple[int, int, int]]:
    """``(tokens, in, out)`` of the linear shape holding the most weights in ``model`` (``None``: no linear)."""
    weights: Counter = Counter()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "VeraLinear"):
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                out_f, in_f = weight.shape if type(module).__name__ != "Conv1D" else weight.shape[::-1]
                weights[(int(in_f), int(out_f))] += int(weight.numel())
    if not weights:
        return None
    (in_f, out_f), _ = weights.most_common(1)[0]
    return tokens, in_f, out_f


def _time_step(dtype: torch.dtype, shape: tuple[int, int, int], timer: Callable[[], float], repeats: int,
               give_up_s: Optional[float] = None) -> float:
    """Median seconds of one forward + backward (``y = x Wᵀ``; grad of ``x``) in ``dtype``.

    The first call is a warm-up: never timed, so it can neither count nor stop the measuring (a cold first bf16
    call can take many times a warm one). ``give_up_s``: a timed call slower than this ends the measuring early
    (the dtype is clearly slower; more samples would only cost time).
    """
    n, in_f, out_f = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, in_f, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5).to(dtype)
    grad = torch.randn(n, out_f, generator=gen).to(dtype)
    F.linear(x, w).backward(grad)  # the warm-up, untimed
    x.grad = None
    times = []
    for _ in range(max(1, repeats)):
        start = timer()
        F.linear(x, w).backward(grad)
        x.grad = None
        times.append(timer() - start)
        if give_up_s is not None and times[-1] > give_up_s:
            break
    return statistics.median(times)


def measure_precision(model: nn.Module, device: Optional[torch.device] = None, *,
                      timer: Callable[[], float] = time.perf_counter, repeats: int = 3,
                      settings: Optional[Settings] = None, tokens: int = TOKENS) -> PrecisionChoice:
    """The dtype ``precision: auto`` trains ``model`` in on ``device`` (default: the model's).

    Args:
        model: The model (its linear shapes are what is timed).
        device: Where it will train; CUDA decides by compute capability (:func:`bf16_native_cuda`), untimed.
        timer: A clock (tests pass a fake one).
        repeats: Timed runs per dtype (median), after one untimed warm-up each.
        settings: On/off and cache file (default: the path tuner's, as :func:`vera_lightning.configure_autotune`
            and the environment set them).
        tokens: Rows of the timed input.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        native = bf16_native_cuda(torch.cuda.get_device_capability(device))
        return PrecisionChoice(torch.bfloat16 if native else torch.float32, "cuda")
    settings = settings or TUNER.settings
    shape = representative_shape(model, tokens)
    if shape is None:
        return PrecisionChoice(torch.float32, "no linear layer")
    if not settings.enabled():
        return PrecisionChoice(torch.float32, "tuning off", shape)
    # "warm": measured with the warm-up excluded from every decision (older entries could be decided by a cold call)
    key = f"precision {device.type} n{shape[0]} in{shape[1]} out{shape[2]} warm"
    machine = machine_key(device, torch.get_num_threads())
    path = settings.cache_file()
    cache = TuneFile(path) if path is not None else None
    entry = cache.load(machine).get(key) if cache is not None else None
    if entry is not None and isinstance(entry.get("ms"), dict):
        ms = entry["ms"]
        try:
            return PrecisionChoice(torch.bfloat16 if entry["path"] == "bf16" else torch.float32, "cached", shape,
                                   float(ms["fp32"]), float(ms["bf16"]))
        except (KeyError, TypeError, ValueError):
            pass  # a malformed entry: measure again
    fp32 = _time_step(torch.float32, shape, timer, repeats)
    bf16 = _time_step(torch.bfloat16, shape, timer, repeats, give_up_s=3 * fp32 + 1e-9)
    choice = PrecisionChoice(torch.bfloat16 if fp32 >= MIN_SPEEDUP * bf16 else torch.float32, "measured", shape,
                             fp32 * 1e3, bf16 * 1e3)
    if cache is not None:
        cache.store(machine, key, {"path": choice.name, "ms": {"fp32": choice.ms_fp32, "bf16": choice.ms_bf16}})
    return choice
