"""``train(cfg) -> metrics`` for a composed ``conf/train.yaml``.

``scripts/train.py`` is the ``@hydra.main`` wrapper around :func:`train`; tests and
notebooks call :func:`train` directly with a config composed by Hydra's compose API.
A run builds the model, data and LightningModule the config names, adds
:class:`~vera_lightning.VeraCallback` (inject + freeze in ``setup``), reports the
monitored metric before and after training, writes the adapter in PEFT's layout to
``<output_dir>/adapter`` and ``summary.json`` next to it, and returns the metrics.

``ckpt_path=last|PATH`` resumes an interrupted run (:mod:`~vera_lightning.app.runs.run_dirs`);
loggers also get the composed config and the adapter as an artifact
(:mod:`~vera_lightning.app.runs.trackers`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from vera_lightning import count_parameters, model_bytes
from vera_lightning.app.commands.build import (
    base_model_id,
    build_components,
    check_head_trains,
    check_monitored,
    instantiate_dict,
    register_configs,
    vera_config_from,
)
from vera_lightning.app.commands.export import check_format, export_run
from vera_lightning.app.commands.preflight import preflight
from vera_lightning.app.runs import trackers
from vera_lightning.app.runs.records import RunRecord, discard_job_log
from vera_lightning.app.runs.run_dirs import RngState
from vera_lightning.app.tasks.final_validation import ValidationMemo, final_metrics, validation_metrics
from vera_lightning.app.tasks.finetune import prepare, save_trained

__all__ = ["register_configs", "vera_config_from", "train"]

log = logging.getLogger(__name__)


def _say(trainer: pl.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(message, flush=True)


def _dir_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune the configured model with VeRA and return its metrics.

    Args:
        cfg: A composed ``conf/train.yaml`` (``paths.output_dir`` must be set; under
            ``@hydra.main`` it is the run directory).

    Returns:
        The final validation metrics (``val/acc``, ``val/f1``, ``val/loss`` or ``val/ppl``), the
        same metrics before training under ``before/...`` (if ``eval_before``), and ``metric``
        (the value of ``optimized_metric``), ``trainable_params``, ``total_params``,
        ``adapter_bytes``, ``adapter_dir``, ``model_bytes`` and ``quantized_bytes`` (parameters and
        buffers in memory, see :func:`vera_lightning.model_bytes`), ``fit_s`` (seconds in
        this call's ``trainer.fit``: the training loop with its validation) and ``wall_time_s`` (the whole call,
        model loading and the final validation included).

    Raises:
        ValueError: For an inconsistent config (the message names the option and the fix).
        FileExistsError: If the run directory holds another run (resume it with ``ckpt_path=last``, or
            ``overwrite=true``).
        ModelUnavailableError: If a hub model cannot be fetched (offline).

    A refused run leaves the run directory as it was: nothing is written before every check passed
    (:mod:`vera_lightning.app.runs.records`).
    """
    try:
        return _train(cfg)
    except BaseException:
        discard_job_log()  # a refused run leaves Hydra's job log as it was (no effect once the run was accepted)
        raise


