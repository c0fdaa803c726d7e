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
from typing import Any, Optional

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from vera_lightning import count_parameters, model_bytes, replace_file
from vera_lightning.app.commands.build import (
    base_model_id,
    build_components,
    check_head_trains,
    check_monitored,
    instantiate_dict,
    vera_config_from,
)
from vera_lightning.app.commands.configs import register_configs
from vera_lightning.app.commands.export import export_run
from vera_lightning.app.commands.export_plan import export_problems
from vera_lightning.app.commands.planning import make_plan
from vera_lightning.app.commands.preflight import preflight
from vera_lightning.app.runs import trackers
from vera_lightning.app.runs.plan import RunPlan
from vera_lightning.app.runs.records import RunRecord, discard_job_log
from vera_lightning.app.runs.run_dirs import RngState
from vera_lightning.app.tasks.final_validation import ValidationMemo, final_metrics, validation_metrics
from vera_lightning.app.tasks.finetune import prepare, save_trained

__all__ = ["register_configs", "vera_config_from", "train", "run_training"]

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
            ``@hydra.main`` it is the run directory). It is read once, into the run's
            :class:`~vera_lightning.app.runs.plan.RunPlan` (:func:`~vera_lightning.app.commands.planning.make_plan`);
            everything below works from the plan.

    Returns:
        The final validation metrics (``val/acc``, ``val/f1``, ``val/loss`` or ``val/ppl``), the
        same metrics before training under ``before/...`` (if ``eval_before``), and ``metric``
        (the value of ``optimized_metric``), ``trainable_params``, ``total_params``,
        ``adapter_bytes``, ``adapter_dir``, ``model_bytes`` and ``quantized_bytes`` (parameters and
        buffers in memory, see :func:`vera_lightning.model_bytes`), ``fit_s`` (seconds in
        this call's ``trainer.fit``: the training loop with its validation), ``wall_time_s`` (the whole call,
        model loading and the final validation included), ``precision`` and ``device`` (what the plan resolved).

    Raises:
        ValueError: For an inconsistent config (the message names the option and the fix).
        FileExistsError: If the run directory holds another run (resume it with ``ckpt_path=last``, or
            ``overwrite=true``).
        ModelUnavailableError: If a hub model cannot be fetched (offline).

    A refused run leaves the run directory as it was: nothing is written before every check passed
    (:mod:`vera_lightning.app.runs.records`).
    """
    try:
        return run_training(make_plan(cfg, "train"))
    except BaseException:
        discard_job_log()  # a refused run leaves Hydra's job log as it was (no effect once the run was accepted)
        raise


def _check_export(plan: RunPlan, vera_config: Any) -> Optional[str]:
    """``export=`` checked in full before training: the format, a VeRA adapter to export, the base's architecture
    and what the adapter trains (a GGUF LoRA carries neither ``modules_to_save`` nor biases)."""
    value = plan.option("export")
    if value is None:
        return None
    problems = export_problems(value, plan.model, plan.method, modules_to_save=vera_config.modules_to_save,
                               bias=vera_config.bias)
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else "Cannot export:\n  - " + "\n  - ".join(problems))
    return str(value)


def _check_trains_something(plan: RunPlan, vera_config: Any) -> None:
    if plan.method == "head" and not vera_config.modules_to_save:
        raise ValueError("finetune=head trains model.modules_to_save only, and it is empty "
                         f"(model={plan.model.get('name')}): nothing would train. Name the modules to train, e.g. "
                         "model.modules_to_save=[lm_head] (a causal LM) or [classifier], or use finetune=vera")


def run_training(plan: RunPlan) -> dict[str, Any]:
    """Train as ``plan`` says (see :func:`train`); the plan was built and checked by the caller."""
    start = time.perf_counter()
    checked = preflight(plan)  # run directory, every data row: before any model or write
    output_dir = plan.run_dir
    vera_config, method, ckpt_path, resuming = checked.vera_config, checked.method, checked.ckpt_path, checked.resuming
    export_fmt = _check_export(plan, vera_config)  # train.py export=merged|lora|gguf-lora
    _check_trains_something(plan, vera_config)
    overwrite = bool(plan.option("overwrite", False))
    _say_plan(plan)

    parts = build_components(plan, tokenizer=checked.tokenizer, datamodule=checked.datamodule)
    task, model, module, datamodule = parts.task, parts.model, parts.module, parts.datamodule
    check_head_trains(task, model, vera_config, method)
    check_monitored(plan.optimized_metric, module.metric_names)

    loggers = instantiate_dict(plan.loggers)
    # nothing is written to the run directory until the run is accepted: loggers, CSV history, .hydra record
    record = RunRecord(plan, loggers, resuming=resuming, keep_history=resuming or overwrite)
    memo = ValidationMemo()  # the last validation inside fit, reused when it saw the final weights
    start_from = plan.adapter["path"] if plan.adapter else None  # adapter=: the λ's training starts from
    callbacks = [*prepare(method, model, vera_config, start_from=start_from), RngState(), record, memo,
                 *instantiate_dict(plan.callbacks)]
    trainer: pl.Trainer = hydra.utils.instantiate(plan.trainer, callbacks=callbacks, logger=False)

    metric_name = plan.optimized_metric
    metrics: dict[str, Any] = {}
    if plan.option("eval_before", True) and not resuming:
        before = validation_metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        metrics.update({f"before/{k}": v for k, v in before.items()})
        _say(trainer, f"[vera] before training: {metric_name} = {_shown(before.get(metric_name))}")
    if ckpt_path is not None:
        _say(trainer, f"[vera] resuming from {ckpt_path}")
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_s = time.perf_counter() - fit_start
    if resuming and not record.accepted:  # Lightning restored the checkpoint and found nothing left to train
        raise ValueError(
            f"ckpt_path={plan.option('ckpt_path')}: the run in {output_dir} already reached its end (epoch "
            f"{trainer.current_epoch}, step {trainer.global_step}; trainer.max_epochs="
            f"{plan.trainer.get('max_epochs')}, trainer.max_steps={plan.trainer.get('max_steps')}), so nothing was "
            "trained and nothing was changed. To "
            "train it further, raise trainer.max_epochs (or trainer.max_steps) with the same ckpt_path"
        )
    after, _ = final_metrics(trainer, module, datamodule, memo)
    metrics.update(after)
    _say(trainer, f"[vera] after training:  {metric_name} = {_shown(after.get(metric_name))}")

    adapter_dir = output_dir / "adapter"
    if trainer.is_global_zero:
        save_trained(method, module, adapter_dir, base_model_name_or_path=base_model_id(plan.model),
                     precision=plan.precision)
        if export_fmt is not None:  # beside adapter/: merged/, lora/ or adapter-lora.gguf
            exported = export_run(adapter_dir, export_fmt, base=_export_base(plan), overwrite=True)
            _say(trainer, f"[vera] exported {export_fmt}: {getattr(exported, 'output', exported)}")
    trainable, total = count_parameters(model)
    memory = model_bytes(model)
    metrics.update(
        metric=after.get(metric_name),  # None (null in summary.json): no validation ran
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
        precision=plan.precision,
        device=plan.device.accelerator,
    )
    if trainer.is_global_zero:
        trackers.log_adapter(loggers, adapter_dir, metrics)
        _write_summary(plan, metrics)
    trackers.close(loggers)
    return metrics


def _export_base(plan: RunPlan) -> dict[str, Any]:
    """The base ``train.py export=`` merges onto: this run's model, data and seed (as the plan resolved them)."""
    return {"model": plan.model, "data": plan.data, "seed": plan.seed}


