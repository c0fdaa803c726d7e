"""Refuse a ``ckpt_path`` that cannot be a checkpoint, with a message naming it, before Lightning reads it.

:func:`guard_checkpoint_loading` wraps the strategy's ``load_checkpoint`` so that a truncated, empty or
non-regular file fails with the fix; what a slim checkpoint records about its model, and the checks of that
record, live with the slim format (:mod:`vera_lightning.training.slim`).
"""

from __future__ import annotations

import os
import stat
import zipfile
from typing import Any

__all__ = ["check_checkpoint_file", "guard_checkpoint_loading"]



def check_checkpoint_file(path: Any) -> None:
    """Refuse a local ``ckpt_path`` that cannot be a checkpoint, before Lightning reads it.

    Raises:
        FileNotFoundError: If it does not exist.
        ValueError: If it is not a regular file, is empty, or is a truncated zip archive.
    """
    if not isinstance(path, (str, os.PathLike)) or "://" in str(path) or str(path) in ("last", "best", "hpc",
                                                                                        "registry"):
        return  # remote URLs and Lightning's keywords are resolved by Lightning
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"ckpt_path={path!r} does not exist; pass the path of a saved .ckpt file") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"ckpt_path={path!r} is not a regular file (a directory, FIFO or device); pass a .ckpt file")
    if info.st_size == 0:
        raise ValueError(f"ckpt_path={path!r} is empty (0 bytes): the save was interrupted; use an earlier checkpoint")
    with open(path, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"
    if is_zip:
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise ValueError(
                f"ckpt_path={path!r} is truncated or corrupted ({err}; {info.st_size} bytes): the save was "
                "interrupted or the copy is incomplete; use an earlier checkpoint"
            ) from None


def guard_checkpoint_loading(strategy: Any) -> None:
    """Check ``ckpt_path`` with :func:`check_checkpoint_file` when ``strategy`` loads it (idempotent)."""
    original = strategy.load_checkpoint
    if getattr(original, "_vera_checked", False):
        return

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        check_checkpoint_file(checkpoint_path)
        return original(checkpoint_path, *args, **kwargs)

    load_checkpoint._vera_checked = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint
