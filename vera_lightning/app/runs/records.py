"""What a training run writes into its directory, written only once the run has passed every check.

A run directory is an append-only record (``docs/reliability.md``, *Run directories*): a run that is
refused leaves it byte for byte as it was. The checks that need no model
(:func:`~vera_lightning.app.runs.run_dirs.check_run_dir`) run before anything is built; the ones that need the
model and the checkpoint (a resume into a model built differently) run when Lightning restores the
checkpoint. So nothing of the run is written before :class:`RunRecord` accepts it:

* a fresh run is accepted in ``setup`` (every process of a distributed run has passed its checks by then), after
  the module's ``check_before_run`` (e.g. that every validation prompt leaves room for ``max_new_tokens``);
* a resumed run in ``on_train_start``, after Lightning restored the model, the callbacks, the optimizers and
  the loops from the checkpoint.

Accepting writes the Hydra record (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``: ``conf/train.yaml``
sets ``hydra.output_subdir: null`` so that Hydra does not write them before the checks; a resumed run keeps the
run's own record and adds its own as ``.hydra/resume.<n>/``), moves the CSV logger's files aside on a resume
(:func:`~vera_lightning.app.runs.run_dirs.keep_csv_history`), hands the loggers to the Trainer (built with
``logger=False``) and releases Hydra's job log (:class:`HeldFileHandler`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import DummyLogger
from omegaconf import OmegaConf

from vera_lightning.app.runs import trackers
from vera_lightning.app.runs.plan import PLAN_FILE, RunPlan, plan_json
from vera_lightning.app.runs.run_dirs import keep_csv_history

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

__all__ = ["HeldFileHandler", "release_job_log", "discard_job_log", "write_hydra_record", "command_record_name",
           "RunRecord"]

#: Where the app writes the Hydra record of a run (Hydra's own ``output_subdir`` default).
RECORD_DIR = ".hydra"


class HeldFileHandler(logging.FileHandler):
    """Hydra's job log file (``<run dir>/<job name>.log``, ``conf/hydra/default.yaml``), held while a run is checked.

    Records are kept in memory until :func:`release_job_log` (the run was accepted: they are appended) or
    :func:`discard_job_log` (the run was refused: the file is left as it was, or never created). A handler neither
    released nor discarded (``eval.py``, ``predict.py`` once they succeeded) writes what it holds when it is closed.
    """

    def __init__(self, filename: str, mode: str = "a", encoding: Optional[str] = None, delay: bool = False,
                 errors: Optional[str] = None) -> None:
        self._held: Optional[list[logging.LogRecord]] = []
        self._discarded = False
        super().__init__(filename, mode, encoding, delay=True, errors=errors)  # the file opens at the first write

    @override
    def emit(self, record: logging.LogRecord) -> None:
        if self._discarded:
            return
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def admit(self) -> None:
        """Write the held records and every later one (not ``release``: that is the handler's lock)."""
        with self.lock:
            held, self._held = self._held, None
            for record in held or ():
                super().emit(record)

    def discard(self) -> None:
        """Drop the held records and every later one (a refused run); no effect once released."""
        with self.lock:
            if self._held is not None:
                self._held, self._discarded = None, True

    @override
    def close(self) -> None:
        self.admit()
        super().close()


def _job_logs() -> list[HeldFileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, HeldFileHandler)]


def release_job_log() -> None:
    """The run was accepted: Hydra's job log gets what was logged so far, and everything after."""
    for handler in _job_logs():
        handler.admit()


def discard_job_log() -> None:
    """The run was refused: Hydra's job log is left as it was (no effect once released)."""
    for handler in _job_logs():
        handler.discard()


