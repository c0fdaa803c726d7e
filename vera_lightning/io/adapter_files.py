"""What an adapter directory may hold, and how its files are written.

An adapter directory (:func:`check_target_dir`) holds ``adapter_config.json`` and
``adapter_model.safetensors``, PEFT's model card ``README.md`` (carried over, never deleted) and, in
PEFT's layout for several adapters, named adapters' folders ``<name>/`` (:func:`sub_adapters`). Saving
into such a root (:func:`write_adapter_files`) replaces its files and keeps those folders byte for byte
(hard links to the same files) while holding the lock their own saves take; anything else in the
directory is refused before anything is written.

The replacement itself (staging, the atomic exchange or rename, fsync, the lock) is
:mod:`vera_lightning.io.atomic`'s; this module decides what may be replaced and what the new version holds.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Optional

from vera_lightning.core.adapter import check_adapter_name
from vera_lightning.io.atomic import STAGING_SUFFIX, clean_leftovers, replace_directory
from vera_lightning.io.locks import LOCK_FILE, locked, locked_subfolders
from vera_lightning.io.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from vera_lightning.io.safetensors_file import write_safetensors

__all__ = ["check_target_dir", "sub_adapters", "write_adapter_files", "ADAPTER_FILES", "MODEL_CARD"]

#: The files of an adapter directory (VeRA's or an exported LoRA's).
ADAPTER_FILES = frozenset({ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME})
MODEL_CARD = "README.md"  # PEFT's save_pretrained writes one; kept (never deleted) when we replace the adapter


def _is_adapter_folder(path: str) -> bool:
    """A real folder holding ``adapter_config.json``, and else only adapter files and a model card, all regular."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    return (ADAPTER_CONFIG_NAME in entries and set(entries) <= ADAPTER_FILES | {MODEL_CARD}
            and all(stat.S_ISREG(os.lstat(os.path.join(path, e)).st_mode) for e in entries))


def _own_staging(entry: str) -> Optional[str]:
    """The sub-adapter name whose save stages in ``entry`` (``.<name>.vera-tmp``), or ``None``."""
    name = entry[1:-len(STAGING_SUFFIX)] if entry.startswith(".") and entry.endswith(STAGING_SUFFIX) else ""
    return name if _is_adapter_name(name) else None


def _is_adapter_name(name: str) -> bool:
    try:
        check_adapter_name(name, "")
    except ValueError:
        return False
    return True


def sub_adapters(directory: str) -> list[str]:
    """Names of the named-adapter folders ``directory`` holds: PEFT's ``save_pretrained`` layout with several
    adapters, ``<root>/<name>/`` (``name`` a valid adapter name, the folder holding only adapter files)."""
    if not os.path.isdir(directory) or os.path.islink(directory):
        return []
    return sorted(e for e in os.listdir(directory)
                  if _is_adapter_name(e) and _is_adapter_folder(os.path.join(directory, e)))


def check_target_dir(directory: str) -> None:
    """Refuse to replace ``directory`` unless it is absent or an adapter directory: adapter files, PEFT's model card
    (with them), named sub-adapter folders (:func:`sub_adapters`) and what saves into those leave (their staging
    area and lock file)."""
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise ValueError(f"save_adapter: {directory!r} exists and is not a directory; choose another path")
        entries = set(os.listdir(directory))
        subs = set(sub_adapters(directory))
        foreign = {e for e in entries - ADAPTER_FILES - subs - {LOCK_FILE} if _own_staging(e) is None}
        if entries & ADAPTER_FILES or subs:
            foreign.discard(MODEL_CARD)  # the model card of a PEFT-written adapter: carried over, not deleted
        if foreign:
            raise ValueError(
                f"save_adapter refuses to replace {directory!r}: it holds {sorted(foreign)[:5]}, which are not adapter "
                f"files ({sorted(ADAPTER_FILES)}) nor named adapters' folders (<name>/ holding only adapter files); "
                "nothing was changed. Choose an empty or new directory"
            )


def write_adapter_files(directory: str, config: dict[str, Any], tensors: dict, metadata: dict[str, str]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``directory``: check the target, then
    replace it atomically under the save lock (:func:`check_target_dir`, :func:`locked`, :func:`replace_directory`).

    The named adapters' folders it holds (:func:`sub_adapters`) stay, byte for byte, in the new version; saves
    into them wait meanwhile (:func:`locked_subfolders`), so none is lost.

    Raises:
        ValueError: From :func:`check_target_dir`.
        OSError: Of the same type, saying nothing was changed, if the files cannot be written.
        TimeoutError: If another save holds the lock too long.
    """

    def fill(staging: str) -> None:
        write_safetensors(tensors, os.path.join(staging, ADAPTER_WEIGHTS_NAME), metadata=metadata)
        with open(os.path.join(staging, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")

    existed = os.path.isdir(directory)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        with locked(directory):
            clean_leftovers(directory, ADAPTER_FILES)
            with locked_subfolders(directory):
                check_target_dir(directory)
                for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
                    if _own_staging(entry) is not None:  # a killed save of a sub-adapter (its lock is held here)
                        clean_leftovers(os.path.join(directory, _own_staging(entry)), ADAPTER_FILES)
                replace_directory(directory, fill, carry=(MODEL_CARD,), keep_folders=sub_adapters(directory))
    except TimeoutError:
        raise
    except OSError as err:
        kept = "still holds the previous adapter" if existed else "was not created"
        message = (f"save_adapter could not write {directory!r}: {err.strerror or err}. Nothing was changed: "
                   f"{directory!r} {kept}. Check that the location is writable and has free space")
        raise (type(err)(err.errno, message) if err.errno else type(err)(message)) from None


