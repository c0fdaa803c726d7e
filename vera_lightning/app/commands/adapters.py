"""What ``adapter=PATH`` names in ``scripts/eval.py`` and ``scripts/predict.py``, and loading it.

Three kinds, told apart by what is on disk:

* an **adapter directory** (``adapter_config.json`` + ``adapter_model.safetensors``), written by
  the training app, :func:`vera_lightning.save_adapter` or PEFT's ``save_pretrained``: loaded
  into the base model the ``model`` config builds, with every check of
  :func:`vera_lightning.load_adapter`;
* a **slim Lightning checkpoint** (``.ckpt``) written with :class:`~vera_lightning.VeraCallback`:
  its VeRA config marker says how to inject, then the checkpoint loads strictly (the frozen
  base comes from the ``model`` config);
* a **merged export** (a Hugging Face model directory with ``config.json``, e.g. after
  ``unload_vera(model, merge=True)`` and ``save_pretrained``): it replaces the ``model``
  config's weights; no adapter is applied.

Any way an adapter does not fit the model ends in one ``ValueError`` naming the adapter, the
model in use, the base the adapter records and, when found, the training run's overrides.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from vera_lightning import ADAPTER_CONFIG_NAME, VeraConfig, checkpoint_config, load_adapter, load_vera_checkpoint
from vera_lightning.app.commands.build import Components, base_model_id
from vera_lightning.app.models.gguf_cache import same_conversion

__all__ = ["AdapterSource", "resolve_adapter", "model_config_for", "attach_adapter", "start_adapter_check"]

#: What an adapter training starts from must share with the run's ``vera`` settings (the shared projections and
#: the adapted layers).
STRUCTURE = ("r", "projection_prng_key", "target_modules", "layers_to_transform", "layers_pattern")

_KINDS_HINT = (
    "adapter= takes an adapter directory (adapter_config.json + adapter_model.safetensors, e.g. "
    "outputs/<date>/<time>/adapter), a .ckpt written by a training run (<run dir>/checkpoints/last.ckpt), or a "
    "merged model directory (config.json + weights)"
)


@dataclass(frozen=True)
class AdapterSource:
    """A resolved ``adapter=`` value.

    Attributes:
        kind: ``"adapter"``, ``"checkpoint"`` or ``"merged"``.
        path: The directory or file.
        base: The ``base_model_name_or_path`` an adapter directory records (``None`` if absent).
    """

    kind: str
    path: Path
    base: Optional[str] = None


def resolve_adapter(value: Any) -> AdapterSource:
    """Tell what kind of thing ``adapter=value`` names (nothing is loaded yet).

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If it is neither an adapter directory, a ``.ckpt`` nor a model directory.
    """
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"adapter={str(value)!r}: no such file or directory. {_KINDS_HINT}.")
    if path.is_dir():
        config_file = path / ADAPTER_CONFIG_NAME
        if config_file.is_file():
            try:
                base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                base = None  # load_adapter reports the broken file with its own message
            return AdapterSource("adapter", path, base or None)
        if (path / "config.json").is_file():
            return AdapterSource("merged", path)
        listing = sorted(p.name for p in path.iterdir())[:6]
        raise ValueError(f"adapter={str(value)!r} is a directory holding {listing}, "
                         f"none of which it needs. {_KINDS_HINT}.")
    if path.suffix == ".ckpt":
        return AdapterSource("checkpoint", path)
    raise ValueError(f"adapter={str(value)!r} is a file but not a .ckpt. {_KINDS_HINT}.")


def model_config_for(source: Optional[AdapterSource], model_cfg: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The ``model`` config to build with: a merged export replaces the weights (and the tokenizer if it has one)."""
    if source is None or source.kind != "merged":
        return None
    has_tokenizer = any((source.path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = str(source.path) if has_tokenizer else (model_cfg.get("tokenizer") or model_cfg.get("name_or_path"))
    return {**dict(model_cfg), "name_or_path": str(source.path), "from_config": None, "tokenizer": tokenizer}


def _training_overrides(path: Path) -> Optional[list[str]]:
    for run_dir in (path.parent, path.parent.parent):
        overrides = run_dir / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            from omegaconf import OmegaConf

            return [str(o) for o in OmegaConf.load(overrides)]
    return None


def _mismatch(source: AdapterSource, model_cfg: Mapping[str, Any], problem: str) -> ValueError:
    used = base_model_id(model_cfg)
    lines = [f"adapter={str(source.path)!r} cannot be used with model={model_cfg.get('name')} ({used!r}):",
             problem.strip()]
    if source.base and not same_conversion(source.base, used):
        lines.append(f"The adapter was trained on {source.base!r} (base_model_name_or_path in {ADAPTER_CONFIG_NAME}).")
    overrides = _training_overrides(source.path)
    if overrides is not None:
        lines.append(f"Its training run used the overrides {overrides or '(none)'}; "
                     "pass the same model= (and data=) options.")
    else:
        lines.append("Pass the model= (and data=) options the adapter was trained with.")
    return ValueError("\n".join(lines))


def _load_checkpoint(module: nn.Module, path: Path) -> None:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"adapter={str(path)!r}: could not read the checkpoint "
                         f"({type(err).__name__}: {err})") from None
    if checkpoint_config(checkpoint) is None:
        raise ValueError(
            f"adapter={str(path)!r} is not a checkpoint written with VeraCallback (no VeRA config marker); "
            f"{_KINDS_HINT}."
        )
    load_vera_checkpoint(module, checkpoint)  # VeRA from the recorded config, then a strict load


def attach_adapter(parts: Components, source: Optional[AdapterSource], model_cfg: Mapping[str, Any]) -> str:
    """Load ``source`` into ``parts.model`` / ``parts.module``; returns a one-line description.

    Raises:
        ValueError: If the adapter does not fit the model (one message, see the module docstring).
    """
    if source is None:
        return f"base model {model_cfg.get('name')} (no adapter)"
    if source.kind == "merged":
        return f"merged model {source.path}"
    try:
        if source.kind == "adapter":
            load_adapter(parts.model, source.path)
        else:
            _load_checkpoint(parts.module, source.path)
    except (ValueError, FileNotFoundError) as err:
        raise _mismatch(source, model_cfg, str(err)) from None
    used = base_model_id(model_cfg)
    if source.base and not same_conversion(source.base, used):  # a moved cache holds the same GGUF weights
        warnings.warn(
            f"adapter={str(source.path)!r} records base_model_name_or_path={source.base!r} but model="
            f"{model_cfg.get('name')} is {used!r}; the shapes fit, but the results only mean something on the base "
            "the adapter was trained on",
            UserWarning,
            stacklevel=2,
        )
    return f"{'adapter' if source.kind == 'adapter' else 'checkpoint'} {source.path}"


def start_adapter_check(path: Any, vera_config: VeraConfig) -> None:
    """``train.py adapter=PATH``: the adapter's ``r``, projection seed and adapted layers equal the run's ``vera``.

    Raises:
        ValueError: Naming each differing ``vera.<option>``, both values and the fix.
    """
    config_file = Path(str(path)) / ADAPTER_CONFIG_NAME
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"adapter={str(path)!r}: cannot read {config_file} ({err}); re-save the adapter") from None
    known = {k: v for k, v in saved.items() if k in STRUCTURE}
    differences = VeraConfig(**{**vera_config.to_dict(), **known}).diff(vera_config)
    differences = {k: v for k, v in differences.items() if k in STRUCTURE}
    if differences:
        listed = ", ".join(f"vera.{k}={mine!r} (the adapter has {theirs!r})" for k, (theirs, mine) in
                           differences.items())
        fix = " ".join(f"vera.{k}={theirs!r}".replace("'", "") for k, (theirs, _) in differences.items())
        raise ValueError(f"adapter={str(path)!r}: training starts from this adapter, but {listed}; set {fix} (the "
                         "settings it was trained with)")
