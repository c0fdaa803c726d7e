"""What the app records in experiment trackers beyond Lightning's own metric logging.

Lightning logs the metrics (``train/loss``, ``val/...``) and the LightningModule's
hyper-parameters to every logger. :func:`log_config` adds the whole composed Hydra config
(so a run can be reproduced from the tracker alone), :func:`log_adapter` uploads the saved
adapter directory as an artifact (MLflow: ``adapter/`` in the run's artifacts; W&B: an
artifact of type ``model``), and :func:`close` ends W&B runs so their files are complete
when ``train`` returns (a sweep then starts a fresh run per job).

Logger configs: ``conf/logger/{csv,tensorboard,mlflow,wandb}.yaml``; combine them with
``logger=[csv,mlflow]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger, WandbLogger  # importable without mlflow / wandb
from omegaconf import OmegaConf

__all__ = ["log_config", "log_adapter", "close"]


def log_config(loggers: list[Any], record: str) -> None:
    """Log the composed config (the plan's resolved YAML record; nested keys flattened by each logger)."""
    if not loggers:
        return
    node = OmegaConf.create(record)
    try:
        params = OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation only Hydra's job can resolve (${hydra:...}): logged as written
        params = OmegaConf.to_container(node, resolve=False)
    for logger in loggers:
        logger.log_hyperparams(params)


def log_adapter(loggers: list[Any], adapter_dir: Path, metrics: dict[str, Any]) -> None:
    """Record the adapter directory as an artifact and the run's summary numbers as metrics.

    Args:
        loggers: The Trainer's loggers (CSV/TensorBoard get only the summary metrics: the
            adapter already sits in the run directory).
        adapter_dir: The saved adapter (``adapter_config.json`` + ``adapter_model.safetensors``).
        metrics: What ``train`` returns; ``trainable_params``, ``adapter_bytes`` and
            ``wall_time_s`` are logged under ``run/``.
    """
    summary = {f"run/{k}": float(metrics[k])
               for k in ("trainable_params", "adapter_bytes", "wall_time_s") if k in metrics}
    for logger in loggers:
        if summary:
            logger.log_metrics(summary, step=int(metrics.get("steps", 0)))
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifacts(logger.run_id, str(adapter_dir), artifact_path="adapter")
        elif isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata={"format": "peft-vera"})
            artifact.add_dir(str(adapter_dir))
            run.log_artifact(artifact)
        logger.save()


def close(loggers: list[Any]) -> None:
    """Finish W&B runs (flushes the offline run files); other loggers were finalised by Lightning."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
