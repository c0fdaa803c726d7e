"""The tokenised-data cache: one folder per fingerprint, built once, renamed into place, memory-mapped by every run.

Where: ``data.cache_dir``; null (the default) is ``$VERA_DATA_CACHE``, else ``~/.cache/vera_lightning/data``.
What: ``<cache_dir>/<key>/entry/`` holds a split source's checked rows (``rows.arrow``), their tokens
(``tokens.arrow``, written by ``datasets``' ``Dataset.map``) and ``meta.json``; ``<key>`` is
:func:`~vera_lightning.app.data.fingerprint.cache_key` (the file's content, the tokenizer, the settings that change
tokens). An entry is never changed once in place: a changed file or setting is another key.

``data.cache``:

* ``on`` (default): reuse an entry, else build it;
* ``refresh``: build the entries this run reads again (and replace them);
* ``off``: build into a temporary folder deleted when the process ends (nothing kept).

Writes are atomic and safe with concurrent runs (DDP ranks, a sweep's jobs): a builder holds the lock of
``<cache_dir>/<key>/`` (:func:`vera_lightning.locked`), builds in ``<key>/.tmp-<pid>-<random>/`` and renames it to
``entry``; a second run waits on the lock, then finds the entry and memory-maps it. Leftovers of a killed build are
deleted by the next builder (it holds the lock, so no live builder owns them). To clear the cache, delete the folder
(``rm -rf ~/.cache/vera_lightning/data``): a run that has an entry open keeps reading it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from vera_lightning import locked

__all__ = ["MODES", "ENV", "DEFAULT_DIR", "LOCK_TIMEOUT", "cache_dir_of", "DataCache"]

MODES = ("on", "off", "refresh")
#: The environment variable naming the cache folder when ``data.cache_dir`` is null.
ENV = "VERA_DATA_CACHE"
DEFAULT_DIR = "~/.cache/vera_lightning/data"
#: How long a run waits for another one building the same entry (a large set can take a while to tokenise).
LOCK_TIMEOUT = 6 * 3600.0
META = "meta.json"


def cache_dir_of(data_cfg: Mapping[str, Any]) -> Path:
    """The cache folder of a ``data`` config: ``data.cache_dir``, else ``$VERA_DATA_CACHE``, else ``~/.cache/...``."""
    return Path(data_cfg.get("cache_dir") or os.environ.get(ENV) or DEFAULT_DIR).expanduser()


class DataCache:
    """Entries of the tokenised-data cache (see the module docstring).

    Args:
        root: The cache folder (:func:`cache_dir_of`).
        mode: ``on``, ``off`` or ``refresh`` (``data.cache``).

    Raises:
        ValueError: For another ``mode``.
    """

    def __init__(self, root: Path, mode: str = "on") -> None:
        if mode not in MODES:
            raise ValueError(f"data.cache={mode!r}: must be one of {list(MODES)} (on: reuse the tokenised data, "
                             "refresh: tokenise again, off: keep nothing)")
        self.mode = mode
        self.started = time.time()
        if mode == "off":
            root = Path(tempfile.mkdtemp(prefix="vera-data-"))
            weakref.finalize(self, shutil.rmtree, str(root), True)
        self.root = Path(root)

    def entry(self, key: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        """The folder of entry ``key`` and its metadata, built first by ``build(folder)`` if needed.

        ``build`` fills an empty folder and returns the metadata to store (JSON); what it raises propagates, and
        nothing of the failed build is kept.
        """
        final = self.root / key / "entry"
        ready = self._ready(final)
        if ready is not None:
            return final, ready
        final.parent.mkdir(parents=True, exist_ok=True)
        with locked(str(final), timeout=LOCK_TIMEOUT):
            ready = self._ready(final)  # another run may have built it while this one waited
            if ready is not None:
                return final, ready
            for leftover in final.parent.glob(".tmp-*"):  # a killed build's: no live builder (we hold the lock)
                shutil.rmtree(leftover, ignore_errors=True)
            staging = final.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                meta = {**build(staging), "key": key, "created": time.time()}
                (staging / META).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
                if final.exists():  # refresh: the old entry goes aside (a reader's open maps stay valid), then away
                    old = final.parent / f".tmp-old-{uuid.uuid4().hex[:8]}"
                    final.rename(old)
                    staging.rename(final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    staging.rename(final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return final, meta

    def _ready(self, final: Path) -> Optional[dict[str, Any]]:
        """The metadata of a complete entry this run may use, else None."""
        try:
            meta = json.loads((final / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if self.mode == "refresh" and float(meta.get("created", 0)) < self.started:
            return None  # built before this run: refresh builds it again (once: a rebuilt entry is newer)
        return meta
