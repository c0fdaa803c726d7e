"""forward/precision.py: ``auto`` picks bf16 only where it measured faster by the margin (the warm-up call never
decides), or on CUDA where it is native, and caches the choice."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from helpers.models import tiny_llama
from torch import nn

from vera_lightning.forward import precision
from vera_lightning.forward.precision import MIN_SPEEDUP, measure_precision, representative_shape
from vera_lightning.forward.tune_settings import Settings


class FakeClock:
    """A clock whose every timed step takes ``fp32_s`` seconds in float32 and ``bf16_s`` in bf16.

    ``measure_precision`` times float32 first (``2 * repeats`` clock reads: the warm-up is not timed), then bf16.
    """

    def __init__(self, fp32_s: float, bf16_s: float, repeats: int = 3) -> None:
        self.steps = {"fp32": fp32_s, "bf16": bf16_s}
        self.fp32_reads = 2 * repeats
        self.reads = 0
        self.now = 0.0

    def __call__(self) -> float:
        phase = "fp32" if self.reads < self.fp32_reads else "bf16"
        if self.reads % 2:  # the end of a step
            self.now += self.steps[phase]
        self.reads += 1
        return self.now


def tiny_mlp_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.Linear(48, 8))


@pytest.fixture
def settings(tmp_path):
    return Settings(enabled_set=True, cache_set=tmp_path / "autotune.json")


def test_representative_shape_is_the_shape_holding_most_weights():
    assert representative_shape(tiny_mlp_model(), tokens=64) == (64, 48, 48)
    llama = tiny_llama()  # hidden 64, MLP 96, 2 layers: gate/up (64->96) and down (96->64) hold the most
    assert representative_shape(llama, tokens=8) in {(8, 64, 96), (8, 96, 64)}
    assert representative_shape(nn.ReLU()) is None


def test_bf16_faster_by_the_margin_is_chosen_and_cached(settings, tmp_path):
    choice = measure_precision(tiny_mlp_model(), "cpu", timer=FakeClock(0.010, 0.004), settings=settings)
    assert (choice.dtype, choice.reason) == (torch.bfloat16, "measured")
    assert choice.speedup == pytest.approx(2.5)
    assert "10.00 ms in float32, 4.00 ms in bf16, 2.50x" in choice.describe()
    doc = json.loads((tmp_path / "autotune.json").read_text())
    (entries,) = doc["machines"].values()
    assert [e["path"] for k, e in entries.items() if k.startswith("precision cpu")] == ["bf16"]
    # the second decision reads the file: a clock that would now say "slower" is never consulted
    again = measure_precision(tiny_mlp_model(), "cpu", timer=FakeClock(0.001, 1.0), settings=settings)
    assert (again.dtype, again.reason, again.ms_bf16) == (torch.bfloat16, "cached", pytest.approx(4.0))


@pytest.mark.parametrize("bf16_s", [0.010 / (MIN_SPEEDUP - 0.05), 0.010, 0.5])
def test_never_bf16_where_it_is_not_clearly_faster(settings, bf16_s):
    clock = FakeClock(0.010, bf16_s)
    choice = measure_precision(tiny_mlp_model(), "cpu", timer=clock, settings=settings)
    assert choice.dtype == torch.float32
    if bf16_s == 0.5:  # emulated bf16: the first timed step past 3x float32 ends the measuring
        assert clock.reads == clock.fp32_reads + 2


class ColdKernels:
    """``F.linear`` whose first call per dtype takes ``cold_s`` and every later one ``warm_s[dtype]`` (a fake clock)."""

    def __init__(self, cold_s: float, warm_s: dict) -> None:
        self.cold_s, self.warm_s, self.now, self.calls = cold_s, warm_s, 0.0, Counter()

    def linear(self, x, w):
        self.now += self.cold_s if not self.calls[x.dtype] else self.warm_s[x.dtype]
        self.calls[x.dtype] += 1
        return torch.nn.functional.linear(x, w)


def test_the_warm_up_call_never_decides(settings, monkeypatch):
    """A cold first bf16 call 100x a float32 one (kernel selection) neither counts nor ends the measuring."""
    kernels = ColdKernels(cold_s=1.0, warm_s={torch.float32: 0.010, torch.bfloat16: 0.004})
    monkeypatch.setattr(precision, "F", SimpleNamespace(linear=kernels.linear))
    choice = measure_precision(tiny_mlp_model(), "cpu", timer=lambda: kernels.now, settings=settings, repeats=3)
    assert (choice.dtype, choice.ms_fp32, choice.ms_bf16) == (torch.bfloat16, pytest.approx(10.0), pytest.approx(4.0))
    assert kernels.calls == {torch.float32: 4, torch.bfloat16: 4}  # one warm-up and three timed calls each


def test_tuning_off_means_float32_without_timing():
    def clock():
        raise AssertionError("timed with tuning off")

    choice = measure_precision(tiny_mlp_model(), "cpu", timer=clock, settings=Settings(enabled_set=False))
    assert (choice.dtype, choice.reason) == (torch.float32, "tuning off")


def test_cuda_decides_by_compute_capability_not_by_emulated_support(monkeypatch):
    def clock():
        raise AssertionError("timed on CUDA")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation (V100, T4)
    for capability, dtype in (((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float32),
                              ((7, 0), torch.float32)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        choice = measure_precision(tiny_mlp_model(), torch.device("cuda"), timer=clock)
        assert (choice.dtype, choice.reason) == (dtype, "cuda")
    assert precision.bf16_native_cuda((8, 6)) and not precision.bf16_native_cuda((7, 5))


def test_real_clock_gives_a_choice_with_both_timings(settings):
    choice = measure_precision(tiny_mlp_model(), "cpu", settings=settings, tokens=32)
    assert choice.reason == "measured" and choice.ms_fp32 > 0 and choice.ms_bf16 > 0
    assert choice.dtype == (torch.bfloat16 if choice.speedup >= MIN_SPEEDUP else torch.float32)


def test_cpu_flags_are_read(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr(precision, "open", lambda p, *a, **k: real_open(info, *a, **k), raising=False)
    assert precision.bf16_native_cpu() is True
    info.write_text("processor : 0\nflags : fpu avx2\n")
    assert precision.bf16_native_cpu() is False