def write_hydra_record(record: str, output_dir: Path, resuming: bool, name: str = RECORD_DIR,
                       plan: Optional[str] = None) -> Optional[Path]:
    """Write what Hydra writes to ``<run dir>/.hydra/`` (the composed config, Hydra's config, the overrides).

    A resumed run keeps the record of the run it continues and writes its own to ``.hydra/resume.<n>/``
    (first free ``n``). Nothing is written outside a Hydra job, or when ``hydra.output_subdir`` is set (Hydra
    then wrote the record itself).

    Args:
        record: The composed config as YAML (the plan's ``record``).
        name: The record's folder: ``.hydra`` for a training run; ``eval.py``/``predict.py`` write
            ``.hydra-<command>-<date>_<time>`` (:func:`command_record_name`), never a training run's ``.hydra``.
        plan: ``plan.json``'s text, written into ``eval``/``predict``'s record folder (a training run writes its
            plan beside ``summary.json``: :class:`RunRecord`).

    Returns:
        The directory written, or ``None``.
    """
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return None
    hydra_cfg = HydraConfig.instance().cfg
    target = output_dir / name
    if resuming and (target / "config.yaml").exists():
        n = 1
        while (target / f"resume.{n}").exists():
            n += 1
        target = target / f"resume.{n}"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.yaml").write_text(record, encoding="utf-8")
    for file_name, node in (("hydra.yaml", hydra_cfg), ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        (target / file_name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")
    if plan is not None:
        (target / PLAN_FILE).write_text(plan, encoding="utf-8")
    return target


def command_record_name(output_dir: Path, command: str) -> str:
    """``.hydra-<command>-<YYYY-mm-dd_HH-MM-SS>`` (``-<n>`` added if taken): an ``eval``/``predict`` run's record."""
    name = base = f"{RECORD_DIR}-{command}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    n = 1
    while (output_dir / name).exists():
        name, n = f"{base}-{n}", n + 1
    return name


class RunRecord(Callback):
    """Write the run's records once it has passed every check (see the module docstring).

    Args:
        plan: The run's plan: its ``record`` goes to ``.hydra/config.yaml`` and the loggers, the plan itself to
            ``plan.json`` (a resume keeps the run's and writes ``plan.resume.<n>.json``).
        loggers: The run's loggers; the Trainer is built with ``logger=False`` and gets them here.
        resuming: Whether the run continues a checkpoint (accepted in ``on_train_start``, not ``setup``).
        keep_history: Move the CSV logger's ``metrics.csv``/``hparams.yaml`` aside when accepted (a resume,
            ``overwrite=true``).
    """

    def __init__(self, plan: RunPlan, loggers: list[Any], resuming: bool, keep_history: bool) -> None:
        self.plan, self.output_dir, self.loggers = plan, plan.run_dir, loggers
        self.resuming, self.keep_history = resuming, keep_history
        self.accepted = False

    def accept(self, trainer: pl.Trainer, pl_module: Optional[pl.LightningModule] = None) -> None:
        """Write the records (once); ``pl_module``: log its hyper-parameters too (Lightning's went nowhere)."""
        if self.accepted:
            return
        self.accepted = True
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            if self.keep_history:
                keep_csv_history(self.loggers)  # Lightning's CSV logger would delete metrics.csv
            write_hydra_record(self.plan.record, self.output_dir, self.resuming)
            if self.resuming and (self.output_dir / PLAN_FILE).is_file():  # the run's own plan stays its record
                name = next(f"plan.resume.{n}.json" for n in range(1, 10**6)
                            if not (self.output_dir / f"plan.resume.{n}.json").exists())
                (self.output_dir / name).write_text(plan_json(self.plan), encoding="utf-8")
            else:
                (self.output_dir / PLAN_FILE).write_text(plan_json(self.plan), encoding="utf-8")
        # what Trainer(logger=...) would have made of them: fast_dev_run suppresses logging
        trainer.loggers = [DummyLogger()] if trainer.fast_dev_run and self.loggers else self.loggers
        trackers.log_config(self.loggers, self.plan.record)
        if pl_module is not None and pl_module.hparams:
            for logger in self.loggers:
                logger.log_hyperparams(pl_module.hparams)
        release_job_log()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.resuming:
            check = getattr(pl_module, "check_before_run", None)
            if callable(check):  # the module's own setup comes after the callbacks': its checks first
                check()
            self.accept(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.accept(trainer, pl_module)
