"""Reading an adapter directory for :func:`vera_lightning.load_adapter`: both files from one version, never a pickle.

:func:`read_adapter` finds the directory (PEFT's ``<root>/<name>/`` for a named adapter), reads
``adapter_config.json`` and ``adapter_model.safetensors`` from one version of it (see
:mod:`vera_lightning.io.reads`), parses the config into a :class:`~vera_lightning.VeraConfig` and the
weights with their header metadata. What the contents must satisfy is checked by the caller
(:mod:`vera_lightning.io.peft_format`); a missing, unreadable or pickled file is refused here.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from vera_lightning.config import VeraConfig
from vera_lightning.core.adapter import DEFAULT_ADAPTER
from vera_lightning.io import peft_format as fmt
from vera_lightning.io import reads
from vera_lightning.io.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

__all__ = ["read_adapter"]


def read_adapter(
    directory: str, name: str
) -> tuple[str, VeraConfig, dict[str, torch.Tensor], dict[str, str]]:
    """``(directory read, config, tensors, header metadata)`` of the adapter ``name`` stored at ``directory``.

    Raises:
        FileNotFoundError: No such directory, or one of its two files missing (a pickle in its place is named).
        ValueError: A file that is not a regular file, invalid JSON, or truncated/corrupted safetensors.
    """
    directory = _adapter_directory(directory, name)
    files = _read_files(directory)
    config = _read_config(directory, files[ADAPTER_CONFIG_NAME])
    tensors, metadata = _read_weights(directory, files)
    return directory, config, tensors, metadata


_PICKLES = ("adapter_model.bin", "adapter_model.pt")


def _adapter_directory(directory: str, name: str) -> str:
    """PEFT's ``save_pretrained`` writes adapters other than ``"default"`` to ``<root>/<name>/``."""
    sub = os.path.join(directory, name)
    if name != DEFAULT_ADAPTER and os.path.isfile(os.path.join(sub, ADAPTER_CONFIG_NAME)):
        return sub
    return directory


def _read_files(directory: str) -> dict[str, Optional[bytes]]:
    """Both files (and whether pickles are there) from one version of the directory."""
    try:
        return reads.read_files(directory, (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) + _PICKLES)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            f"load_adapter: {directory!r} is not a directory (expected an adapter directory holding "
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})"
        ) from None
    except reads.NotRegularFileError as err:
        raise ValueError(f"load_adapter: {err}") from None


def _read_config(directory: str, raw: Optional[bytes]) -> VeraConfig:
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if raw is None:
        raise FileNotFoundError(
            f"load_adapter: {path} is missing; an adapter directory holds {ADAPTER_CONFIG_NAME} and "
            f"{ADAPTER_WEIGHTS_NAME} (as written by save_adapter or PEFT's save_pretrained)"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_adapter: {path} is not valid JSON ({err}); re-save the adapter") from None
    return fmt.config_from_peft_dict(data, path)


def _header_metadata(raw: bytes) -> dict[str, str]:
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size].decode("utf-8"))
    return dict(header.get("__metadata__") or {})


def _read_weights(directory: str, files: dict[str, Optional[bytes]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    raw = files[ADAPTER_WEIGHTS_NAME]
    if raw is None:
        pickled = [n for n in _PICKLES if files.get(n) is not None]
        hint = (
            f" It holds {pickled[0]}, a pickle, which is never loaded (it can run arbitrary code); re-save the "
            "adapter with safe_serialization=True" if pickled else ""
        )
        raise FileNotFoundError(f"load_adapter: {path} is missing.{hint}")
    try:  # metadata and tensors from the same bytes: a writer replacing the file cannot mix two versions
        tensors = load(raw)
        metadata = _header_metadata(raw)
    except (SafetensorError, OSError, RuntimeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"load_adapter: {path} is truncated or corrupted and could not be read ({err}); re-save the adapter"
        ) from None
    return tensors, metadata
