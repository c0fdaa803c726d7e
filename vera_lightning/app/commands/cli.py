"""The error boundary of the entry points (``scripts/train.py``, ``eval.py``, ``predict.py``).

An error the user caused (a bad option value, a missing file, an adapter that does not fit,
a model that cannot be fetched offline, a missing optional package, a bad ``+key=value``
for a Lightning class, a full disk or a read-only output path, another process holding the save
lock) is turned into :class:`UserError`, a Hydra ``CompactHydraException``:
Hydra then prints only its message on stderr (no traceback) and exits with status 1. Hydra
already reports composition errors (unknown keys, wrong types, missing configs) that way.
Ctrl-C (``KeyboardInterrupt``) exits with status 130 and no traceback (``predict.py`` first says where the rows
it finished are). With ``HYDRA_FULL_ERROR=1`` nothing is converted and the full traceback is shown. Anything
else (a bug) keeps Hydra's usual traceback.

Example::

    @hydra.main(config_path="../conf", config_name="train", version_base="1.3")
    @user_errors
    def main(cfg: DictConfig) -> float:
        metric = train(cfg)["metric"]  # None: no validation ran
        return float("nan") if metric is None else float(metric)
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Any, Callable, TypeVar

from hydra.errors import CompactHydraException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException

from vera_lightning.app.models.gguf_cache import CacheError
from vera_lightning.app.models.load import ModelUnavailableError

__all__ = ["UserError", "USER_ERRORS", "ENVIRONMENT_ERRNOS", "is_user_error", "user_errors"]

#: Exception types that mean "the command or its inputs are wrong", not "the program is wrong".
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ImportError,
    ModelUnavailableError, MisconfigurationException, OmegaConfBaseException,
    CacheError,  # the model cache (model=smollm2): a foreign or damaged folder, a cache that cannot be written
    TimeoutError,  # another process holds the save lock of the output directory (the message says which)
)
#: ``OSError`` numbers that the machine or the chosen path caused, not the program: a full disk or quota,
#: a read-only file system, a path the user may not write. Their messages name the path (``save_adapter``
#: adds that nothing was changed). Any other ``OSError`` keeps its traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

F = TypeVar("F", bound=Callable[..., Any])


class UserError(CompactHydraException):
    """A user error, printed by Hydra as its message only."""


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` means "the command, its inputs or the machine's disk are wrong" (not a bug)."""
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS)


def user_errors(task_function: F) -> F:
    """Wrap a Hydra task function: user errors become :class:`UserError` (message only, exit status 1)."""

    @functools.wraps(task_function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task_function(*args, **kwargs)
        except CompactHydraException:
            raise
        except KeyboardInterrupt:  # Ctrl-C: the command said what it kept; no traceback, the shell's status 130
            if _full_error():
                raise
            raise SystemExit(130) from None
        except Exception as err:
            if _full_error() or not is_user_error(err):
                raise
            raise UserError(f"Error: {err}") from None

    return wrapper  # type: ignore[return-value]