def _train(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    export_fmt = check_format(cfg.export) if cfg.get("export") else None  # train.py export=merged|lora|gguf-lora
    checked = preflight(cfg, "train")  # settings, run directory, every data row: before any model or write
    output_dir = Path(cfg.paths.output_dir)
    vera_config, method, ckpt_path, resuming = checked.vera_config, checked.method, checked.ckpt_path, checked.resuming
    overwrite = bool(cfg.get("overwrite", False))

    parts = build_components(cfg, tokenizer=checked.tokenizer, datamodule=checked.datamodule)
    task, model, module, datamodule = parts.task, parts.model, parts.module, parts.datamodule
    check_head_trains(task, model, vera_config, method)
    check_monitored(cfg.optimized_metric, module.metric_names)

    loggers = instantiate_dict(cfg.get("logger"))
    # nothing is written to the run directory until the run is accepted: loggers, CSV history, .hydra record
    record = RunRecord(cfg, output_dir, loggers, resuming=resuming, keep_history=resuming or overwrite)
    memo = ValidationMemo()  # the last validation inside fit, reused when it saw the final weights
    callbacks = [*prepare(method, model, vera_config), RngState(), record, memo,
                 *instantiate_dict(cfg.get("callbacks"))]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False)

    metric_name = cfg.optimized_metric
    metrics: dict[str, Any] = {}
    if cfg.get("eval_before", True) and not resuming:
        before = validation_metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        metrics.update({f"before/{k}": v for k, v in before.items()})
        _say(trainer, f"[vera] before training: {metric_name} = {before.get(metric_name, float('nan')):.4f}")
    if ckpt_path is not None:
        _say(trainer, f"[vera] resuming from {ckpt_path}")
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_s = time.perf_counter() - fit_start
    after, _ = final_metrics(trainer, module, datamodule, memo)
    metrics.update(after)
    _say(trainer, f"[vera] after training:  {metric_name} = {after.get(metric_name, float('nan')):.4f}")

    adapter_dir = output_dir / "adapter"
    if trainer.is_global_zero:
        save_trained(method, module, adapter_dir, base_model_name_or_path=base_model_id(cfg.model))
        if export_fmt is not None and method == "vera":  # beside adapter/: merged/, lora/ or adapter-lora.gguf
            exported = export_run(adapter_dir, export_fmt, base=cfg, overwrite=True)
            _say(trainer, f"[vera] exported {export_fmt}: {getattr(exported, 'output', exported)}")
    trainable, total = count_parameters(model)
    memory = model_bytes(model)
    metrics.update(
        metric=after.get(metric_name, float("nan")),
        metric_name=metric_name,
        finetune=method,
        trainable_params=trainable,
        model_bytes=memory["total"],
        quantized_bytes=memory["quantized"],
        total_params=total,
        adapter_dir=str(adapter_dir),
        adapter_bytes=_dir_size(adapter_dir) if adapter_dir.is_dir() else 0,
        steps=trainer.global_step,
        fit_s=round(fit_s, 2),
        wall_time_s=round(time.perf_counter() - start, 2),
    )
    if trainer.is_global_zero:
        trackers.log_adapter(loggers, adapter_dir, metrics)
        _write_summary(cfg, output_dir, metrics)
    trackers.close(loggers)
    return metrics


def _write_summary(cfg: DictConfig, output_dir: Path, metrics: dict[str, Any]) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, "model": cfg.model.name, "data": cfg.data.name, "r": cfg.vera.r, **metrics}
    (output_dir / "summary.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    before = metrics.get(f"before/{metrics['metric_name']}")
    lines = [
        "",
        "VeRA run summary",
        f"  model / data      : {cfg.model.name} / {cfg.data.name}   (r={cfg.vera.r}, {metrics['steps']} steps)",
        f"  {metrics['metric_name']:<18}: "
        + (f"{before:.4f} -> " if before is not None else "")
        + f"{metrics['metric']:.4f}",
        f"  trainable params  : {metrics['trainable_params']:,} of {metrics['total_params']:,} "
        f"({100.0 * metrics['trainable_params'] / max(metrics['total_params'], 1):.3f}%)",
        f"  adapter size      : {metrics['adapter_bytes'] / 1024:.1f} KiB  ({metrics['adapter_dir']})",
        f"  model in memory   : {_size(metrics['model_bytes'])}  (quantized weights "
        f"{_size(metrics['quantized_bytes'])}, model.quantize={cfg.model.get('quantize')}, "
        f"compute_dtype={cfg.model.get('compute_dtype', 'fp32')})",
        f"  wall time         : {metrics['wall_time_s']:.1f} s",
        "",
    ]
    print("\n".join(lines))
