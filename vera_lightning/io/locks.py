"""The save lock: writers of one directory wait for each other, across threads and processes.

:func:`locked` holds ``fcntl.flock`` on the parent of the directory being saved (a lock file
``<parent>/.vera-lock`` where the file system cannot lock directories); after ``timeout`` seconds a
waiting writer raises ``TimeoutError`` and writes nothing. :func:`locked_subfolders` holds the lock that
saves *into* a directory's subfolders take (a root holding named adapters' folders, ``<root>/<name>/``), so
that none runs while the root itself is replaced. A lock taken on a directory that was swapped for a new
version while the writer waited is dropped and taken again on the new one (the one later writers lock).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["locked", "locked_subfolders", "LOCK_FILE"]

LOCK_FILE = ".vera-lock"  # beside what is saved, where the file system cannot lock a directory


@contextlib.contextmanager
def locked(directory: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold the exclusive save lock of ``directory``'s parent (which must exist).

    Raises:
        TimeoutError: If another writer holds it for more than ``timeout`` seconds.
    """
    with _holding(os.path.dirname(os.path.abspath(directory)), timeout):
        yield


@contextlib.contextmanager
def locked_subfolders(directory: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold the lock that saves into ``directory``'s subfolders take (``locked`` of ``<directory>/<name>``), so that
    none of them runs while ``directory`` itself is replaced; nothing to hold if ``directory`` does not exist."""
    if not os.path.isdir(directory):
        yield
        return
    with _holding(os.path.abspath(directory), timeout):
        yield


@contextlib.contextmanager
def _holding(parent: str, timeout: float) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    deadline = time.monotonic() + timeout
    while True:
        fd, path = _acquire(parent, deadline, timeout)
        if _still_at(fd, path):
            break
        os.close(fd)  # the directory was replaced while we waited (a save of it swapped it in): lock the new one
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _acquire(parent: str, deadline: float, timeout: float) -> tuple[int, str]:
    fd = os.open(parent, os.O_RDONLY)
    try:
        _flock(fd, parent, deadline, timeout)
        return fd, parent
    except OSError as err:
        os.close(fd)
        if isinstance(err, TimeoutError) or err.errno not in (errno.EBADF, errno.EINVAL, errno.ENOLCK,
                                                              errno.EOPNOTSUPP):
            raise
    path = os.path.join(parent, LOCK_FILE)  # the file system cannot lock a directory: use a lock file beside it
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, parent, deadline, timeout)
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def _still_at(fd: int, path: str) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _flock(fd: int, parent: str, deadline: float, timeout: float) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"another process has been saving into {parent!r} for more than {timeout:.0f} s (it holds the "
                    "save lock); nothing was written. Wait for it to finish, or save into another directory"
                ) from None
            time.sleep(0.02)
