"""Run directories: what one holds, the checks before a run may use it, resuming an interrupted run.

* :func:`check_run_dir` refuses, before anything is built or written, a new run into a directory holding
  another run's records (:func:`previous_run`) unless it resumes (``ckpt_path=...``, a SLURM requeue) or
  ``overwrite=true``, and an ``adapter/`` holding files the adapter save would refuse to replace. What a
  run writes, and when, is :mod:`vera_lightning.app.runs.records`.
* :func:`check_command_dir` refuses ``eval``/``predict`` into a directory holding a training run: they write
  into a directory of their own, never into a training run's record.
* a resume whose ``data`` settings differ from those its run recorded: :mod:`~vera_lightning.app.runs.resume_data`.
* :func:`resolve_ckpt_path` turns ``ckpt_path=last`` into ``<run dir>/checkpoints/last.ckpt``
  (the ``last_checkpoint`` callback of ``callbacks=default`` rewrites it every epoch) and checks a
  given path exists, before any work is done.
* :func:`slurm_checkpoint` finds the ``hpc_ckpt_N.ckpt`` Lightning's SLURM auto-requeue
  saved on ``SIGUSR1`` (Lightning resumes from it by itself when the requeued job restarts).
* :class:`RngState` saves the global torch and Python RNG states in the checkpoint and
  restores them, so dropout masks after an epoch-boundary resume are those of an
  uninterrupted run (the DataModule restores its shuffle order the same way).
* :func:`keep_csv_history` moves the interrupted run's ``metrics.csv`` (and ``hparams.yaml``) aside:
  Lightning's CSV logger would otherwise delete it when the resumed run writes its first metrics.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

__all__ = ["RUN_RECORDS", "RUN_EXPORTS", "is_training_run", "previous_run", "check_run_dir", "check_command_dir",
           "resolve_ckpt_path", "slurm_checkpoint", "RngState", "keep_csv_history", "RunDirCheck"]

#: Entries of a run directory that are records of a run (directories count when not empty).
RUN_RECORDS = (".hydra", "summary.json", "checkpoints", "csv", "tensorboard", "mlflow.db", "wandb")
#: What the adapter save writes in ``<run dir>/adapter`` (``finetune=vera``); a README.md is kept beside an
#: adapter (PEFT's model card); anything else makes ``save_adapter`` refuse the directory.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_CARD = "README.md"
#: What ``finetune=head|full`` writes there.
TRAINED_FILE = "model.safetensors"


def _holds_something(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def previous_run(output_dir: Path) -> list[str]:
    """The records of an earlier training run in ``output_dir`` (empty: it holds none).

    The entries of :data:`RUN_RECORDS` that exist (directories: not empty), ``adapter`` if it holds a
    saved adapter or trained weights, and SLURM's ``hpc_ckpt_N.ckpt``. Hydra's job log alone is not a run.
    """
    if not output_dir.is_dir():
        return []
    found = [name for name in RUN_RECORDS if _holds_something(output_dir / name)]
    adapter = output_dir / "adapter"
    if any((adapter / name).is_file() for name in (*ADAPTER_FILES, TRAINED_FILE)):
        found.append("adapter")
    return found + sorted(p.name for p in output_dir.glob("hpc_ckpt_*.ckpt"))


def _foreign_adapter_files(adapter_dir: Path) -> list[str]:
    if not adapter_dir.is_dir():
        return []
    entries = {p.name for p in adapter_dir.iterdir()}
    foreign = entries - set(ADAPTER_FILES)
    if entries & set(ADAPTER_FILES):
        foreign.discard(MODEL_CARD)
    return sorted(foreign)


#: What a training run's ``export=`` writes beside ``adapter/`` (merged, lora, gguf-lora).
RUN_EXPORTS = ("merged", "lora", "adapter-lora.gguf")


def is_training_run(directory: Path) -> bool:
    """Whether ``directory`` holds a training run's own record (``.hydra/config.yaml`` or ``plan.json``)."""
    return (directory / ".hydra" / "config.yaml").is_file() or (directory / "plan.json").is_file()


