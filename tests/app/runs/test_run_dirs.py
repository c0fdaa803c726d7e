"""vera_lightning/app/runs/run_dirs.py, records.py: run directories are append-only records (a refused run leaves
its directory byte for byte as it was, issue 23 items 1, 2, 18); resuming an interrupted run: ckpt_path=last
after a SIGKILL, epoch-boundary exactness, SLURM requeue.

Modules: vera_lightning/app/runs/records.py, vera_lightning/app/runs/resume_data.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import torch
from helpers.app import SMOKE, compose_app, run_script, start_script, wait_for
from safetensors.torch import load_file

from vera_lightning.app.commands.train import train
from vera_lightning.app.runs.records import HeldFileHandler
from vera_lightning.app.runs.run_dirs import check_run_dir, previous_run, resolve_ckpt_path

# 16 lines in batches of 4: 4 steps per epoch, checkpoints (best.ckpt, last.ckpt) after every epoch
LONG = [*SMOKE, "callbacks=default", "trainer.enable_checkpointing=true", "trainer.max_steps=-1",
        "data.max_train_samples=16"]
SLOW = ["+callbacks.slow._target_=helpers.app.SlowDown", "+callbacks.slow.seconds=0.4"]


def _lambdas(adapter: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "vera_lambda" in k}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (itself included): name -> (SHA-256 of a file's bytes, mtime in ns)."""
    entries = {}
    for path in sorted([root, *root.rglob("*")]):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        entries[str(path.relative_to(root))] = (digest, path.stat().st_mtime_ns)
    return entries


def test_epoch_boundary_resume_gives_the_lambdas_of_an_uninterrupted_run(tmp_path):
    # dropout on, shuffled batches: exact only because the RNG and the shuffle order are restored too
    options = [*LONG, "trainer.max_epochs=2", "model.from_config.dropout=0.1"]
    whole = train(compose_app("train", tmp_path / "whole", *options))
    assert whole["steps"] == 8

    stopped = train(compose_app("train", tmp_path / "cut", *options,
                                "+callbacks.stop._target_=helpers.app.StopAfterEpoch"))
    assert stopped["steps"] == 4
    spare = tmp_path / "control" / "checkpoints"
    spare.mkdir(parents=True)
    shutil.copy(tmp_path / "cut" / "checkpoints" / "last.ckpt", spare / "last.ckpt")

    resumed = train(compose_app("train", tmp_path / "cut", *options, "ckpt_path=last"))
    assert resumed["steps"] == 8 and "before/val/loss" not in resumed  # no "before" evaluation when resuming
    assert _same(_lambdas(tmp_path / "cut" / "adapter"), _lambdas(tmp_path / "whole" / "adapter"))
    assert resumed["val/loss"] == whole["val/loss"]

    # control: the same checkpoint without the saved RNG and shuffle states does not reproduce the run
    checkpoint = torch.load(spare / "last.ckpt", weights_only=True)
    assert "RngState" in checkpoint["callbacks"] and "train_generator" in checkpoint["TextDataModule"]
    del checkpoint["callbacks"]["RngState"], checkpoint["TextDataModule"]
    torch.save(checkpoint, spare / "last.ckpt")
    train(compose_app("train", tmp_path / "control", *options, "ckpt_path=last"))
    assert not _same(_lambdas(tmp_path / "control" / "adapter"), _lambdas(tmp_path / "whole" / "adapter"))


