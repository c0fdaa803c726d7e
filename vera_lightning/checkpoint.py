"""Adapter directories in PEFT's on-disk layout: ``save_adapter`` / ``load_adapter``.

A directory holds ``adapter_config.json`` (PEFT's field names, ``"peft_type": "VERA"``) and
``adapter_model.safetensors`` with PEFT's keys, so ``peft.PeftModel.from_pretrained`` reads
what we write and :func:`load_adapter` reads what PEFT's ``save_pretrained`` writes:

===========================================  =============================================
our model                                    adapter_model.safetensors
===========================================  =============================================
``<layer>.vera_lambda_b`` / ``_d``           ``base_model.model.<layer>.vera_lambda_b`` / ``_d``
shared ``vera_A`` / ``vera_B``               ``base_model.vera_A`` / ``base_model.vera_B``
``<module_to_save>.<tensor>``                ``base_model.model.<module_to_save>.<tensor>``
bias of an adapted layer                     ``base_model.model.<layer>.base_layer.bias``
other trainable bias (``bias="all"``)        ``base_model.model.<name>.bias``
===========================================  =============================================

Layer names are relative to the module passed in (for a LightningModule wrapping a
``transformers`` model, pass the ``transformers`` model). Only safetensors is ever read.
The header metadata (ignored by PEFT) records a SHA-256 of the seed-drawn projections and
of the whole content, checked on load. Saving goes through a temporary directory and a
rename, so an interrupted save leaves the previous adapter in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional, Union

import torch
from torch import nn

from vera_lightning import adapter_format as fmt
from vera_lightning.adapter import DEFAULT_ADAPTER, find_adapter, vera_layers
from vera_lightning.config import VeraConfig
from vera_lightning.inject import apply_vera

__all__ = ["save_adapter", "load_adapter", "adapter_root", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_FILES = {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "README.md"}
PathLike = Union[str, "os.PathLike[str]"]


def adapter_root(module: nn.Module) -> nn.Module:
    """The module whose names match PEFT's: the outermost ``transformers`` model holding every adapted layer.

    Falls back to ``module`` itself when no such model exists (plain ``nn.Module`` s).
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return module
    layers = {id(layer) for _, layer in vera_layers(module)}
    for _, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and layers and layers <= {id(m) for m in sub.modules()}:
            return sub
    return module