def check_run_dir(output_dir: Path, resuming: bool, overwrite: bool, method: str = "vera",
                  export_output: Optional[str] = None) -> None:
    """Refuse a run that would replace another run's records or could not save its result, before any work.

    Args:
        output_dir: The run directory (``paths.output_dir``: Hydra's ``hydra.run.dir``).
        resuming: The run continues a checkpoint (``ckpt_path=...`` or a SLURM requeue).
        overwrite: ``overwrite=true``: a new run may replace the records of the one in ``output_dir``.
        method: ``finetune``; with ``vera`` the adapter is saved with ``save_adapter``, which refuses a
            directory holding other files.

    Raises:
        NotADirectoryError: If ``output_dir`` or ``output_dir/adapter`` is a file.
        FileExistsError: If ``output_dir`` holds a run and this one neither resumes nor overwrites it
            (the message gives the three ways on).
        ValueError: If ``output_dir/adapter`` holds files that are not an adapter's; with ``overwrite=true``, if
            ``output_dir`` is not a training run (its files are the user's) or holds exports of the run it would
            replace that this run does not replace (``export_output``: the one it writes), which would describe
            the old adapter.
    """
    for path in (output_dir, output_dir / "adapter"):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; the run writes a directory there. Choose another "
                                     "hydra.run.dir (paths.output_dir)")
    records = previous_run(output_dir)
    if records and not resuming and not overwrite:
        last = output_dir / "checkpoints" / "last.ckpt"
        resume = ("resume it with ckpt_path=last (the same command plus ckpt_path=last)" if last.is_file() else
                  f"it cannot be resumed ({last} does not exist; callbacks=default writes it every epoch)")
        raise FileExistsError(
            f"{output_dir} already holds a training run ({', '.join(records)}); a new run there would replace its "
            f"records, so nothing was changed. Either {resume}, or start the new run in another directory (another "
            "hydra.run.dir=..., or none for a new outputs/<date>/<time>/), or pass overwrite=true to replace that "
            "run (its csv/metrics.csv is kept as metrics.<n>.csv)"
        )
    if records and overwrite and not resuming:
        if not is_training_run(output_dir):
            raise ValueError(
                f"overwrite=true: {output_dir} holds {', '.join(records)} but no training run's record (.hydra/"
                "config.yaml, plan.json), so these are not a run's files to replace. Nothing was changed; choose "
                "another hydra.run.dir, or move those files elsewhere"
            )
        stale = [name for name in RUN_EXPORTS if os.path.lexists(output_dir / name) and name != export_output]
        if stale:
            raise ValueError(
                f"overwrite=true: {output_dir} holds the exports {stale} of the run it would replace; they would stay "
                "beside the new adapter and describe the old one. Nothing was changed; move or delete them first, "
                "or start the new run in another hydra.run.dir"
            )
    foreign = _foreign_adapter_files(output_dir / "adapter") if method == "vera" else []
    if foreign:
        raise ValueError(
            f"{output_dir / 'adapter'} holds {foreign[:5]}, which are not adapter files ({list(ADAPTER_FILES)}): the "
            "adapter is saved there after training and that save would be refused. Nothing was changed; move "
            "those files elsewhere, or choose another hydra.run.dir"
        )


