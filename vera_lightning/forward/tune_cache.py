"""What a measured path choice is keyed by, and the file that keeps the choices across runs.

Format (``version`` 1)::

    {"format": "vera-lightning-autotune", "version": 1,
     "machines": {"<machine key>": {"<signature key>": {"path": "merged", "ms": {"lean": 41.2, "merged": 30.1}}}}}

The machine key names the device (CPU model or GPU name), the torch and vera-lightning versions
and the thread count (:func:`machine_key`); the signature key the sibling group
(:meth:`Signature.key`: tokens bucketed by :func:`bucket_tokens`). A file that is not valid
JSON or not in this format (a corrupt one, a newer version, someone else's file at that path) is
ignored with one warning and never written over; writes replace the file atomically (a temporary
file in the same directory, ``os.replace``; the umask's mode, 0644 under 022), after merging what other processes
wrote meanwhile. The read-merge-write holds an exclusive lock (``fcntl.flock`` on the sidecar ``.<name>.lock``
beside the file, kept there), so concurrent writers never lose each other's entries.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, writes stay atomic
    fcntl = None  # type: ignore[assignment]

from vera_lightning.forward import cost

__all__ = ["FORMAT", "VERSION", "ENV_CACHE_DIR", "TuneFile", "Signature", "bucket_tokens", "machine_key",
           "default_cache_file"]

FORMAT = "vera-lightning-autotune"
VERSION = 1
ENV_CACHE_DIR = "VERA_LIGHTNING_CACHE"


def bucket_tokens(n: int) -> int:
    """The smallest ``2^k`` or ``3·2^(k-1)`` holding ``n`` tokens: two per octave (768 -> 768, 769 -> 1024)."""
    if n <= 2:
        return max(n, 1)
    p = 1 << (n - 1).bit_length()
    return 3 * p // 4 if n <= 3 * p // 4 else p


@functools.lru_cache(maxsize=None)
def _umask_mode() -> int:
    """``0o666`` less the umask (0644 under 022): the mode a plain ``open`` gives (``io.atomic.umask_mode``'s rule;
    this floor cannot import it). Read from ``/proc/self/status`` where it is there."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, ValueError, StopIteration):  # pragma: no cover - systems without /proc
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{device} {name or platform.processor() or platform.machine()}"


@functools.lru_cache(maxsize=None)
def _machine_key(device: str, threads: int) -> str:
    try:
        ours = importlib.metadata.version("vera-lightning")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree not installed
        ours = "unknown"
    return f"{_device_name(device)} | torch {torch.__version__} | vera-lightning {ours} | threads {threads}"


def machine_key(device: torch.device, threads: int) -> str:
    """The cache file's section: device name, torch and vera-lightning versions, thread count."""
    return _machine_key(str(device), threads)


def default_cache_file() -> Path:
    """``$VERA_LIGHTNING_CACHE/autotune.json`` (default ``$XDG_CACHE_HOME`` or ``~/.cache``, ``/vera-lightning``)."""
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vera-lightning")
    return Path(root) / "autotune.json"


@dataclass(frozen=True)
class Signature:
    """What a measured choice holds for (the device name and torch version are the file's section)."""

    device_type: str
    dtype: str
    threads: int
    in_features: int
    outs: tuple[int, ...]
    r: int
    tokens: int  # the bucket (bucket_tokens)
    grad_x: bool
    memory: str
    merged_ok: bool

    @classmethod
    def of(cls, group: cost.Group) -> "Signature":
        dtype = str(group.dtype).removeprefix("torch.") + ("-autocast" if group.autocast else "")
        if group.proj_dtype is not None:  # projections in another dtype than the λ's (the bf16 training form)
            dtype += "-proj" + str(group.proj_dtype).removeprefix("torch.")
        return cls(group.device.type, dtype, torch.get_num_threads(),
                   group.in_features, tuple(group.outs), group.r, bucket_tokens(group.n), group.grad_x, group.memory,
                   group.merged_ok)

    def key(self) -> str:
        """``cpu float32 in768 out768,768 r1024 n2048 gx1 lean`` (``nomerge`` appended over a quantized base)."""
        return (f"{self.device_type} {self.dtype} in{self.in_features} out{','.join(map(str, self.outs))} r{self.r} "
                f"n{self.tokens} gx{int(self.grad_x)} {self.memory}" + ("" if self.merged_ok else " nomerge"))


class TuneFile:
    """Reads and writes one cache file; refuses (with a warning) a file it does not recognise.

    Args:
        path: The JSON file.
    """

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        self.writable = True  # False once the file proved foreign/corrupt or could not be written
        self._warned = False

    def _warn(self, why: str) -> None:
        self.writable = False
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"vera-lightning autotune: ignoring the cache file {self.path} ({why}); it will not be written "
                "over. Remove it, or point VERA_LIGHTNING_AUTOTUNE_CACHE at another file (or 'off')",
                RuntimeWarning, stacklevel=3,
            )

    def _read(self) -> Optional[dict]:
        """The whole document, ``{}``-like when absent, ``None`` when unusable (warned)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": FORMAT, "version": VERSION, "machines": {}}
        except (OSError, UnicodeDecodeError) as err:
            self._warn(f"unreadable: {err}")
            return None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            self._warn(f"not valid JSON: {err}")
            return None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            self._warn(f"not a {FORMAT} file")
            return None
        if doc.get("version") != VERSION or not isinstance(doc.get("machines"), dict):
            self._warn(f"format version {doc.get('version')!r}, this vera-lightning reads version {VERSION}")
            return None
        return doc

    def load(self, machine: str) -> dict[str, dict[str, Any]]:
        """The entries recorded for ``machine`` (well-formed ones only), ``{}`` if none or unusable."""
        doc = self._read()
        entries = doc["machines"].get(machine) if doc is not None else None
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("path"), str)}

    @property
    def lock_path(self) -> Path:
        """The sidecar lock file (``.<name>.lock`` beside the cache file; left in place)."""
        return self.path.parent / f".{self.path.name}.lock"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive lock on :attr:`lock_path` (creating the directory and the lock file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def store(self, machine: str, key: str, entry: dict[str, Any]) -> bool:
        """Add one entry, merged into the file's current content under the lock, atomically.

        Returns:
            ``False`` if not written (a foreign/corrupt file, or a directory that cannot be written: warned).
        """
        if not self.writable:
            return False
        try:
            with self._locked():
                return self._merge_and_write(machine, key, entry)
        except OSError as err:
            return self._unwritable(err)

    def _unwritable(self, err: OSError) -> bool:
        self.writable = False
        warnings.warn(f"vera-lightning autotune: cannot write the cache file {self.path} ({err}); "
                      "measured choices are kept in this process only", RuntimeWarning, stacklevel=4)
        return False

    def _merge_and_write(self, machine: str, key: str, entry: dict[str, Any]) -> bool:
        doc = self._read()
        if doc is None:
            return False
        section = doc["machines"].get(machine)
        doc["machines"][machine] = {**(section if isinstance(section, dict) else {}), key: entry}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.fchmod(fd, _umask_mode())  # the cache file gets the umask's mode (0644 under 022), not mkstemp's 0600
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            tmp = None
            return True
        except OSError as err:
            return self._unwritable(err)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
