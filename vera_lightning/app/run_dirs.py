"""Resuming an interrupted training run: ``ckpt_path=last|PATH`` and SLURM requeue.

* :func:`resolve_ckpt_path` turns ``ckpt_path=last`` into ``<run dir>/checkpoints/last.ckpt``
  (the ``last_checkpoint`` callback of ``callbacks=default`` rewrites it every epoch) and checks a
  given path exists, before any work is done.
* :func:`slurm_checkpoint` finds the ``hpc_ckpt_N.ckpt`` Lightning's SLURM auto-requeue
  saved on ``SIGUSR1`` (Lightning resumes from it by itself when the requeued job restarts).
* :class:`RngState` saves the global torch and Python RNG states in the checkpoint and
  restores them, so dropout masks after an epoch-boundary resume are those of an
  uninterrupted run (the DataModule restores its shuffle order the same way).
* :func:`keep_csv_history` moves the interrupted run's ``metrics.csv`` aside: Lightning's
  CSV logger would otherwise delete it when the resumed run writes its first metrics.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

__all__ = ["resolve_ckpt_path", "slurm_checkpoint", "RngState", "keep_csv_history"]


def resolve_ckpt_path(cfg: DictConfig) -> Optional[str]:
    """The checkpoint ``ckpt_path`` names, checked to exist (``None`` when not resuming).

    Raises:
        FileNotFoundError: If ``last.ckpt`` or the given file does not exist (the message
            says how to point at the interrupted run).
    """
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    if str(value) == "last":
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
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
    return str(path)


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
    """Rename each CSV logger's existing ``metrics.csv`` to ``metrics.<n>.csv`` (first free ``n``).

    Returns:
        The new paths of the files moved aside.
    """
    moved = []
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        current = Path(logger.log_dir) / "metrics.csv"
        if not current.is_file():
            continue
        n = 1
        while (current.parent / f"metrics.{n}.csv").exists():
            n += 1
        target = current.parent / f"metrics.{n}.csv"
        current.rename(target)
        moved.append(target)
    return moved
