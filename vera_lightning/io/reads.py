"""Consistent reads of a directory that a save may be replacing (see :mod:`vera_lightning.io.atomic`).

:func:`read_files` opens the directory once and every file relative to that descriptor, so all files come
from one version even if a writer swaps the path meanwhile (published versions are never modified, only
deleted; a file that vanished means the version was replaced, and the read starts again on the new one).
While a fallback swap has parked the previous version (of the directory, or of the root holding it as a
named adapter's folder), that version is read. Only regular files are read: a FIFO or a device
(``/dev/zero``) is refused without blocking.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from typing import Optional

from vera_lightning.io.atomic import staging_root

__all__ = ["read_files", "NotRegularFileError"]


class NotRegularFileError(ValueError):
    """A path that should be a regular file is a FIFO, a device, a socket or a directory."""


class _Replaced(Exception):
    """The version being read was replaced by a writer; read again."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK,
                       "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _read_one(dir_fd: int, name: str, shown: str, opened: str) -> Optional[bytes]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        try:
            if os.stat(opened).st_ino != os.fstat(dir_fd).st_ino:
                raise _Replaced from None
        except FileNotFoundError:
            raise _Replaced from None
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(
                f"{shown} is {_kind(info.st_mode)}, not a regular file; an adapter file must be a regular file "
                "(re-save the adapter)"
            )
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _parked(directory: str) -> Optional[str]:
    """Where a fallback swap parked ``directory``'s previous version, or its parent's holding it (a root with
    named adapters' folders); ``None`` if neither is there."""
    parent, name = os.path.split(os.path.abspath(directory))
    for path in (os.path.join(staging_root(directory), "old"), os.path.join(staging_root(parent), "old", name)):
        if os.path.isdir(path):
            return path
    return None


def read_files(directory: str, names: Iterable[str], attempts: int = 50) -> dict[str, Optional[bytes]]:
    """Read ``names`` from one version of ``directory``: ``{name: bytes, or None if absent}``.

    Raises:
        FileNotFoundError: If ``directory`` does not exist (and no save parked a version of it).
        NotADirectoryError: If it is not a directory.
        NotRegularFileError: If one of the files is a FIFO, a device, a socket or a directory.
    """
    names = list(names)
    for _ in range(attempts):
        source = directory
        if not os.path.lexists(directory):  # a fallback swap is (or was killed) mid-way: read the parked version
            source = _parked(directory) or directory
        try:
            dir_fd = os.open(source, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            if source != directory:
                continue  # the parked version was just renamed back: read again
            raise
        try:
            return {name: _read_one(dir_fd, name, os.path.join(directory, name), source) for name in names}
        except _Replaced:
            continue
        finally:
            os.close(dir_fd)
    raise OSError(errno.EAGAIN, f"{directory!r} kept being replaced while it was read ({attempts} attempts)")
