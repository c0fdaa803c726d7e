"""Startup checks of a composed app config: every bad value named with its key and the fix, before any work.

:func:`check_run_config` is called first thing by :func:`vera_lightning.app.commands.train`:

* keys still ``???`` (``data=sst2`` without ``data.data_dir``): named with the override to add;
* ``seed``, ``optim.*``, ``data.max_length``, ``data.batch_size``, ``trainer.max_steps``/``max_epochs``:
  type and range, e.g. ``optim.lr=abc`` or ``seed=abc``;
* ``trainer.max_steps=0`` / ``trainer.max_epochs=0`` and ``data.max_length=0`` are refused: a run that
  trains nothing, or examples truncated to nothing, would still write an adapter and report a metric.
* ``trainer.limit_val_batches=0`` with ``callbacks=early_stopping``: it would stop on a metric nothing logs.
* ``overwrite``: true or false. What a run may do with its run directory is checked next, by
  :func:`~vera_lightning.app.runs.run_dirs.check_run_dir`.

"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["check_run_config", "check_train_strategy"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def check_train_strategy(trainer: dict[str, Any]) -> None:
    """Refuse a strategy that trains in child processes of this one (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``).

    VeRA is injected by the callback inside each rank, so the λ's a spawned or forked rank trains never come
    back to the process that saves the adapter; ``trainer=ddp`` re-runs the script once per rank instead, and
    rank 0 saves.

    Raises:
        ValueError: Naming the strategy and the fix, before any work.
    """
    strategy = trainer.get("strategy")
    if isinstance(strategy, str):
        name = strategy
    elif strategy is not None and hasattr(strategy, "get"):
        name = str(strategy.get("start_method") or "")
    else:
        return
    if any(word in name for word in ("spawn", "fork", "notebook")):
        raise ValueError(
            f"trainer.strategy={name!r} trains in child processes of this one, so the trained λ's would not come "
            "back to be saved; use trainer=ddp (the script runs once per rank and rank 0 saves the adapter), "
            "e.g. python scripts/train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2"
        )


def _stops_on_nothing(cfg: DictConfig) -> list[str]:
    """``trainer.limit_val_batches=0`` with an ``EarlyStopping`` callback: it would stop on a metric no validation
    logs (Lightning's RuntimeError after the first epoch, the epoch's training lost)."""
    limit = _get(cfg, "trainer.limit_val_batches")
    callbacks = _get(cfg, "callbacks")
    if isinstance(limit, bool) or limit not in (0, 0.0) or not isinstance(callbacks, DictConfig):
        return []
    return [f"trainer.limit_val_batches={limit} validates nothing, but callbacks.{name} stops on "
            f"{_get(callback, 'monitor')}: let validation run (drop trainer.limit_val_batches=0) or leave "
            "callbacks=early_stopping out"
            for name, callback in callbacks.items()
            if isinstance(callback, DictConfig) and str(_get(callback, "_target_")).endswith("EarlyStopping")]


def check_run_config(cfg: DictConfig) -> None:
    """Refuse a config with missing or invalid values, naming each key, its value and the fix.

    Raises:
        ValueError: Listing every problem at once.
    """
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException:  # generate.seed (a typed int) interpolates a bad seed: reported below
        if _is_int(_get(cfg, "seed")):
            raise
        missing = []
    missing = [key for key in missing if key not in ("data.monitor", "data.monitor_mode")]  # unset: the model's
    problems = []
    for key in missing:
        group = key.split(".")[0]
        chosen = f" with {group}={_get(cfg, group + '.name')}" if _get(cfg, group + ".name") else ""
        example = ", e.g. data=sst2 data.data_dir=/path/to/sst2" if key == "data.data_dir" else ""
        problems.append(f"{key} is required{chosen} (it is ??? there): add {key}=... to the command line{example}")
    if not _is_int(_get(cfg, "seed")):
        problems.append(f"seed={_get(cfg, 'seed')!r}: must be an integer (e.g. seed=42)")
    for key, low, strict in (("optim.lr", 0, True), ("optim.head_lr", 0, True), ("optim.weight_decay", 0, False),
                             ("optim.warmup_ratio", 0, False)):
        value = _get(cfg, key)
        if value is not None and (not _is_number(value) or value < low or (strict and value == low)):
            bound = f"{'>' if strict else '>='} {low}"
            problems.append(f"{key}={value!r}: must be a finite number {bound} (e.g. {key}=1e-2)")
    for key in ("data.max_length", "data.batch_size", "data.eval_batch_size"):
        value = _get(cfg, key)
        if value is not None and (not _is_int(value) or value <= 0):
            problems.append(f"{key}={value!r}: must be a positive integer (e.g. {key}=128)")
    for key in ("data.max_train_samples", "data.max_val_samples"):
        value = _get(cfg, key)
        if value is not None and (not _is_int(value) or value <= 0):
            problems.append(f"{key}={value!r}: must be a positive integer or null (null: every row)")
    steps, epochs = _get(cfg, "trainer.max_steps"), _get(cfg, "trainer.max_epochs")
    if steps is not None and (not _is_int(steps) or steps == 0 or steps < -1):
        problems.append(
            f"trainer.max_steps={steps!r}: must be -1 (no step limit: trainer.max_epochs decides) or a positive "
            "integer; 0 would train nothing yet write an adapter and report a metric"
        )
    if epochs is not None and (not _is_int(epochs) or epochs == 0 or epochs < -1):
        problems.append(f"trainer.max_epochs={epochs!r}: must be a positive integer (or -1 with trainer.max_steps)")
    problems += _stops_on_nothing(cfg)
    overwrite = _get(cfg, "overwrite")
    if overwrite is not None and not isinstance(overwrite, bool):
        problems.append(f"overwrite={overwrite!r}: must be true or false (true: a new run may replace the run in "
                        "its hydra.run.dir)")
    if problems:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))
