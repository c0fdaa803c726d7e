"""vera_lightning/app/models/precision_choice.py: one precision decision per run, for the device it runs on.

CUDA is faked (``torch.cuda.is_available`` / ``get_device_capability``): the suite runs without a GPU. The CPU
measurement is faked where a test needs a given answer (``measure_precision``); the suite's tuner is off.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.app import compose_app
from helpers.models import tiny_bert

from vera_lightning.app.models import precision_choice
from vera_lightning.app.models.precision_choice import PrecisionDecision, decide_precision, replay_precision
from vera_lightning.forward.precision import PrecisionChoice


@pytest.fixture
def gpu(monkeypatch):
    """``gpu((major, minor))``: CUDA available with that compute capability (and emulated bf16 reported as support)."""

    def fake(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # must not be what decides

    return fake


@pytest.fixture
def measured(monkeypatch):
    """``measured(ms_fp32, ms_bf16)``: the CPU measurement's answer (records the models it was asked about)."""
    asked = []

    def fake(ms_fp32, ms_bf16):
        dtype = torch.bfloat16 if ms_fp32 >= 1.3 * ms_bf16 else torch.float32

        def measure(model, device, **kwargs):
            asked.append((model, device, kwargs))
            return PrecisionChoice(dtype, "measured", (kwargs.get("tokens", 512), 64, 128), ms_fp32, ms_bf16)

        monkeypatch.setattr(precision_choice, "measure_precision", measure)
        return asked

    return fake


@pytest.mark.parametrize("capability, dtype, reason", [
    ((8, 0), "bf16", "CUDA compute capability 8.0 (native bf16)"),
    ((9, 0), "bf16", "CUDA compute capability 9.0 (native bf16)"),
    ((7, 5), "fp32", "CUDA compute capability 7.5: no native bf16"),
    ((7, 0), "fp32", "CUDA compute capability 7.0: no native bf16"),
])
def test_auto_on_cuda_is_bf16_only_where_native(gpu, capability, dtype, reason):
    gpu(capability)
    decision = decide_precision("auto", "cuda")
    assert (decision.dtype, decision.reason, decision.device) == (dtype, reason, "cuda")
    assert (decision.scheme, decision.trainer_precision) == ("bf16-base" if dtype == "bf16" else "fp32", "32-true")
    assert decide_precision("auto", "cuda:0", cuda_capability=capability) == decision  # the same, given


def test_explicit_bf16_on_a_gpu_without_native_bf16_is_refused(gpu):
    gpu((7, 5))
    with pytest.raises(ValueError, match=r"model.compute_dtype=bf16 on a GPU with CUDA compute capability 7.5: it "
                                         r"has no native bf16 .* use model.compute_dtype=auto or fp32"):
        decide_precision("bf16", "gpu")
    gpu((8, 6))
    assert decide_precision("bf16", "gpu").scheme == "bf16-base"


def test_cuda_that_is_not_there_is_named():
    if torch.cuda.is_available():
        pytest.skip("a real GPU")
    with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available on this machine"):
        decide_precision("auto", "cuda")


def test_a_mixed_trainer_precision_is_the_one_scheme(tmp_path, gpu):
    gpu((8, 0))
    trainer = compose_app("train", tmp_path, "trainer=gpu", "trainer.precision=bf16-mixed").trainer.precision
    for requested in ("auto", "fp32"):
        decision = decide_precision(requested, "cuda", trainer_precision=trainer)
        assert (decision.scheme, decision.dtype, decision.trainer_precision) == ("bf16-mixed", "fp32", "bf16-mixed")
        assert decision.compute == "bf16" and decision.torch_dtype == torch.float32  # the base is not cast too
    fp16 = decide_precision("auto", "cuda", trainer_precision="16-mixed")
    assert (fp16.scheme, fp16.dtype, fp16.trainer_precision) == ("fp16-mixed", "fp32", "16-mixed")


@pytest.mark.parametrize("trainer", ["bf16-mixed", "16-mixed", "bf16"])
def test_bf16_base_with_a_mixed_trainer_is_refused_naming_both(gpu, trainer):
    gpu((8, 0))
    with pytest.raises(ValueError, match=r"model.compute_dtype=bf16 with trainer.precision=b?f?16-mixed: two "
                                         r"precision schemes at once.*trainer.precision=32-true"):
        decide_precision("bf16", "cuda", trainer_precision=trainer)


def test_bf16_autocast_on_a_gpu_without_native_bf16_is_refused(gpu):
    gpu((7, 5))
    with pytest.raises(ValueError, match=r"trainer.precision=bf16-mixed on a GPU with CUDA compute capability 7.5.*"
                                         r"use trainer.precision=16-mixed or 32-true"):
        decide_precision("auto", "cuda", trainer_precision="bf16-mixed")


@pytest.mark.parametrize("trainer", ["bf16-true", "16-true", "64-true", "transformer-engine"])
def test_true_half_trainer_precisions_are_refused(trainer):
    with pytest.raises(ValueError, match=rf"trainer.precision='{trainer}': use 32-true .* bf16-mixed or 16-mixed"):
        decide_precision("fp32", "cpu", trainer_precision=trainer)