def save_adapter(
    model: nn.Module, directory: PathLike, base_model_name_or_path: Optional[str] = None,
    adapter_name: Optional[str] = None,
) -> str:
    """Write the VeRA adapter of ``model`` to ``directory`` in PEFT's layout.

    Args:
        model: An adapted model (names in the file are relative to it; pass the
            ``transformers`` model, not a LightningModule wrapping it, for PEFT interop).
        directory: Target directory; created, or replaced if it holds only adapter files.
        base_model_name_or_path: Recorded in ``adapter_config.json`` (PEFT uses it to find the base).
        adapter_name: Which named adapter to write (default: the active one). The file has the same
            keys for every name (PEFT's layout); see :mod:`vera_lightning.named`.

    Returns:
        The directory path.

    Raises:
        ValueError: If ``model`` has no VeRA, if ``directory`` holds files that are not an
            adapter's, or if ``save_projection=False`` and the model's projections are not
            the ones ``projection_prng_key`` draws.

    Example::

        >>> import tempfile
        >>> from vera_lightning import VeraConfig, apply_vera, save_adapter
        >>> net = apply_vera(torch.nn.Sequential(torch.nn.Linear(8, 4)), VeraConfig(r=4, target_modules=["0"]))
        >>> sorted(os.listdir(save_adapter(net, tempfile.mkdtemp() + "/adapter")))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    adapter = find_adapter(model)
    if adapter is None:
        raise ValueError(f"save_adapter: {type(model).__name__} carries no VeRA adapter; call apply_vera first")
    name = adapter.active if adapter_name is None else adapter_name
    config = adapter.config_of(name)
    directory = os.fspath(directory)
    _check_target_dir(directory)
    slots = fmt.layout(model, config, name)
    if not config.save_projection:
        slots = {k: v for k, v in slots.items() if k not in fmt.PROJECTION_KEYS}
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, (_, t) in slots.items()}
    projection_sha = fmt.check_projections_match_seed(model, config)
    metadata = {"format": "pt", fmt.META_PROJECTION: projection_sha, fmt.META_CONTENT: fmt.content_sha256(tensors)}
    payload = {**config.to_dict(), **fmt.peft_extra_fields(base_model_name_or_path)}
    _atomic_write(directory, payload, tensors, metadata)
    return directory


def load_adapter(model: nn.Module, directory: PathLike, adapter_name: Optional[str] = None) -> nn.Module:
    """Load a VeRA adapter directory (ours or PEFT's ``save_pretrained``) into ``model``.

    A model without VeRA is adapted first with the saved config. Everything is checked
    before the model is touched: config, target layer names, ``r``, every shape, the
    presence of the projections and both checksums.

    Args:
        model: The base model (with or without VeRA already applied).
        directory: A directory holding ``adapter_config.json`` and ``adapter_model.safetensors``,
            or PEFT's ``save_pretrained`` root, whose subfolder ``<adapter_name>`` is then read.
        adapter_name: The named adapter to load into (default: the active one, or ``"default"`` for
            a model without VeRA). A name the model does not hold yet is added (see
            :func:`vera_lightning.add_adapter` for what must match); an existing one is overwritten.

    Returns:
        The same ``model``.

    Raises:
        FileNotFoundError: If the directory or its files are missing.
        ValueError: Naming every problem found in the adapter (one error, model unchanged).
    """
    directory = os.fspath(directory)
    adapter = find_adapter(model)
    if adapter_name is not None:
        from vera_lightning.named import check_adapter_name

        check_adapter_name(adapter_name, "load_adapter")
    name = adapter_name or (adapter.active if adapter is not None else DEFAULT_ADAPTER)
    directory = _adapter_directory(directory, name)
    config = _read_config(directory)
    tensors, metadata = _read_weights(directory)
    if adapter is not None and (name != adapter.primary or len(adapter.names) > 1):
        from vera_lightning.named import load_named

        return load_named(model, adapter, name, config, tensors, metadata, directory)
    existing = adapter.config if adapter is not None else None
    problems = fmt.compare_configs(model, existing, config) if existing is not None else []
    if not problems:
        problems = fmt.check_tensors(model, config, tensors, metadata)
    if problems:
        raise ValueError(
            f"load_adapter({directory!r}) refused, the model was not changed:\n  - " + "\n  - ".join(problems)
        )
    if existing is None:
        apply_vera(model, config, adapter_name=name)
    with torch.no_grad():
        for key, (_, target) in fmt.layout(model, existing or config).items():
            if key in tensors:
                target.copy_(tensors[key].to(target.dtype))
    return model


# ---------------------------------------------------------------------- reading
def _adapter_directory(directory: str, name: str) -> str:
    """PEFT's ``save_pretrained`` writes adapters other than ``"default"`` to ``<root>/<name>/``."""
    sub = os.path.join(directory, name)
    if name != DEFAULT_ADAPTER and os.path.isfile(os.path.join(sub, ADAPTER_CONFIG_NAME)):
        return sub
    return directory


def _read_config(directory: str) -> VeraConfig:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_adapter: {directory!r} is not a directory (expected an adapter directory)")
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_adapter: {path} is missing; an adapter directory holds {ADAPTER_CONFIG_NAME} and "
            f"{ADAPTER_WEIGHTS_NAME} (as written by save_adapter or PEFT's save_pretrained)"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_adapter: {path} is not valid JSON ({err}); re-save the adapter") from None
    return fmt.config_from_peft_dict(data, path)


def _read_weights(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(directory, n))]
        hint = (
            f" It holds {pickled[0]}, a pickle, which is never loaded (it can run arbitrary code); re-save the "
            "adapter with safe_serialization=True" if pickled else ""
        )
        raise FileNotFoundError(f"load_adapter: {path} is missing.{hint}")
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"load_adapter: {path} is truncated or corrupted and could not be read ({err}); re-save the adapter"
        ) from None
    return tensors, metadata


# ---------------------------------------------------------------------- writing
def _check_target_dir(directory: str) -> None:
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise ValueError(f"save_adapter: {directory!r} exists and is not a directory; choose another path")
        foreign = sorted(set(os.listdir(directory)) - _ADAPTER_FILES)
        if foreign:
            raise ValueError(
                f"save_adapter refuses to replace {directory!r}: it holds {foreign[:5]}, which are not adapter "
                f"files ({sorted(_ADAPTER_FILES)}); choose an empty or new directory"
            )


def _atomic_write(directory: str, config: dict[str, Any], tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata=metadata)
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            with open(os.path.join(tmp, name), "rb") as fh:
                os.fsync(fh.fileno())
        if os.path.isdir(directory):
            old = tmp + ".old"
            os.rename(directory, old)  # the previous adapter survives here until the new one is in place
            try:
                os.rename(tmp, directory)
            except OSError:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
