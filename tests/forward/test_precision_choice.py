"""forward/precision.py: ``auto`` picks bf16 only where it measured faster by the margin, and caches the choice."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import tiny_llama
from torch import nn

from vera_lightning.forward import precision
from vera_lightning.forward.precision import MIN_SPEEDUP, measure_precision, representative_shape
from vera_lightning.forward.tune_settings import Settings


class FakeClock:
    """A clock whose every timed step takes ``fp32_s`` seconds in float32 and ``bf16_s`` in bf16.

    ``measure_precision`` times float32 first (``2 * (repeats + 1)`` clock reads), then bf16.
    """

    def __init__(self, fp32_s: float, bf16_s: float, repeats: int = 3) -> None:
        self.steps = {"fp32": fp32_s, "bf16": bf16_s}
        self.fp32_reads = 2 * (repeats + 1)
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
    if bf16_s == 0.5:  # emulated bf16: the first step past 3x float32 ends the measuring
        assert clock.reads == clock.fp32_reads + 2


def test_tuning_off_means_float32_without_timing():
    def clock():
        raise AssertionError("timed with tuning off")

    choice = measure_precision(tiny_mlp_model(), "cpu", timer=clock, settings=Settings(enabled_set=False))
    assert (choice.dtype, choice.reason) == (torch.float32, "tuning off")


def test_cuda_decides_by_device_support(monkeypatch):
    def clock():
        raise AssertionError("timed on CUDA")

    for supported, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        choice = measure_precision(tiny_mlp_model(), torch.device("cuda"), timer=clock)
        assert (choice.dtype, choice.reason) == (dtype, "cuda")


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
