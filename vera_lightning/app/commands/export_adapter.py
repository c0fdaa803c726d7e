"""What ``adapter=`` names for an export, resolved and read without loading any model.

* :func:`resolve_export_adapter`: a VeRA adapter directory, a ``.ckpt``, or a **training run directory**, which
  resolves to its ``adapter/`` (else its ``checkpoints/last.ckpt``), said in one line. A merged model directory, a
  folder holding something else and a file that is not a ``.ckpt`` are refused, naming what export takes (export
  never takes a merged model, unlike ``eval.py``/``predict.py``).
* :func:`adapter_options`: the adapter's rank ``r`` and the options a GGUF LoRA cannot carry (``modules_to_save``,
  ``bias``), from ``adapter_config.json`` or the ``.ckpt``'s VeRA marker; a LoRA or other PEFT adapter, an unreadable
  config and a checkpoint without the marker are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from vera_lightning import ADAPTER_CONFIG_NAME, checkpoint_config
from vera_lightning.app.commands.adapters import AdapterSource, resolve_adapter

__all__ = ["ADAPTER_HINT", "resolve_export_adapter", "adapter_options"]

ADAPTER_HINT = ("export takes a VeRA adapter directory (adapter_config.json + adapter_model.safetensors: a training "
                "run's adapter/, or the run directory itself) or a .ckpt written by a training run "
                "(<run dir>/checkpoints/last.ckpt)")


def resolve_export_adapter(value: Any) -> tuple[Optional[AdapterSource], Optional[str], Optional[str]]:
    """``(source, note, problem)`` for ``adapter=value``; a run directory resolves to its ``adapter/``."""
    path = Path(str(value)).expanduser()
    if not path.exists():
        return None, None, f"adapter={str(value)!r}: no such file or directory. {ADAPTER_HINT}"
    note = None
    if path.is_dir() and not (path / ADAPTER_CONFIG_NAME).is_file():
        if (path / "config.json").is_file():
            return None, None, (f"adapter={str(value)!r} is a model directory (config.json), not a VeRA adapter: it is "
                                "already a plain model that any runtime loads. " + ADAPTER_HINT)
        inner = [p for p in (path / "adapter", path / "checkpoints" / "last.ckpt")
                 if (p / ADAPTER_CONFIG_NAME).is_file() or p.suffix == ".ckpt" and p.is_file()]
        if not inner:
            listing = sorted(p.name for p in path.iterdir())[:6]
            return None, None, f"adapter={str(value)!r} is a directory holding {listing}, not a VeRA adapter. " + \
                ADAPTER_HINT
        note = f"adapter={str(value)!r} is a training run: exporting its {inner[0].relative_to(path)} ({inner[0]})"
        path = inner[0]
    elif path.is_file() and path.suffix != ".ckpt":
        return None, None, f"adapter={str(value)!r} is a file but not a .ckpt. {ADAPTER_HINT}"
    return resolve_adapter(path), note, None


def adapter_options(source: AdapterSource) -> tuple[Optional[int], dict, Any, Optional[str]]:
    """``(r, {modules_to_save, bias}, loaded checkpoint, problem)`` of a VeRA adapter directory or ``.ckpt``."""
    shown = str(source.path)
    if source.kind == "checkpoint":
        try:
            checkpoint = torch.load(source.path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            return None, {}, None, f"adapter={shown!r}: could not read the checkpoint ({type(err).__name__})"
        config = checkpoint_config(checkpoint)
        if config is None:
            return None, {}, None, (f"adapter={shown!r} is not a checkpoint written with VeraCallback (no VeRA config "
                                    "marker); give a VeRA run's <run dir>/checkpoints/last.ckpt or its adapter/")
        return config.r, {"modules_to_save": config.modules_to_save, "bias": config.bias}, checkpoint, None
    try:
        saved = json.loads((source.path / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, {}, None, f"adapter={shown!r}: {ADAPTER_CONFIG_NAME} cannot be read ({err})"
    kind = saved.get("peft_type") if isinstance(saved, dict) else None
    if kind != "VERA":
        return None, {}, None, (f"adapter={shown!r} is a {kind or 'non-PEFT'} adapter, not VeRA (peft_type={kind!r} in "
                                f"{ADAPTER_CONFIG_NAME}); export converts VeRA adapters (a training run's adapter/ or "
                                "save_adapter's directory). A LoRA adapter serves as it is in vLLM/TGI; llama.cpp's "
                                "convert_lora_to_gguf.py converts it to GGUF")
    options = {"modules_to_save": saved.get("modules_to_save"), "bias": saved.get("bias") or "none"}
    return int(saved.get("r") or 0), options, None, None
