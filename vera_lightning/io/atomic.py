"""Crash-safe, serialised replacement of a directory or a file: staging, exchange/rename, fsync, umask modes.

The promise (used by :func:`vera_lightning.save_adapter`): at every instant a reader or a crash can observe,
``<parent>/<name>`` holds a complete directory, the previous version or the new one.

Writing, :func:`replace_directory` under :func:`locked`:

1. **Lock** (:mod:`vera_lightning.io.locks`): ``fcntl.flock`` on the parent directory. Concurrent writers (threads,
   processes) wait for each other; after ``timeout`` seconds the waiting one raises ``TimeoutError``, writing nothing.
2. **Clean leftovers** of saves that were killed (:func:`clean_leftovers`): the staging area
   ``<parent>/.<name>.vera-tmp/`` is deleted; if a kill left ``<name>`` missing and the previous version parked
   there, that version is renamed back first. The lock guarantees no live writer is using the staging area.
3. **Stage** the complete new version in ``.<name>.vera-tmp/new/`` and ``fsync`` its files.
4. **Publish** with one atomic step: ``rename(new, <name>)`` if nothing is there yet, else ``renameat2(new, <name>,
   RENAME_EXCHANGE)``, which swaps the two directory entries at once (Linux >= 3.15: ext4, xfs, btrfs, tmpfs, ...).
   The previous version, now at the staging name, is deleted. Where the exchange is unavailable (other systems, some
   network file systems) the fallback is two renames: the previous version is parked at ``.<name>.vera-tmp/old``
   and the new one renamed in. Between the two the path is absent for an instant; a reader then reads the parked
   version (:mod:`vera_lightning.io.reads`) and the next save puts it back if a crash happened there.

A single file (:func:`replace_file`, e.g. an app's ``predictions.jsonl``) is written to a temporary file beside it
(``.<name>.<random>.vera-tmp``), flushed to disk and renamed into place when the writing block ends without an
error: the path holds the previous file or the complete new one, never a part; a failed or interrupted write
leaves no temporary file behind.

:func:`publish` is the one helper for a command's declared output, a directory or one file (``export.py``): under
the save lock of the output it cleans what killed writes of it left, runs the caller's ``check`` (which sees the
output as no other writer can change it until the rename: the place to refuse an output that appeared meanwhile)
and then :func:`replace_directory`. Published files follow the umask (:func:`umask_mode`: 0644 under umask 022),
also those a library wrote with a narrower mode (``safetensors`` writes 0600).

What an adapter directory may hold, and how its files are written on top of this: :mod:`.adapter_files`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

from vera_lightning.io.locks import locked

__all__ = ["replace_file", "replace_directory", "publish", "umask_mode", "clean_leftovers", "staging_root",
           "STAGING_SUFFIX"]

#: The suffix of a staging area (``.<name>.vera-tmp``) or a temporary file beside its target.
STAGING_SUFFIX = ".vera-tmp"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # renameat2's "current directory" and "swap the two entries"


def staging_root(directory: str) -> str:
    """``<parent>/.<name>.vera-tmp``: where a save of ``directory`` stages its new version."""
    parent, name = os.path.split(os.path.abspath(directory))
    return os.path.join(parent, f".{name}{STAGING_SUFFIX}")


def umask_mode(directory: bool = False) -> int:
    """The mode ``open()`` (``mkdir()`` with ``directory``) gives a new file here: ``0o666`` (``0o777``) less the
    process's umask, e.g. ``0o644`` under umask 022. Read from ``/proc/self/status`` where it is there (reading the
    umask elsewhere means setting it for an instant)."""
    mask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            mask = next((int(line.split()[1], 8) for line in status if line.startswith("Umask:")), None)
    if mask is None:  # pragma: no cover - systems without /proc
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _follow_umask(path: str) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open``/``mkdir`` would."""
    if os.path.islink(path):
        return
    os.chmod(path, umask_mode(directory=os.path.isdir(path)))
    for name in os.listdir(path) if os.path.isdir(path) else ():
        _follow_umask(os.path.join(path, name))


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


@functools.cache
def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_files(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path):  # a sub-adapter folder carried over
            _fsync_files(path)
            continue
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(directory)


def _link_folder(source: str, target: str) -> None:
    """``target``: a new folder holding ``source``'s files as hard links (published versions are never modified in
    place, only replaced, so sharing their files is safe), or copies where the file system cannot link."""
    os.mkdir(target)
    for name in os.listdir(source):
        try:
            os.link(os.path.join(source, name), os.path.join(target, name))
        except OSError:
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))