def check_command_dir(output_dir: Path, command: str) -> None:
    """Refuse ``eval``/``predict`` into a directory holding a training run (they never write into its record).

    Their Hydra config (``conf/eval.yaml``, ``conf/predict.yaml``) sets ``hydra.output_subdir: null``, so Hydra
    writes no ``.hydra/`` before this check; the command writes its own record to ``.hydra-<command>-<time>/``
    once it has passed its preflight (:func:`~vera_lightning.app.runs.records.write_hydra_record`).

    Raises:
        NotADirectoryError: If ``output_dir`` is a file.
        FileExistsError: If it holds a training run's records (:func:`previous_run`), naming them and the fix.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"hydra.run.dir={str(output_dir)!r} is a file; {command}.py writes a directory "
                                 "there. Leave hydra.run.dir unset or give a directory path")
    records = previous_run(output_dir)
    if records:
        raise FileExistsError(
            f"hydra.run.dir={str(output_dir)!r} holds a training run ({', '.join(records)}); {command}.py never "
            f"writes into a training run's directory, so nothing was written. Leave hydra.run.dir unset (a new "
            f"outputs/{command}/<date>/<time>/) or give a directory of its own, e.g. "
            f"hydra.run.dir={str(output_dir / command)!r}"
        )


class RunDirCheck(HydraCallback):
    """A Hydra callback (``hydra.callbacks``) of every entry point: the run directory is checked first and left as it
    was found by a refused run.

    * Hydra creates the run directory before any app code runs, and a file there ends in its traceback; this runs
      first (``on_run_start``), says it in one line on stderr and exits with status 1 (Hydra turns a callback's
      exception into a warning, so it exits instead).
    * It notes which folders of ``hydra.run.dir`` did not exist yet, and removes them again when the run ends
      (``on_run_end``) if they are still empty: a refused command (nothing written: the job log is held until the
      run is accepted, :class:`~vera_lightning.app.runs.records.HeldFileHandler`) leaves no empty
      ``outputs/<date>/<time>/`` behind.
    """

    def __init__(self) -> None:
        self.created: list[Path] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir)).expanduser()
        for path in (run_dir, *run_dir.parents):
            if path.exists():
                if not path.is_dir():
                    print(f"Error: hydra.run.dir={str(run_dir)!r}: {path} is a file, not a directory; nothing was "
                          "written. Give a directory path, or leave hydra.run.dir unset", file=sys.stderr, flush=True)
                    raise SystemExit(1)
                break
        absolute = Path(os.path.abspath(run_dir))
        self.created = [p for p in (absolute, *absolute.parents) if not os.path.lexists(p)]  # deepest first

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        for path in self.created:
            try:
                path.rmdir()  # only an empty folder goes; one something was written into stays
            except OSError:
                break
        self.created = []


def resolve_ckpt_path(value: Optional[str], output_dir: Path) -> Optional[str]:
    """The checkpoint ``ckpt_path=value`` names, checked to exist (``None`` when not resuming).

    Raises:
        FileNotFoundError: If ``last.ckpt`` or the given file does not exist (the message
            says how to point at the interrupted run).
    """
    if value in (None, ""):
        return None
    if str(value) == "last":
        path = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last: {path} does not exist. Run the command again with hydra.run.dir=<the interrupted "
                "run's directory> (the one holding checkpoints/last.ckpt), or pass ckpt_path=/path/to/file.ckpt. "
                "last.ckpt is written every epoch by callbacks=default (its last_checkpoint callback)."
            )
        return str(path)
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(value)!r}: no such checkpoint file. Pass a .ckpt written by a training run "
            "(<run dir>/checkpoints/last.ckpt or best.ckpt), or ckpt_path=last with hydra.run.dir=<that run>."
        )
    _check_is_checkpoint(path, value)
    return str(path)


def _check_is_checkpoint(path: Path, value: Any) -> None:
    """Refuse a file that is not a Lightning checkpoint (a text file, an adapter's .safetensors, a truncated .ckpt)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        checkpoint, reason = None, f"it cannot be read as one ({type(err).__name__})"
    else:
        reason = "it holds no state_dict"
    if not (isinstance(checkpoint, dict) and "state_dict" in checkpoint):
        raise ValueError(f"ckpt_path={str(value)!r} is not a Lightning checkpoint: {reason}. Pass a .ckpt written by a "
                         "training run (<run dir>/checkpoints/last.ckpt or best.ckpt), or ckpt_path=last with "
                         "hydra.run.dir=<that run>")


def slurm_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest ``hpc_ckpt_N.ckpt`` in ``output_dir`` if this process runs under SLURM."""
    if not SLURMEnvironment.detect():
        return None
    found = sorted(output_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1] or 0))
    return found[-1] if found else None


class RngState(Callback):
    """Save the global torch (CPU and CUDA) and Python RNG states in checkpoints; restore them on resume.

    Lightning restores model, optimizer and loop state but not the random number generators,
    so without this a resumed run draws other dropout masks than an uninterrupted one.
    """

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
        if "python" in state_dict:
            version, internal, gauss = state_dict["python"]
            random.setstate((version, tuple(internal), gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def keep_csv_history(loggers: list[Any]) -> list[Path]:
    """Rename each CSV logger's ``metrics.csv`` to ``metrics.<n>.csv`` and ``hparams.yaml`` to ``hparams.<n>.yaml``.

    ``n`` is the first number free for both. Called only once a run has been accepted
    (:class:`~vera_lightning.app.runs.records.RunRecord`): a refused run renames nothing.

    Returns:
        The new paths of the files moved aside.
    """
    moved = []
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        directory = Path(logger.log_dir)
        current = [directory / name for name in ("metrics.csv", "hparams.yaml") if (directory / name).is_file()]
        if not any(p.name == "metrics.csv" for p in current):
            continue
        n = 1
        while any((directory / f"{p.stem}.{n}{p.suffix}").exists() for p in current):
            n += 1
        for path in current:
            target = directory / f"{path.stem}.{n}{path.suffix}"
            path.rename(target)
            moved.append(target)
    return moved