def test_last_ckpt_is_the_newest_state_even_without_a_new_best(tmp_path):
    # mode=max on a falling loss: only the first epoch is "best"; last.ckpt must still follow training
    train(compose_app("train", tmp_path / "run", *LONG, "trainer.max_epochs=2", "callbacks.model_checkpoint.mode=max"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "best.ckpt", weights_only=True)["global_step"] == 4
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 8


def test_ckpt_path_names_a_missing_checkpoint_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: .*run/checkpoints/last.ckpt does not exist\. "
                                                r"Run the command again with hydra.run.dir="):
        train(compose_app("train", tmp_path / "run", *SMOKE, "ckpt_path=last"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='.*nope.ckpt': no such checkpoint file"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path / "run")


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_with_ckpt_path_last(tmp_path):
    run_dir = tmp_path / "run"
    args = [*LONG, "trainer.max_epochs=4", f"hydra.run.dir={run_dir}"]
    proc = start_script("train", *args, *SLOW, cwd=tmp_path)
    try:
        last = run_dir / "checkpoints" / "last.ckpt"
        wait_for(last.is_file, what="checkpoints/last.ckpt", proc=proc)
        wait_for(lambda: (run_dir / "csv" / "metrics.csv").is_file(), what="metrics.csv", proc=proc)
        assert proc.poll() is None, "the run finished before it could be interrupted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "summary.json").exists()
    interrupted_at = torch.load(last, weights_only=True)["global_step"]
    assert 4 <= interrupted_at < 16

    resumed = run_script("train", *args, "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[vera] resuming from {last}" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 16

    uninterrupted = train(compose_app("train", tmp_path / "whole", *LONG, "trainer.max_epochs=4"))
    assert uninterrupted["steps"] == 16
    assert _same(_lambdas(run_dir / "adapter"), _lambdas(tmp_path / "whole" / "adapter"))  # from an epoch boundary
    assert (run_dir / "csv" / "metrics.1.csv").is_file()  # the interrupted run's metrics are kept
    # the run's own Hydra record is kept; the resumed attempt adds its own
    assert "ckpt_path=last" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "ckpt_path=last" in (run_dir / ".hydra" / "resume.1" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_slurm_preemption_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path):
    """What `hydra/launcher=slurm` relies on: Lightning's SLURMEnvironment handles SIGUSR1 (auto-requeue)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records the requeue request instead of talking to SLURM
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "vera-test", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    args = [*LONG, "trainer.max_epochs=4", f"hydra.run.dir={run_dir}"]
    proc = start_script("train", *args, *SLOW, cwd=tmp_path, extra_env=slurm)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), what="a first epoch", proc=proc)
        proc.send_signal(signal.SIGUSR1)  # what SLURM sends signal_delay_s before the time limit
        wait_for(lambda: (tmp_path / "scontrol.log").is_file(), what="scontrol requeue", proc=proc)
        assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)  # SLURM ends the job
        proc.wait()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved_at = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"]
    assert 4 <= saved_at < 16

    requeued = run_script("train", *args, cwd=tmp_path, extra_env=slurm)  # the same job, started again
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in requeued.stdout + requeued.stderr  # Lightning: "Restoring states from ..."
    assert "[vera] before training" not in requeued.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 16


def test_slurm_launcher_asks_for_sigusr1_and_requeue(tmp_path):
    from helpers.app import CONF
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from submitit.slurm.slurm import _make_sbatch_string

    from vera_lightning.app import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
                                          "hydra.launcher.signal_delay_s=300"], return_hydra_config=True)
    params = instantiate(cfg.hydra.launcher).params  # what hydra-submitit-launcher hands to submitit
    sbatch = _make_sbatch_string(command="python train.py", folder=str(tmp_path), nodes=params["nodes"],
                                 signal_delay_s=params["signal_delay_s"],
                                 additional_parameters=params["additional_parameters"])
    lines = sbatch.splitlines()
    # Lightning's requeue signal, not submitit's USR2, sent signal_delay_s before the end; the job may be requeued
    assert "#SBATCH --signal=USR1@300" in lines and "#SBATCH --requeue" in lines and "#SBATCH --nodes=2" in lines


# ------------------------------------------------------------------ run directories are append-only records
def test_refused_runs_leave_the_run_directory_byte_for_byte(tmp_path):
    """Through scripts/train.py, so that what Hydra writes before the task (.hydra/, train.log) is covered too."""
    run_dir = tmp_path / "run"
    args = [*LONG, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    first = run_script("train", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert set(previous_run(run_dir)) == {".hydra", "summary.json", "checkpoints", "csv", "adapter"}
    assert (run_dir / "train.log").is_file()
    before = _tree(run_dir)

    # item 1: a resume into a model built differently is refused by the checkpoint's own check
    refused = run_script("train", *args, "model.from_config.num_hidden_layers=3", "ckpt_path=last", cwd=tmp_path)
    assert refused.returncode == 1 and "slim VeRA checkpoint does not fit the model" in refused.stderr
    assert _tree(run_dir) == before  # not .hydra/*.yaml, csv/hparams.yaml, metrics.csv (renamed before), train.log

    # item 2: a fresh run into the same directory (in this process: Hydra's part is the one just checked)
    with pytest.raises(FileExistsError) as refused_fresh:
        train(compose_app("train", run_dir, *LONG, "trainer.max_epochs=1", "seed=5"))
    assert str(refused_fresh.value).startswith(
        f"{run_dir} already holds a training run (.hydra, summary.json, checkpoints, csv, adapter); a new run there "
        "would replace its records, so nothing was changed. Either resume it with ckpt_path=last (the same command "
        "plus ckpt_path=last), or start the new run in another directory (another hydra.run.dir=...")
    assert "or pass overwrite=true to replace that run" in str(refused_fresh.value)
    assert _tree(run_dir) == before


def test_a_foreign_file_in_the_adapter_dir_is_refused_before_the_first_step(tmp_path):
    """Item 18: before, the run trained and only then failed to save, so its λ's were saved nowhere."""
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "notes.txt").write_text("mine")
    before = _tree(run_dir)
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(ValueError, match=r"run/adapter holds \['notes.txt'\], which are not adapter files .* "
                                             r"Nothing was changed; move those files elsewhere"):
            train(compose_app("train", run_dir, *LONG, "trainer.max_epochs=1", *extra))
        assert _tree(run_dir) == before  # no checkpoint, no metrics: not a step was trained


def test_overwrite_true_replaces_a_run_keeping_its_metrics_and_a_resume_is_checked_for_foreign_files(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_app("train", run_dir, *LONG, "trainer.max_epochs=1"))
    first_lambdas, first_metrics = _lambdas(run_dir / "adapter"), (run_dir / "csv" / "metrics.csv").read_bytes()
    with pytest.raises(FileExistsError, match=r"run already holds a training run .* resume it with ckpt_path=last"):
        train(compose_app("train", run_dir, *LONG, "trainer.max_epochs=1", "seed=5"))

    (run_dir / "adapter" / "notes.txt").write_text("mine")
    before = _tree(run_dir)
    with pytest.raises(ValueError, match=r"run/adapter holds \['notes.txt'\]"):
        train(compose_app("train", run_dir, *LONG, "trainer.max_epochs=2", "ckpt_path=last"))
    assert _tree(run_dir) == before
    (run_dir / "adapter" / "notes.txt").unlink()

    train(compose_app("train", run_dir, *LONG, "trainer.max_epochs=1", "seed=5", "overwrite=true"))
    assert not _same(_lambdas(run_dir / "adapter"), first_lambdas)
    assert (run_dir / "csv" / "metrics.1.csv").read_bytes() == first_metrics  # the replaced run's metrics are kept
    assert (run_dir / "csv" / "hparams.1.yaml").is_file() and (run_dir / "csv" / "metrics.csv").is_file()


def test_what_counts_as_a_run(tmp_path):
    run_dir = tmp_path / "run"
    assert previous_run(run_dir) == [] and previous_run(tmp_path) == []
    run_dir.mkdir()
    (run_dir / "train.log").write_text("a log of a run refused before\n")
    (run_dir / "csv").mkdir()  # empty
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "README.md").write_text("mine")  # foreign without an adapter beside it
    assert previous_run(run_dir) == []
    with pytest.raises(ValueError, match=r"holds \['README.md'\]"):
        check_run_dir(run_dir, resuming=False, overwrite=False)
    check_run_dir(run_dir, resuming=False, overwrite=False, method="head")  # head/full write model.safetensors
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert previous_run(run_dir) == ["adapter", "hpc_ckpt_1.ckpt"]
    check_run_dir(run_dir, resuming=True, overwrite=False)  # README.md beside an adapter: PEFT's model card
    with pytest.raises(FileExistsError, match=r"it cannot be resumed \(.*checkpoints/last.ckpt does not exist"):
        check_run_dir(run_dir, resuming=False, overwrite=False)
    (run_dir / "summary.json").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"file is a file"):
        check_run_dir(tmp_path / "file", resuming=False, overwrite=True)


