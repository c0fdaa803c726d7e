"""Crash-safe, serialised replacement of a directory, and consistent reads of one.

The promise (used by :func:`vera_lightning.save_adapter`): at every instant a reader or a crash
can observe, ``<parent>/<name>`` holds a complete directory, the previous version or the new one.

Writing, :func:`replace_directory` under :func:`locked`:

1. **Lock.** ``fcntl.flock`` on the parent directory (a lock file ``<parent>/.vera-lock`` where the
   file system cannot lock directories). Concurrent writers, threads or processes, wait for each
   other; after ``timeout`` seconds the waiting one raises ``TimeoutError`` and writes nothing.
2. **Clean leftovers** of saves that were killed (:func:`clean_leftovers`): the staging area
   ``<parent>/.<name>.vera-tmp/`` is deleted; if a kill left ``<name>`` missing and the previous
   version parked there, that version is renamed back first. The lock guarantees no live writer
   is using the staging area.
3. **Stage** the complete new version in ``.<name>.vera-tmp/new/`` and ``fsync`` its files.
4. **Publish** with one atomic step: ``rename(new, <name>)`` if nothing is there yet, else
   ``renameat2(new, <name>, RENAME_EXCHANGE)``, which swaps the two directory entries at once
   (Linux >= 3.15: ext4, xfs, btrfs, tmpfs, ...). The previous version, now at the staging name,
   is deleted. Where the exchange is unavailable (other systems, some network file systems) the
   fallback is two renames: the previous version is parked at ``.<name>.vera-tmp/old`` and the new
   one renamed in. Between the two the path is absent for an instant; a reader then reads the
   parked version (see below) and the next save puts it back if a crash happened there.

Reading, :func:`read_files`: the directory is opened once and every file is opened relative to
that descriptor, so all files come from one version even if a writer swaps the path meanwhile
(published versions are never modified, only deleted; a file that vanished means the version was
replaced, and the read starts again on the new one). Only regular files are read: a FIFO or a
device (``/dev/zero``) is refused without blocking.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

from vera_lightning.io.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["locked", "replace_directory", "clean_leftovers", "read_files", "staging_root", "NotRegularFileError",
           "check_target_dir", "write_adapter_files", "ADAPTER_FILES", "MODEL_CARD"]

_STAGING = ".vera-tmp"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class NotRegularFileError(ValueError):
    """A path that should be a regular file is a FIFO, a device, a socket or a directory."""


def staging_root(directory: str) -> str:
    """``<parent>/.<name>.vera-tmp``: where a save of ``directory`` stages its new version."""
    parent, name = os.path.split(os.path.abspath(directory))
    return os.path.join(parent, f".{name}{_STAGING}")


# ---------------------------------------------------------------------- locking
@contextlib.contextmanager
def locked(directory: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold the exclusive save lock of ``directory``'s parent (which must exist).

    Raises:
        TimeoutError: If another writer holds it for more than ``timeout`` seconds.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    parent = os.path.dirname(os.path.abspath(directory))
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            _flock(fd, parent, timeout)
        except OSError as err:
            if isinstance(err, TimeoutError) or err.errno not in (errno.EBADF, errno.EINVAL, errno.ENOLCK,
                                                                  errno.EOPNOTSUPP):
                raise
            os.close(fd)  # the file system cannot lock a directory: use a lock file beside it
            fd = os.open(os.path.join(parent, ".vera-lock"), os.O_RDWR | os.O_CREAT, 0o644)
            _flock(fd, parent, timeout)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _flock(fd: int, parent: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
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


# ---------------------------------------------------------------------- writing
def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries; ``False`` where the system cannot."""
    libc_swap = getattr(_libc(), "renameat2", None)
    if libc_swap is None:
        return False
    if libc_swap(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"{os.strerror(code)} (exchanging {a!r} and {b!r})")


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:  # pragma: no cover
            _LIBC.append(None)
    return _LIBC[0]


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_files(directory: str) -> None:
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(directory)


