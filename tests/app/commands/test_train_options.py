"""Training options around the loop: early stopping, debug= configs, the Optuna sweeper.

Modules: vera_lightning/app/runs/sweep.py.
"""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from helpers.app import SMOKE, compose_app, run_script

from vera_lightning.app.commands.train import train

EPOCHS = [*SMOKE, "trainer.max_steps=-1", "data.max_train_samples=16"]  # 4 steps per epoch


def _train_losses(run_dir):
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def test_early_stopping_monitors_the_optimized_metric(tmp_path):
    cfg = compose_app("train", tmp_path / "lm", *EPOCHS, "callbacks=[early_stopping]")
    assert (cfg.callbacks.early_stopping.monitor, cfg.callbacks.early_stopping.mode) == ("val/loss", "min")
    classifier = compose_app("train", tmp_path / "cls", "callbacks=[default,early_stopping]").callbacks
    assert (classifier.early_stopping.monitor, classifier.early_stopping.mode) == ("val/acc", "max")
    assert classifier.last_checkpoint.filename == "last" and classifier.last_checkpoint.monitor is None


def test_early_stopping_stops(tmp_path):
    # an improvement must be 100 nats: the first validation sets the best, the second stops the run
    cfg = compose_app("train", tmp_path / "run", *EPOCHS, "trainer.max_epochs=10", "callbacks=[early_stopping]",
                      "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=100")
    assert train(cfg)["steps"] == 2 * 4  # not 10 * 4


def test_debug_fast_dev_run_runs_one_batch(tmp_path):
    metrics = train(compose_app("train", tmp_path / "run", *SMOKE, "debug=fast_dev_run"))
    assert metrics["steps"] == 1 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_debug_limit_runs_a_few_batches_per_epoch(tmp_path):
    metrics = train(compose_app("train", tmp_path / "run", *SMOKE, "data.max_train_samples=16", "debug=limit"))
    assert metrics["steps"] == 3 * 2  # limit_train_batches x max_epochs, over the experiment's max_steps=2


def test_debug_overfit_drives_the_training_loss_down(tmp_path):
    # the random tiny OPT learns slowly through its λ's alone (measured: 10.33 -> 9.99 over 60 steps)
    metrics = train(compose_app("train", tmp_path / "run", *SMOKE, "debug=overfit", "optim.lr=0.3", "vera.r=256"))
    assert metrics["steps"] == 2 * 30  # the same 2 batches, 30 epochs
    losses = _train_losses(tmp_path / "run")
    assert len(losses) == 60
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.2, (losses[:6], losses[-6:])


@pytest.mark.slow
def test_optuna_sweep_runs_and_minimizes_the_loss(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script("train", "-m", "hydra/sweeper=vera_optuna", *SMOKE, "hydra.sweeper.n_trials=3",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(3)]
    assert result["best_value"] == pytest.approx(min(job["metric"] for job in jobs), rel=1e-9)  # minimize: val/loss
    best = min(jobs, key=lambda job: job["metric"])
    assert result["best_params"]["vera.r"] == best["r"] and best["r"] in (64, 256, 1024)
    assert (sweep / "summary.csv").is_file()  # the sweep summary callback runs after Optuna too