def clean_leftovers(directory: str, own_files: Iterable[str]) -> None:
    """Remove what killed saves of ``directory`` left behind (call under :func:`locked`).

    A version parked by a fallback swap is renamed back if ``directory`` is missing. Leftovers of 0.1.0
    (``.<name>.tmp-*``) holding only ``own_files`` are removed too.
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


def replace_directory(
    directory: str, fill: Callable[[str], None], carry: Iterable[str] = (), keep_folders: Iterable[str] = (),
    *, file: bool = False,
) -> None:
    """Replace ``directory`` by a new version written by ``fill(staging_dir)``, atomically.

    Call under :func:`locked`. If anything fails before the new version is published, the staging area is removed
    and ``directory`` is untouched. What ``fill`` wrote gets the modes of the umask (:func:`umask_mode`).

    Args:
        directory: The path to (re)place; its parent must exist.
        fill: Writes the new version's files into the directory it is given.
        carry: Names copied from the previous version when ``fill`` did not write them (a README).
        keep_folders: Subfolders of the previous version (holding files only) that the new version holds unchanged
            (named sub-adapters); hold :func:`vera_lightning.io.locks.locked_subfolders` so that no save into them
            runs meanwhile.
        file: ``directory`` is one file: ``fill`` writes the file at the path it is given (which does not exist yet),
            and it is renamed over the previous file.
    """
    root = staging_root(directory)
    new = os.path.join(root, "new")
    try:
        os.makedirs(root, exist_ok=True)
        if not file:
            os.mkdir(new)
        fill(new)
        _follow_umask(new)
        for name in () if file else carry:
            previous = os.path.join(directory, name)
            if os.path.isfile(previous) and not os.path.lexists(os.path.join(new, name)):
                shutil.copy2(previous, os.path.join(new, name))
        for name in () if file else keep_folders:
            _link_folder(os.path.join(directory, name), os.path.join(new, name))
        if file:
            with open(new, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(new, directory)  # one file: the rename replaces the previous one atomically
        else:
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


def publish(target: str | os.PathLike, fill: Callable[[str], None], *, file: bool = False,
            check: Optional[Callable[[], None]] = None, timeout: float = 120.0) -> None:
    """Write a command's output ``target`` (a directory, or one file with ``file``) through ``fill`` and rename it
    into place, under ``target``'s save lock.

    In order, holding :func:`locked`: leftovers of killed writes of ``target`` are cleaned (:func:`clean_leftovers`:
    its staging area ``.<name>.vera-tmp/``); ``check()`` runs, seeing ``target`` as no other writer can change it
    until the rename (refuse there an output that appeared or changed since the caller last looked); then
    :func:`replace_directory`. A second writer of the same ``target`` waits for the first, then runs its ``check``.

    Raises:
        TimeoutError: If another writer holds the lock for more than ``timeout`` seconds (nothing written).
        Exception: Whatever ``check`` or ``fill`` raise; ``target`` is then as it was.
    """
    path = os.path.abspath(os.fspath(target))
    with locked(path, timeout):
        clean_leftovers(path, ())
        if check is not None:
            check()
        replace_directory(path, fill, file=file)


@contextlib.contextmanager
def replace_file(path: str | os.PathLike, *, overwrite: bool = False, encoding: Optional[str] = "utf-8",
                 newline: Optional[str] = "") -> Iterator[Any]:
    """Write ``path`` through a temporary file beside it, renamed into place when the block ends without an error.

    Example::

        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
        >>> with replace_file(target) as handle:
        ...     _ = handle.write("done\\n")
        >>> open(target).read()
        'done\\n'

    Args:
        path: The file to write; its parent directory is created if missing.
        overwrite: Replace an existing file (at the rename, never before); if false, a file that exists when the
            block ends (another writer was faster) is left alone and ``FileExistsError`` is raised.
        encoding: The text encoding; ``None`` opens the temporary file in binary mode.
        newline: As :func:`open` (``""``: no newline translation).

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is false (nothing written).
        OSError: Of the same type, naming ``path`` and saying nothing was written, if the disk is full or the
            location not writable. Any exception from the block propagates; in every case the temporary file is
            removed and ``path`` is as it was.
    """
    target = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(target)
    tmp: Optional[str] = None
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=STAGING_SUFFIX, dir=parent)
        os.fchmod(fd, umask_mode())  # mkstemp's 0600 would be the published file's mode
        text = {} if encoding is None else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, "w" if text else "wb", **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the target appeared meanwhile: never replaced silently
            except OSError as err:  # that, or a file system without hard links: check, then rename
                if isinstance(err, FileExistsError) or os.path.lexists(target):
                    raise FileExistsError(errno.EEXIST, f"{target!r} already exists; nothing was written") from None
                os.replace(tmp, target)
            else:
                os.unlink(tmp)
        tmp = None
        _fsync_dir(parent)
    except OSError as err:
        if not err.errno or err.errno == errno.EEXIST:
            raise
        message = (f"could not write {target!r}: {err.strerror or err}. Nothing was written"
                   + (" (the previous file is intact)" if os.path.exists(target) else "")
                   + "; check that the location is writable and has free space")
        raise type(err)(err.errno, message) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