def _say_plan(plan: RunPlan) -> None:
    if rank_zero_only.rank == 0:
        log.info(plan.device.describe())
        log.info(plan.describe_precision())


def _write_summary(plan: RunPlan, metrics: dict[str, Any]) -> None:
    from hydra.core.hydra_config import HydraConfig

    output_dir = plan.run_dir
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, "model": plan.model.get("name"), "data": plan.data.get("name"),
              "r": (plan.vera or {}).get("r"), **metrics}
    with replace_file(output_dir / "summary.json", overwrite=True) as handle:
        handle.write(json.dumps(record, indent=2, default=str) + "\n")
    before = metrics.get(f"before/{metrics['metric_name']}")
    r = f"r={(plan.vera or {}).get('r')}, " if plan.method == "vera" else f"finetune={plan.method}, "
    lines = [
        "",
        "VeRA run summary",
        f"  model / data      : {plan.model.get('name')} / {plan.data.get('name')}   ({r}{metrics['steps']} steps)",
        f"  {metrics['metric_name']:<18}: "
        + (f"{_shown(before)} -> " if before is not None else "")
        + _shown(metrics["metric"]),
        f"  trainable params  : {metrics['trainable_params']:,} of {metrics['total_params']:,} "
        f"({100.0 * metrics['trainable_params'] / max(metrics['total_params'], 1):.3f}%)",
        f"  adapter size      : {metrics['adapter_bytes'] / 1024:.1f} KiB  ({metrics['adapter_dir']})",
        f"  model in memory   : {_size(metrics['model_bytes'])}  (quantized weights "
        f"{_size(metrics['quantized_bytes'])}, model.quantize={plan.model.get('quantize')})",
        f"  precision         : {plan.dtype} ({plan.scheme}; model.compute_dtype="
        f"{plan.precision.get('requested')}) on {plan.device.accelerator}",
        f"  wall time         : {metrics['wall_time_s']:.1f} s",
        "",
    ]
    print("\n".join(lines))


def _shown(value) -> str:
    """A metric as the run prints it; ``None`` (no validation ran, e.g. ``trainer.limit_val_batches=0``) says so."""
    return "not measured (no validation ran)" if value is None else f"{value:.4f}"
