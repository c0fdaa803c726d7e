"""The run's checkpoint files (``checkpoints/best.ckpt``, ``last.ckpt``): :class:`RunCheckpoint`.

Lightning's ``ModelCheckpoint`` with two things a run directory needs (``conf/callbacks/default.yaml``):

* **One name per file.** ``best.ckpt`` is always the best checkpoint of the run that owns the directory. Lightning
  would write ``best-v1.ckpt`` beside an existing ``best.ckpt`` it does not know (a run replaced with
  ``overwrite=true``, a run directory moved or copied and then resumed), leaving ``best.ckpt`` the old run's, so
  ``eval.py adapter=<run>/checkpoints/best.ckpt`` would evaluate the wrong model. The version counter is off, and a
  resumed run whose directory moved finds its files under the new path (:meth:`RunCheckpoint.load_state_dict`):
  the best score so far is kept and the new best replaces ``best.ckpt``.
* **Written whole.** A checkpoint is written to ``.<name>.partial`` beside its target and renamed over it
  (``os.replace``); a failed write (a full disk) removes the partial file and raises an ``OSError`` naming the file
  and saying that the previous one is intact. Lightning's own save can truncate the target: fsspec writes a
  temporary file in the system's temp directory and copies it over the target when that is another file system.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

__all__ = ["RunCheckpoint", "partial_path"]


def partial_path(target: Path) -> Path:
    """Where a checkpoint is written before it is renamed over ``target``."""
    return target.with_name(f".{target.name}.partial")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for a run directory: one file per name, written whole (see the module).

    Takes ``ModelCheckpoint``'s arguments; ``enable_version_counter`` defaults to ``False``. Its state in a
    checkpoint is stored under ``ModelCheckpoint``'s key, so checkpoints of either class resume with the other.
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    @property
    @override
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; a run directory that moved (its ``checkpoints/`` now elsewhere) keeps its best score.

        The saved paths are mapped into the new directory when every file they name is there (a moved or copied
        run); otherwise Lightning's behaviour (the scores are not restored; the first best replaces ``best.ckpt``).
        """
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            moved = self._moved(state_dict, Path(old), Path(self.dirpath))
            if moved is not None:
                state_dict = moved
        super().load_state_dict(state_dict)

    @staticmethod
    def _moved(state_dict: dict[str, Any], old: Path, new: Path) -> dict[str, Any] | None:
        def where(path: Any) -> Any:
            if not path or Path(path).parent != old:
                return path
            return str(new / Path(path).name)

        paths = [state_dict.get(k) for k in ("best_model_path", "kth_best_model_path")]
        paths += list(state_dict.get("best_k_models", {}))
        if not all(p and Path(p).parent == old and (new / Path(p).name).is_file() for p in paths if p):
            return None
        moved = {**state_dict, "dirpath": str(new)}
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            moved[key] = where(state_dict.get(key))
        moved["best_k_models"] = {where(p): v for p, v in state_dict.get("best_k_models", {}).items()}
        return moved

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        target = Path(filepath)
        partial = partial_path(target)
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
            if trainer.is_global_zero:
                os.replace(partial, target)
        except OSError as err:
            if trainer.is_global_zero:
                partial.unlink(missing_ok=True)
            intact = f"the previous {target.name} is intact" if target.is_file() else f"no {target.name} was written"
            raise OSError(err.errno, f"cannot save the checkpoint {target} ({err.strerror or err}); {intact} and no "
                                     "partial file was left. Free space there (or point hydra.run.dir elsewhere) and "
                                     "resume with ckpt_path=last") from err
        # what ModelCheckpoint._save_checkpoint does after the save
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