def test_the_job_log_is_held_until_the_run_is_accepted(tmp_path):
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "checked", None, None)
    (tmp_path / "new").mkdir()
    fresh = HeldFileHandler(str(tmp_path / "new" / "train.log"))
    fresh.emit(record)  # an empty directory too: a refused run leaves no log behind
    assert not (tmp_path / "new" / "train.log").exists()
    fresh.discard()
    fresh.close()
    assert list((tmp_path / "new").iterdir()) == []
    fresh = HeldFileHandler(str(tmp_path / "new" / "train.log"))
    fresh.emit(record)
    fresh.admit()  # accepted: written
    assert (tmp_path / "new" / "train.log").read_text() == "checked\n"
    fresh.close()

    log = tmp_path / "train.log"
    log.write_text("the earlier run\n")
    for outcome, expected in (("discard", "the earlier run\n"), ("admit", "the earlier run\nchecked\nchecked\n")):
        handler = HeldFileHandler(str(log))
        handler.emit(record)
        assert log.read_text() == "the earlier run\n"  # held
        getattr(handler, outcome)()
        handler.emit(record)  # after a refusal nothing more is written; after admission everything is
        handler.close()
        assert log.read_text() == expected


def test_a_run_refused_by_the_modules_checks_writes_no_record_and_the_fixed_command_can_use_the_directory(tmp_path):
    """Lightning calls the callbacks' setup before the module's: the prompt-length check of the generation
    metrics (CausalLMModule) used to fail after RunRecord had accepted the run, leaving .hydra/ behind, so the
    corrected command was refused as "already holds a training run"."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("train.csv", "val.csv"):
        (data_dir / name).write_text("mr,ref\n" + "".join(f'"name[N{i}], food[F{i}]",N{i} serves F{i}.\n'
                                                           for i in range(8)), encoding="utf-8")
    run_dir = tmp_path / "run"
    sft = [*SMOKE, "data=sft", f"data.data_dir={data_dir}", "data.train_file=train.csv", "data.val_file=val.csv",
           "data.prompt_field=mr", "data.response_field=ref", "data.max_length=32", "trainer.max_steps=1"]
    with pytest.raises(ValueError, match=r"generate.max_new_tokens=500: \d+ positions, but the model has 128"):
        train(compose_app("train", run_dir, *sft, "generate.max_new_tokens=500"))
    assert previous_run(run_dir) == [] and not (run_dir / ".hydra").exists()
    metrics = train(compose_app("train", run_dir, *sft, "generate.max_new_tokens=4"))
    assert metrics["steps"] == 1 and "val/bleu" in metrics
    assert {"summary.json", "adapter"} <= set(previous_run(run_dir))


def test_resuming_with_other_data_settings_is_refused_naming_both_values(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(__file__).resolve().parents[3] / "vera_lightning" / "app" / "data" / "demo_data", data)
    run_dir = tmp_path / "run"
    first = run_script("train", *LONG, "trainer.max_epochs=1", "eval_before=false", f"hydra.run.dir={run_dir}",
                       cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = _tree(run_dir)
    done = run_script("train", *LONG, "trainer.max_epochs=2", "eval_before=false", f"hydra.run.dir={run_dir}",
                      "ckpt_path=last", f"data.data_dir={data}", "data.max_length=24", "data.eval_batch_size=2",
                      cwd=tmp_path)
    assert done.returncode == 1
    record = run_dir / ".hydra" / "config.yaml"
    assert "Traceback" not in done.stderr
    assert (
        f"Error: ckpt_path=last: the run in {run_dir} was trained with other data settings than this command gives "
        f"({record}): data.data_dir=None (recorded) vs '{data}' (given); data.max_length=32 (recorded) vs 24 (given). "
        "A resumed run continues on the data it started with: give the recorded values (or leave those overrides "
        "out), or start a new run from that checkpoint in another directory (hydra.run.dir=<new dir> ckpt_path=<the "
        ".ckpt file>). Nothing was changed") in done.stderr
    assert _tree(run_dir) == before


def test_resume_data_check_compares_the_record_and_lets_batch_sizes_for_eval_change(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "seed: 3\ndata:\n  data_dir: ./d\n  max_length: 32\n  eval_batch_size: 8\n  seed: ${seed}\n", encoding="utf-8")
    from omegaconf import OmegaConf

    from vera_lightning.app.runs.resume_data import check_resume_data

    same = {"data_dir": str((Path.cwd() / "d")), "max_length": 32, "eval_batch_size": 2, "seed": 3}
    check_resume_data(tmp_path, OmegaConf.create(same), "last")  # the same folder written another way; eval batch
    with pytest.raises(ValueError, match=r"data.seed=3 \(recorded\) vs 4 \(given\)"):
        check_resume_data(tmp_path, OmegaConf.create({**same, "seed": 4}), "last")
    check_resume_data(tmp_path / "elsewhere", OmegaConf.create({"max_length": 1}), "x.ckpt")  # no record: no check


def test_a_resume_may_change_data_pad_to_multiple_of(tmp_path):
    """Padding to a multiple adds masked tokens only (the same rows, the same loss): a run trained with
    ``data.pad_to_multiple_of=1``, or recorded before the setting existed, resumes with the default 8."""
    from omegaconf import OmegaConf

    from vera_lightning.app.runs.resume_data import check_resume_data

    (tmp_path / ".hydra").mkdir()
    given = OmegaConf.create({"max_length": 32, "pad_to_multiple_of": 8})
    for recorded in ("  pad_to_multiple_of: 1\n", ""):
        (tmp_path / ".hydra" / "config.yaml").write_text("data:\n  max_length: 32\n" + recorded, encoding="utf-8")
        check_resume_data(tmp_path, given, "last")
