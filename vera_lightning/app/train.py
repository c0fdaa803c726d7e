"""``train(cfg) -> metrics`` for a composed ``conf/train.yaml``.

``scripts/train.py`` is the ``@hydra.main`` wrapper around :func:`train`; tests and
notebooks call :func:`train` directly with a config composed by Hydra's compose API.
A run builds the model, data and LightningModule the config names, adds
:class:`~vera_lightning.VeraCallback` (inject + freeze in ``setup``), reports the
monitored metric before and after training, writes the adapter in PEFT's layout to
``<output_dir>/adapter`` and ``summary.json`` next to it, and returns the metrics.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vera_lightning.callback import VeraCallback
from vera_lightning.checkpoint import adapter_root, save_adapter
from vera_lightning.config import VeraConfig
from vera_lightning.app.data import build_datamodule
from vera_lightning.inject import count_parameters
from vera_lightning.quantize import model_bytes
from vera_lightning.app.models import build_model, build_tokenizer, resolve_path
from vera_lightning.app.module import build_module

__all__ = ["register_configs", "vera_config_from", "train"]

log = logging.getLogger(__name__)


def register_configs() -> None:
    """Register :class:`VeraConfig` as the schema of the ``vera`` group (``vera/schema``).

    ``conf/vera/*.yaml`` start with ``defaults: [schema, _self_]``, so Hydra validates every
    key and type against the dataclass when the config is composed. Idempotent.
    """
    ConfigStore.instance().store(group="vera", name="schema", node=VeraConfig)




def vera_config_from(cfg: DictConfig) -> VeraConfig:
    """The :class:`VeraConfig` of a composed config's ``vera`` node (validated by ``__post_init__``).

    Keys added with ``+vera.<key>=...`` get past Hydra's schema check, so unknown keys are
    rejected here too.

    Raises:
        ValueError: Naming unknown keys, or with :class:`VeraConfig`'s message listing every
            invalid option.
    """
    return VeraConfig.from_dict(OmegaConf.to_container(cfg.vera, resolve=True), source="vera", warn=True)

def _check_task(cfg: DictConfig) -> str:
    model_task, data_task = cfg.model.task, cfg.data.task
    if model_task != data_task:
        raise ValueError(
            f"model={cfg.model.name} is a {model_task} model but data={cfg.data.name} is a {data_task} task. "
            + (
                "Pick classification data (data=demo_sentiment, data=sst2 data.data_dir=DIR, data=table) "
                if model_task == "classification"
                else "Pick text data (data=demo_text, or data.format=text with data.data_dir=DIR) "
            )
            + "or a model for that task (classification: minilm, roberta_base; causal_lm: tiny_opt, opt125m, "
            "gpt2, llama)."
        )
    return model_task


def _check_head_trains(task: str, model: Any, vera_config: VeraConfig) -> None:
    """A classification head is freshly initialised: refuse to leave it frozen."""
    if task != "classification" or vera_config.modules_to_save:
        return
    heads = [name for name in ("classifier", "score") if hasattr(model, name)] or ["classifier"]
    raise ValueError(
        f"vera.modules_to_save={vera_config.modules_to_save!r}: {type(model).__name__} gets a freshly initialised "
        f"classification head, which would stay random and frozen. Train it with the λ's: "
        f"model.modules_to_save=[{heads[0]}]"
    )


def _instantiate_dict(node: Any) -> list[Any]:
    if not node:
        return []
    return [hydra.utils.instantiate(value) for value in node.values() if value is not None]


def _say(trainer: pl.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(message, flush=True)


def _dir_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


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
        buffers in memory, see :func:`vera_lightning.model_bytes`), ``wall_time_s``.

    Raises:
        ValueError: For an inconsistent config (the message names the option and the fix).
        ModelUnavailableError: If a hub model cannot be fetched (offline).
    """
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vera_config = vera_config_from(cfg)
    task = _check_task(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, num_labels=cfg.data.get("num_labels"))
    _check_head_trains(task, model, vera_config)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True), tokenizer)
    module = build_module(task, model, cfg.optim, num_labels=cfg.data.get("num_labels"))

    callbacks = [VeraCallback(vera_config), *_instantiate_dict(cfg.get("callbacks"))]
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    metric_name = cfg.optimized_metric
    metrics: dict[str, Any] = {}
    if cfg.get("eval_before", True):
        before = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        metrics.update({f"before/{k}": v for k, v in before.items()})
        _say(trainer, f"[vera] before training: {metric_name} = {before.get(metric_name, float('nan')):.4f}")
    trainer.fit(module, datamodule=datamodule)
    after = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
    metrics.update(after)
    _say(trainer, f"[vera] after training:  {metric_name} = {after.get(metric_name, float('nan')):.4f}")

    adapter_dir = output_dir / "adapter"
    if trainer.is_global_zero:
        base = resolve_path(cfg.model.name_or_path) if cfg.model.get("name_or_path") else cfg.model.name
        save_adapter(adapter_root(module), adapter_dir, base_model_name_or_path=base)
    trainable, total = count_parameters(model)
    memory = model_bytes(model)
    metrics.update(
        metric=after.get(metric_name, float("nan")),
        metric_name=metric_name,
        trainable_params=trainable,
        model_bytes=memory["total"],
        quantized_bytes=memory["quantized"],
        total_params=total,
        adapter_dir=str(adapter_dir),
        adapter_bytes=_dir_size(adapter_dir) if adapter_dir.is_dir() else 0,
        steps=trainer.global_step,
        wall_time_s=round(time.perf_counter() - start, 2),
    )
    if trainer.is_global_zero:
        _write_summary(cfg, output_dir, metrics)
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
