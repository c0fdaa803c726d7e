"""logger=[csv,mlflow,wandb]: metrics, the composed config and the adapter artifact, read back per tracker."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
import yaml
from helpers.app import SMOKE, compose_app, wandb_records

from vera_lightning.app.commands.train import train

pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One smoke run logging to CSV, MLflow (local store) and W&B (offline), with no network."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(root / name.lower()))  # nothing written to the home directory
        mp.delenv("WANDB_MODE", raising=False)  # offline comes from conf/logger/wandb.yaml
        mp.setenv("WANDB_SILENT", "true")
        run_dir = root / "run"
        metrics = train(compose_app("train", run_dir, *SMOKE, "logger=[csv,mlflow,wandb]"))
    return metrics, run_dir


def _md5_b64(path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_mlflow_records_metrics_config_and_adapter(tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient

    metrics, run_dir = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vera-lightning")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny_opt-demo_text"
    params = run.data.params
    assert (params["model/name"], params["data/name"], params["vera/r"], params["optim/lr"]) == (
        "tiny_opt", "demo_text", "16", "0.01")
    assert params["trainer/max_steps"] == "2" and params["lr"] == "0.01"  # the composed config + the module's
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.value for m in history][0] == metrics["before/val/loss"]
    assert run.data.metrics["val/loss"] == metrics["val/loss"]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert run.data.metrics["run/trainable_params"] == metrics["trainable_params"] == 192

    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "adapter")) == [
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    local = client.download_artifacts(run.info.run_id, "adapter", str(tmp_path))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "adapter" / name).read_bytes() == (run_dir / "adapter" / name).read_bytes(), local
    stored = sorted(p.name for p in (run_dir / "mlartifacts").rglob("adapter/*"))
    assert stored == ["adapter_config.json", "adapter_model.safetensors"]  # the local store is in the run dir


def test_wandb_offline_run_records_metrics_config_and_adapter(tracked_run):
    metrics, run_dir = tracked_run
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    config, history, artifacts, kinds = {}, {}, [], set()
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
        elif kind == "artifact":
            artifacts.append(record.artifact)
    assert {"run", "exit"} <= kinds  # a complete run: started and finished
    assert config["model"]["name"] == "tiny_opt" and config["vera"]["r"] == 16 and config["optim"]["lr"] == 0.01
    assert config["lr"] == 0.01  # the LightningModule's hyper-parameters too
    assert history["val/loss"][0] == pytest.approx(metrics["before/val/loss"], rel=1e-12)
    assert history["val/loss"][-1] == pytest.approx(metrics["val/loss"], rel=1e-12)
    assert len(history["train/loss"]) == 2
    (artifact,) = artifacts
    assert artifact.type == "model" and artifact.name.startswith("adapter-")
    digests = {entry.path: entry.digest for entry in artifact.manifest.contents}
    assert digests == {name: _md5_b64(run_dir / "adapter" / name)
                       for name in ("adapter_config.json", "adapter_model.safetensors")}


def test_csv_logger_keeps_the_composed_config_next_to_the_metrics(tracked_run):
    metrics, run_dir = tracked_run
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["model"]["name"] == "tiny_opt" and hparams["vera"]["r"] == 16 and hparams["lr"] == 0.01
    assert "val/loss" in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