def test_cpu_auto_is_measured_and_the_decision_carries_the_timings(measured):
    asked = measured(10.0, 4.0)
    model = tiny_bert()
    decision = decide_precision("auto", "cpu", model=model)
    assert (decision.dtype, decision.scheme, decision.trainer_precision) == ("bf16", "bf16-base", "32-true")
    assert decision.reason == "measured 10.00 ms fp32 vs 4.00 ms bf16 per linear fwd+bwd (512x64x128, 2.50x)"
    assert (decision.ms_fp32, decision.ms_bf16, decision.shape) == (10.0, 4.0, (512, 64, 128))
    assert asked[0][0] is model and asked[0][1] == torch.device("cpu")
    slower = measured(10.0, 9.0)
    assert decide_precision("auto", "cpu", model=model).dtype == "fp32"
    decide_precision("auto", "cpu", shape=(256, 64, 96))  # no model: a stand-in linear of that shape, on meta
    stand_in = slower[-1]
    assert stand_in[0].weight.shape == (96, 64) and stand_in[0].weight.is_meta and stand_in[2] == {"tokens": 256}


def test_cpu_auto_needs_something_to_time():
    with pytest.raises(ValueError, match=r"measuring on the CPU needs the model"):
        decide_precision("auto", "cpu")


def test_tuning_off_is_float32_without_timing():  # the suite runs with VERA_LIGHTNING_AUTOTUNE=0
    decision = decide_precision("auto", "cpu", model=tiny_bert())
    assert (decision.dtype, decision.reason, decision.ms_fp32) == ("fp32", "tuning off", None)


def test_full_finetuning_gets_bf16_as_autocast_not_a_bf16_base(measured, gpu):
    measured(10.0, 4.0)
    decision = decide_precision("auto", "cpu", model=tiny_bert(), finetune="full")
    assert (decision.scheme, decision.dtype, decision.trainer_precision) == ("bf16-mixed", "fp32", "bf16-mixed")
    assert decision.reason.startswith("finetune=full trains every weight, so bf16 comes as autocast")
    assert decide_precision("bf16", "cpu", model=tiny_bert(), finetune="full").scheme == "bf16-mixed"
    assert decide_precision("fp32", "cpu", finetune="full").scheme == "fp32"
    assert decide_precision("auto", "cpu", model=tiny_bert(), finetune="head").scheme == "bf16-base"
    gpu((7, 5))
    assert decide_precision("auto", "cuda", finetune="full").scheme == "fp32"


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    monkeypatch.setattr(precision_choice, "bf16_native_cpu", lambda: False)  # untimed (tuning off): the CPU's flags
    with pytest.warns(UserWarning, match=r"model.compute_dtype=bf16 on a CPU without native bf16"):
        decision = decide_precision("bf16", "cpu", model=tiny_bert())
    assert (decision.scheme, decision.reason) == ("bf16-base", "requested")


def test_explicit_bf16_where_it_measured_slower_warns_with_the_slowdown(measured):
    measured(2.0, 100.0)
    with pytest.warns(UserWarning, match=r"model.compute_dtype=bf16 is 50.0x slower than float32 on this CPU"):
        assert decide_precision("bf16", "cpu", model=tiny_bert()).dtype == "bf16"


def test_requested_values_are_checked():
    with pytest.raises(ValueError, match=r"model.compute_dtype='fp16': use one of \['auto', 'fp32', 'bf16'\]"):
        decide_precision("fp16", "cpu")
    with pytest.raises(ValueError, match=r"decide_precision\(device='auto'\): pass the resolved device"):
        decide_precision("fp32", "auto")
    assert decide_precision("fp32", "cpu").reason == "requested"


def test_the_decision_records_to_json_and_back(measured):
    measured(10.0, 4.0)
    decision = decide_precision("auto", "cpu", model=tiny_bert())
    record = json.loads(json.dumps(decision.to_dict()))
    assert record["scheme"] == "bf16-base" and record["shape"] == [512, 64, 128]
    assert PrecisionDecision.from_dict(record) == decision
    assert "precision: bf16-base (model.compute_dtype=auto on cpu, trainer.precision=32-true: measured" in \
        decision.describe()
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        PrecisionDecision.from_dict({**record, "colour": "red"})
    with pytest.raises(ValueError, match=r"scheme bf16-mixed runs under bf16-mixed"):
        PrecisionDecision.from_dict({**record, "scheme": "bf16-mixed"})
    with pytest.raises(ValueError, match=r"a bf16-stored model is bf16-base"):
        PrecisionDecision.from_dict({**record, "scheme": "fp32"})


def test_replay_keeps_the_record_and_says_what_differs(monkeypatch, gpu):
    run = PrecisionDecision("auto", "cpu", "bf16", "bf16-base", "32-true", "measured ...")
    monkeypatch.setattr(precision_choice, "bf16_native_cpu", lambda: True)
    assert replay_precision(run.to_dict(), "cpu") == (run, None)
    assert replay_precision(run, "cpu", override="auto") == (run, None)  # auto: replay, never decide again
    assert replay_precision(run, "cpu", override="bf16") == (run, None)
    decision, note = replay_precision(run, "cpu", override="fp32")
    assert decision.scheme == "fp32" and note.startswith("model.compute_dtype=fp32 overrides the run's recorded "
                                                         "precision (bf16-base, decided on cpu: measured ...)")
    monkeypatch.setattr(precision_choice, "bf16_native_cpu", lambda: False)
    decision, note = replay_precision(run, "cpu")
    assert decision == run and "on a CPU without native bf16: the same numbers as its validation" in note
    gpu((7, 5))
    decision, note = replay_precision(run, "cuda")
    assert decision == run and "a GPU with CUDA compute capability 7.5" in note
    fp32 = PrecisionDecision("fp32", "cpu", "fp32", "fp32", "32-true", "requested")
    assert replay_precision(fp32, "cuda") == (fp32, None)
