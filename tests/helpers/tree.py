"""Snapshots of a directory tree, for tests that assert what a command wrote (and what it did not).

A refusal is an invariant: ``snapshot(root)`` before and after are equal (every name, mode and byte). An accepted
command changes only its declared outputs: ``changed(before, after)`` lists the paths that differ.

Example::

    before = snapshot(tmp_path)
    run_command(...)
    assert changed(before, snapshot(tmp_path)) <= {"out", "out/file.txt"}
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

__all__ = ["snapshot", "changed", "describe"]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``, ``root`` itself included as ``"."``: relative name -> what it is.

    Files: ``("file", mode, sha256 of the bytes)``; directories: ``("dir", mode)``; symbolic links (not followed):
    ``("link", target)``; anything else (a FIFO, a socket): ``("other", mode)``. Modes are the full ``st_mode``
    (permission bits included). Names use ``/`` and are relative to ``root``.
    """
    root = Path(root)
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [".", *dirnames, *filenames] if Path(dirpath) == root else [*dirnames, *filenames]:
            path = Path(dirpath) / name if name != "." else root
            key = "." if path == root else path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[key] = ("dir", info.st_mode)
            elif stat.S_ISREG(info.st_mode):
                entries[key] = ("file", info.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                entries[key] = ("other", info.st_mode)
    return dict(sorted(entries.items()))


def changed(before: dict[str, tuple], after: dict[str, tuple]) -> set[str]:
    """Names whose entry differs between two snapshots: added, removed, or with other bytes, mode or kind."""
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def describe(before: dict[str, tuple], after: dict[str, tuple]) -> str:
    """The differences as lines (``+ name`` added, ``- name`` removed, ``~ name`` modified), for assertion messages."""
    lines = []
    for name in sorted(changed(before, after)):
        sign = "+" if name not in before else "-" if name not in after else "~"
        lines.append(f"{sign} {name}")
    return "\n".join(lines) or "(no differences)"
