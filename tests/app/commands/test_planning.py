"""The run plan: every key checked, the device and the precision resolved once, recorded in plan.json and the
adapter, and replayed by eval/predict/resume without deciding again.

Modules: vera_lightning/app/commands/planning.py, vera_lightning/app/commands/options.py,
vera_lightning/app/commands/configs.py, vera_lightning/app/data/schema.py, vera_lightning/app/runs/plan.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.app import SMOKE, compose_app
from safetensors import safe_open

import vera_lightning.app.commands.planning as planning
from vera_lightning.app.commands.planning import check_outputs, make_plan, resolve_device
from vera_lightning.app.commands.train import train
from vera_lightning.app.runs.plan import PLAN_FILE, read_recorded_plan


def _fake_cuda(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: f"Fake GPU sm_{capability[0]}{capability[1]}")


def test_unknown_keys_in_every_group_are_refused_in_one_message_before_any_work(tmp_path):
    cfg = compose_app("train", tmp_path / "run", *SMOKE, "+data.max_lenght=5", "+optim.momentum=0.9",
                      "+generate.foo=1", "+trainer.max_step=3", "+overwrit=true")
    with pytest.raises(ValueError) as caught:
        make_plan(cfg, "train")
    message = str(caught.value)
    for key in ("data.max_lenght (did you mean max_length?)", "optim.momentum", "generate.foo",
                "trainer.max_step (did you mean max_steps?)", "overwrit (did you mean overwrite?)"):
        assert f"  - {key}: " in message  # each named, with a close name and what the group holds
    assert "optim settings are head_lr, lr, warmup_ratio, weight_decay" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["no", "off", "'false'", "1"])
def test_overwrite_is_typed_in_every_command(tmp_path, value):
    for command, extra in (("train", []), ("predict", ["input=x"])):
        cfg = compose_app(command, tmp_path, *SMOKE, *extra, f"overwrite={value}")
        with pytest.raises(ValueError, match=r"overwrite=.*: must be true or false"):
            make_plan(cfg, command)


def test_data_schema_keeps_required_values_required(tmp_path):
    with pytest.raises(ValueError, match=r"data.data_dir is required with data=sst2"):
        make_plan(compose_app("train", tmp_path, "data=sst2"), "train")
    with pytest.raises(ValueError, match=r"data.hf_name is required with data.format=hf"):
        make_plan(compose_app("train", tmp_path, "data=hf"), "train")
    with pytest.raises(ValueError, match=r"data.max_train_samples=-1: must be a positive integer or null"):
        make_plan(compose_app("train", tmp_path, *SMOKE, "data.max_train_samples=-1"), "train")
    # a data config that sets no monitor falls back to the model's; one that does wins
    assert make_plan(compose_app("train", tmp_path, *SMOKE), "train").optimized_metric == "val/loss"
    glue = compose_app("train", tmp_path, "experiment=glue_minilm", "data=stsb")
    assert (glue.optimized_metric, glue.monitor_mode) == ("val/pearson", "max")


def test_the_default_trainer_uses_the_gpu_where_one_exists(tmp_path, monkeypatch):
    cfg = compose_app("train", tmp_path, *SMOKE)
    assert cfg.trainer.accelerator == "auto"
    assert make_plan(cfg, "train").device.accelerator == "cpu"  # this machine has no GPU
    _fake_cuda(monkeypatch, (8, 0))
    plan = make_plan(compose_app("train", tmp_path, *SMOKE, "model.compute_dtype=auto"), "train")
    assert (plan.device.accelerator, plan.trainer["accelerator"], plan.device.capability) == ("cuda", "gpu", (8, 0))
    # bf16 where native, decided without timing, one scheme: the base in bf16, the Trainer in 32-true
    assert (plan.precision["scheme"], plan.precision["dtype"], plan.trainer["precision"]) == ("bf16-base", "bf16",
                                                                                                "32-true")
    assert "8.0" in plan.precision["reason"]
    # trainer=cpu keeps a GPU machine on its CPU
    assert make_plan(compose_app("train", tmp_path, *SMOKE, "trainer=cpu"), "train").device.accelerator == "cpu"


def test_a_gpu_without_native_bf16_trains_in_float32_and_refuses_an_explicit_bf16(tmp_path, monkeypatch):
    _fake_cuda(monkeypatch, (7, 5))  # T4: is_bf16_supported() would say yes (emulated)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plan = make_plan(compose_app("train", tmp_path, *SMOKE, "model.compute_dtype=auto"), "train")
    assert (plan.device.accelerator, plan.precision["scheme"]) == ("cuda", "fp32")
    with pytest.raises(ValueError, match=r"model.compute_dtype"):
        make_plan(compose_app("train", tmp_path, *SMOKE, "model.compute_dtype=bf16"), "train")


def test_one_precision_scheme_per_run(tmp_path, monkeypatch):
    _fake_cuda(monkeypatch, (9, 0))
    mixed = make_plan(compose_app("train", tmp_path, *SMOKE, "trainer=gpu", "trainer.precision=bf16-mixed",
                                  "model.compute_dtype=auto"), "train")
    assert (mixed.precision["scheme"], mixed.model["compute_dtype"], mixed.trainer["precision"]) == (
        "bf16-mixed", "fp32", "bf16-mixed")  # autocast over a float32 base, not both
    with pytest.raises(ValueError, match=r"trainer.precision"):
        make_plan(compose_app("train", tmp_path, *SMOKE, "trainer.precision=bf16-mixed",
                              "model.compute_dtype=bf16"), "train")


def test_an_accelerator_this_machine_lacks_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.accelerator='gpu': this machine has no CUDA GPU"):
        make_plan(compose_app("train", tmp_path, *SMOKE, "trainer.accelerator=gpu"), "train")
    with pytest.raises(ValueError, match=r"trainer.accelerator='tpu'"):
        resolve_device({"accelerator": "tpu"})


def test_outputs_that_are_hold_or_lie_inside_an_input_are_refused(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    assert check_outputs([run / "adapter"], [run / "adapter"], "output")[0].endswith(
        "Choose a path apart from every input")
    assert "lies inside" in check_outputs([run / "adapter" / "x"], [run / "adapter"], "output")[0]
    assert "holds" in check_outputs([tmp_path], [run / "adapter"], "output")[0]
    assert check_outputs([tmp_path / "other"], [run / "adapter"], "output") == []


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("planned") / "run"
    train(compose_app("train", run, *SMOKE))
    return run


def test_a_training_run_records_its_plan_and_its_adapter_its_precision(recorded_run):
    plan = json.loads((recorded_run / PLAN_FILE).read_text(encoding="utf-8"))
    assert plan["command"] == "train" and plan["device"]["accelerator"] == "cpu"
    assert plan["precision"]["scheme"] == "fp32" and plan["precision"]["requested"] == "fp32"
    assert str(recorded_run / "adapter") in plan["outputs"] and plan["base"]["seed"] == 42
    with safe_open(str(recorded_run / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        recorded = json.loads(handle.metadata()["vera_lightning.precision"])
    assert recorded == plan["precision"]
    summary = json.loads((recorded_run / "summary.json").read_text(encoding="utf-8"))
    assert summary["precision"] == plan["precision"] and summary["device"] == "cpu"


def test_eval_and_predict_replay_the_recorded_precision_without_measuring(recorded_run, tmp_path, monkeypatch):
    record = json.loads((recorded_run / PLAN_FILE).read_text(encoding="utf-8"))
    bf16 = {**record["precision"], "requested": "auto", "dtype": "bf16", "scheme": "bf16-base",
            "reason": "measured on the training machine"}
    (recorded_run / PLAN_FILE).write_text(json.dumps({**record, "precision": bf16}), encoding="utf-8")
    try:
        monkeypatch.setattr(planning, "decide_precision", lambda *a, **k: pytest.fail("decided again"))
        for env in ("0", "1"):  # whatever the tuner's switch, the same precision
            monkeypatch.setenv("VERA_LIGHTNING_AUTOTUNE", env)
            for command, extra in (("eval", []), ("predict", ["input=x"])):
                plan = make_plan(compose_app(command, tmp_path / command, *SMOKE, *extra, "model.compute_dtype=auto",
                                             f"adapter={recorded_run / 'adapter'}"), command)
                assert (plan.precision["scheme"], plan.model["compute_dtype"]) == ("bf16-base", "bf16")
                assert plan.replay.plan_file == str(recorded_run / PLAN_FILE) and plan.replay.differs == ""
        # adapter=<run dir> means its adapter/
        plan = make_plan(compose_app("eval", tmp_path / "ev", *SMOKE, f"adapter={recorded_run}"), "eval")
        assert plan.adapter["path"] == str(recorded_run / "adapter")
    finally:
        (recorded_run / PLAN_FILE).write_text(json.dumps(record), encoding="utf-8")


def test_read_recorded_plan_ignores_what_a_training_run_did_not_write(tmp_path):
    assert read_recorded_plan(tmp_path) is None
    (tmp_path / PLAN_FILE).write_text("{not json", encoding="utf-8")
    assert read_recorded_plan(tmp_path) is None
    (tmp_path / PLAN_FILE).write_text(json.dumps({"command": "eval"}), encoding="utf-8")
    assert read_recorded_plan(tmp_path) is None


# ---------------------------------------------------------------- findings of the hostile pass (issue 36)
def test_overwrite_replaces_only_a_training_run_and_never_leaves_its_old_exports_behind(tmp_path, recorded_run):
    user = tmp_path / "user"
    (user / "csv").mkdir(parents=True)
    (user / "summary.json").write_text('{"mine": 1}', encoding="utf-8")  # a user's folder, not a run
    with pytest.raises(ValueError, match=r"overwrite=true: .* no training run's record .* Nothing was changed"):
        train(compose_app("train", user, *SMOKE, "overwrite=true"))
    assert (user / "summary.json").read_text(encoding="utf-8") == '{"mine": 1}'
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    (run / "merged").mkdir()  # an export of the adapter the new run would replace
    with pytest.raises(ValueError, match=r"holds the exports \['merged'\] of the run it would replace"):
        train(compose_app("train", run, *SMOKE, "overwrite=true"))
    assert (run / "merged").is_dir() and (run / "plan.json").read_bytes() == (recorded_run / "plan.json").read_bytes()


def test_callbacks_and_paths_entries_nothing_reads_are_refused(tmp_path):
    with pytest.raises(ValueError) as caught:
        make_plan(compose_app("train", tmp_path, *SMOKE, "+callbacks.foo=1", "+paths.foo=1"), "train")
    assert "callbacks.foo=1: each callbacks entry is a class to instantiate" in str(caught.value)
    assert "paths.foo: not a paths setting" in str(caught.value)


def test_a_ckpt_path_that_is_not_a_checkpoint_is_one_message(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ckpt_path='.*notes.txt' is not a Lightning checkpoint"):
        train(compose_app("train", tmp_path / "run", *SMOKE, f"ckpt_path={text}"))
    assert not (tmp_path / "run").exists()


def test_an_unreadable_plan_falls_back_to_the_adapters_record(recorded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    (run / PLAN_FILE).write_text("{not json", encoding="utf-8")
    plan = make_plan(compose_app("eval", tmp_path / "ev", *SMOKE, f"adapter={run / 'adapter'}"), "eval")
    assert plan.replay.plan_file.endswith("adapter_model.safetensors")
    assert plan.precision["scheme"] == json.loads((recorded_run / PLAN_FILE).read_text())["precision"]["scheme"]


def test_an_fp16_autocast_run_replays_in_fp32_on_a_cpu_and_says_so(recorded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    record = json.loads((run / PLAN_FILE).read_text(encoding="utf-8"))
    record["precision"] = {**record["precision"], "device": "cuda", "dtype": "fp32", "scheme": "fp16-mixed",
                           "trainer_precision": "16-mixed", "reason": "CUDA compute capability 7.5"}
    (run / PLAN_FILE).write_text(json.dumps(record), encoding="utf-8")
    plan = make_plan(compose_app("eval", tmp_path / "ev", *SMOKE, f"adapter={run / 'adapter'}"), "eval")
    assert (plan.precision["scheme"], plan.trainer["precision"]) == ("fp32", "32-true")
    assert "a CPU has no fp16 autocast" in plan.replay.differs