def clean_leftovers(directory: str, own_files: Iterable[str]) -> None:
    """Remove what killed saves of ``directory`` left behind (call under :func:`locked`).

    A version parked by a fallback swap is renamed back if ``directory`` is missing. Leftovers
    of vera_lightning 0.1.0 (``.<name>.tmp-*``) holding only ``own_files`` are removed too.
    """
    root = staging_root(directory)
    parked = os.path.join(root, "old")
    if not os.path.lexists(directory) and os.path.isdir(parked):
        os.rename(parked, directory)
    parent, name = os.path.split(os.path.abspath(directory))
    legacy = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.tmp-"))
    own = set(own_files)
    for entry in legacy:  # 0.1.0 renamed the previous version to .<name>.tmp-XXXX.old during a save
        path = os.path.join(parent, entry)
        if entry.endswith(".old") and not os.path.lexists(directory) and os.path.isdir(path):
            os.rename(path, directory)
        elif os.path.isdir(path) and not os.path.islink(path) and set(os.listdir(path)) <= own:
            shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(root):
        shutil.rmtree(root, ignore_errors=True)


def replace_directory(directory: str, fill: Callable[[str], None], carry: Iterable[str] = ()) -> None:
    """Replace ``directory`` by a new version written by ``fill(staging_dir)``, atomically.

    Call under :func:`locked`. If anything fails before the new version is published, the
    staging area is removed and ``directory`` is untouched.

    Args:
        directory: The path to (re)place; its parent must exist.
        fill: Writes the new version's files into the directory it is given.
        carry: Names copied from the previous version when ``fill`` did not write them (a README).
    """
    root = staging_root(directory)
    new = os.path.join(root, "new")
    try:
        os.makedirs(root, exist_ok=True)
        os.mkdir(new)
        fill(new)
        for name in carry:
            previous = os.path.join(directory, name)
            if os.path.isfile(previous) and not os.path.lexists(os.path.join(new, name)):
                shutil.copy2(previous, os.path.join(new, name))
        _fsync_files(new)
        if not os.path.isdir(directory):
            os.rename(new, directory)
        elif not _exchange(new, directory):
            parked = os.path.join(root, "old")
            os.rename(directory, parked)  # fallback: the previous version waits here
            try:
                os.rename(new, directory)
            except BaseException:
                os.rename(parked, directory)
                raise
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the previous version (swapped or parked), or a failed staging
    _fsync_dir(os.path.dirname(os.path.abspath(directory)))


# ---------------------------------------------------------------------- adapter directories
#: The files of an adapter directory (VeRA's or an exported LoRA's).
ADAPTER_FILES = frozenset({ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME})
MODEL_CARD = "README.md"  # PEFT's save_pretrained writes one; kept (never deleted) when we replace the adapter


def check_target_dir(directory: str) -> None:
    """Refuse to replace ``directory`` unless it is absent or holds only adapter files (and PEFT's model card)."""
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise ValueError(f"save_adapter: {directory!r} exists and is not a directory; choose another path")
        entries = set(os.listdir(directory))
        foreign = entries - ADAPTER_FILES
        if entries & ADAPTER_FILES:
            foreign.discard(MODEL_CARD)  # the model card of a PEFT-written adapter: carried over, not deleted
        if foreign:
            raise ValueError(
                f"save_adapter refuses to replace {directory!r}: it holds {sorted(foreign)[:5]}, which are not adapter "
                f"files ({sorted(ADAPTER_FILES)}); nothing was changed. Choose an empty or new directory"
            )


def write_adapter_files(directory: str, config: dict[str, Any], tensors: dict, metadata: dict[str, str]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``directory``: check the target, then
    replace it atomically under the save lock (:func:`check_target_dir`, :func:`locked`, :func:`replace_directory`).

    Raises:
        ValueError: From :func:`check_target_dir`.
        OSError: Of the same type, saying nothing was changed, if the files cannot be written.
        TimeoutError: If another save holds the lock too long.
    """

    def fill(staging: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS_NAME), metadata=metadata)
        with open(os.path.join(staging, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")

    existed = os.path.isdir(directory)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        with locked(directory):
            clean_leftovers(directory, ADAPTER_FILES)
            check_target_dir(directory)
            replace_directory(directory, fill, carry=(MODEL_CARD,))
    except TimeoutError:
        raise
    except OSError as err:
        kept = "still holds the previous adapter" if existed else "was not created"
        message = (f"save_adapter could not write {directory!r}: {err.strerror or err}. Nothing was changed: "
                   f"{directory!r} {kept}. Check that the location is writable and has free space")
        raise (type(err)(err.errno, message) if err.errno else type(err)(message)) from None


# ---------------------------------------------------------------------- reading
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
        if not os.path.lexists(directory) and os.path.isdir(os.path.join(staging_root(directory), "old")):
            source = os.path.join(staging_root(directory), "old")  # a fallback swap is (or was killed) mid-way
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
