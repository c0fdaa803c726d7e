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
of the whole content, checked on load. Saving is atomic and serialised (see
:mod:`vera_lightning.io.atomic`): the path always holds a complete adapter, the previous one or
the new one, whatever is killed when; loading reads both files from one version.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from vera_lightning.config import VeraConfig
from vera_lightning.core.adapter import DEFAULT_ADAPTER, VeraAdapter, check_adapter_name, check_no_open_block
from vera_lightning.core.finite import META_FORMAT, NonFiniteError, file_problems, nonfinite_names, warn_dtype_changes
from vera_lightning.core.lookup import Adapted, adapter_root, find_adapted
from vera_lightning.core.messages import shorten
from vera_lightning.core.refusals import check_not_merged, check_not_meta
from vera_lightning.forward.protocol import HALF_DTYPES
from vera_lightning.io import adapter_files
from vera_lightning.io import peft_format as fmt
from vera_lightning.io.adapter_read import read_adapter
from vera_lightning.io.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from vera_lightning.ops.inject import apply_vera
from vera_lightning.ops.named import add_adapter, compatibility_problems

__all__ = ["save_adapter", "save_adapted", "load_adapter", "adapted_for", "adapter_root", "ADAPTER_CONFIG_NAME",
           "ADAPTER_WEIGHTS_NAME"]

PathLike = Union[str, "os.PathLike[str]"]


def save_adapter(
    model: nn.Module, directory: PathLike, base_model_name_or_path: Optional[str] = None,
    adapter_name: Optional[str] = None, metadata: Optional[dict[str, str]] = None,
) -> str:
    """Write the VeRA adapter of ``model`` to ``directory`` in PEFT's layout.

    Args:
        model: An adapted model (names in the file are relative to it; pass the
            ``transformers`` model, not a LightningModule wrapping it, for PEFT interop).
        directory: Target directory; created, or replaced if it holds only adapter files. In PEFT's layout
            for several adapters (the primary one in ``root``, each other in ``root/<name>``), re-saving to
            ``root`` keeps the ``<name>/`` folders byte for byte (see :mod:`vera_lightning.io.adapter_files`).
        base_model_name_or_path: Recorded in ``adapter_config.json`` (PEFT uses it to find the base).
        adapter_name: Which named adapter to write (default: the active one). The file has the same
            keys for every name (PEFT's layout); see :mod:`vera_lightning.ops.named`.
        metadata: Extra string entries for the safetensors header (e.g. the app's ``vera_lightning.precision``:
            the precision the adapter was trained in); PEFT ignores them. They cannot replace this module's own.

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
    directory = _target_path(directory)
    return save_adapted(model, adapted_for(model, "save_adapter"), directory, base_model_name_or_path, adapter_name,
                        metadata=metadata)


def save_adapted(
    model: nn.Module, found: Optional[Adapted], directory: PathLike, base_model_name_or_path: Optional[str] = None,
    adapter_name: Optional[str] = None, metadata: Optional[dict[str, str]] = None,
) -> str:
    """:func:`save_adapter` for a caller that has looked the adapter up already (``found``, from
    :func:`adapted_for` or :func:`~vera_lightning.core.lookup.find_adapted` of ``model``): nothing is looked up again.

    Raises:
        ValueError: As :func:`save_adapter` (``found`` is ``None``: ``model`` has no VeRA).
    """
    directory = _target_path(directory)
    if found is None:
        raise ValueError(f"save_adapter: {type(model).__name__} carries no VeRA adapter; call apply_vera first")
    adapter = found.adapter
    name = adapter.active if adapter_name is None else adapter_name
    config = adapter.config_of(name)
    check_not_meta(model, f"save_adapter({directory!r})")
    every = fmt.layout(model, config, found=found, adapter_name=name)  # computed once: written and checked
    slots = every if config.save_projection else {k: v for k, v in every.items() if k not in fmt.PROJECTION_KEYS}
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, (_, t) in slots.items()}
    bad = nonfinite_names(sorted(tensors.items()))
    if bad:
        raise NonFiniteError(
            f"save_adapter({directory!r}) refused, nothing was written: NaN/inf in {shorten(bad, 6, as_list=True)}; "
            "the adapter is broken (training diverged?). Lower the learning rate or restore an earlier adapter"
        )
    projection_sha = fmt.check_projections_match_seed(config, every)
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header.update({"format": "pt", META_FORMAT: "1", fmt.META_PROJECTION: projection_sha,
                   fmt.META_CONTENT: fmt.content_sha256(tensors)})
    payload = {**config.to_dict(), **fmt.peft_extra_fields(base_model_name_or_path)}
    adapter_files.write_adapter_files(directory, payload, tensors, header)
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
        ValueError: Naming every problem found in the adapter (one error, model unchanged); inside an open
            ``disable_adapter``/``adapter_batch`` block (it would change what the block serves), or on merged layers.
    """
    directory = os.fspath(directory)
    found = adapted_for(model, f"load_adapter({directory!r})")
    adapter = found.adapter if found is not None else None
    check_no_open_block(adapter, f"load_adapter({directory!r})")  # it would change what the block serves
    check_not_merged(found.layers if found is not None else (), f"load_adapter({directory!r}) refused, the model was "
                     "not changed", "their weights hold W0 + the current adapter's update: a loaded adapter would not "
                     "take effect and a later unmerge would subtract the wrong update",
                     then=", then load, then merge_vera(model) again if you need it")
    check_not_meta(model, f"load_adapter({directory!r})")
    if adapter_name is not None:
        check_adapter_name(adapter_name, "load_adapter")
    name = adapter_name or (adapter.active if adapter is not None else DEFAULT_ADAPTER)
    directory, config, tensors, metadata = read_adapter(directory, name)
    if adapter is not None and (name != adapter.primary or len(adapter.names) > 1):
        problems = file_problems(tensors, metadata, fmt.META_CONTENT, fmt.META_PROJECTION)
        if problems:
            raise ValueError(f"load_adapter({directory!r}, adapter_name={name!r}) refused, the model was not "
                             "changed:\n  - " + "\n  - ".join(problems))
        return load_named(model, found, name, config, tensors, metadata, directory)
    existing = adapter.config if adapter is not None else None
    problems = fmt.compare_configs(model, existing, config) if existing is not None else []
    if not problems:
        problems = file_problems(tensors, metadata, fmt.META_CONTENT, fmt.META_PROJECTION)
        problems += fmt.check_tensors(model, config, tensors, metadata, found)
    if problems:
        raise ValueError(
            f"load_adapter({directory!r}) refused, the model was not changed:\n  - " + "\n  - ".join(problems)
        )
    if existing is None:
        apply_vera(model, config, adapter_name=name)
        found = find_adapted(model)  # the model was just adapted: its layers are new (the one lookup after the change)
    converted = []
    with torch.no_grad():
        for key, (_, target) in fmt.layout(model, existing or config, found=found).items():
            if key in tensors:
                if tensors[key].dtype != target.dtype:
                    converted.append((key, tensors[key].dtype, target.dtype))
                target.copy_(tensors[key].to(target.dtype))
    warn_dtype_changes(converted, directory)
    return model


def adapted_for(model: nn.Module, operation: str) -> Optional[Adapted]:
    """:func:`~vera_lightning.core.lookup.find_adapted` of ``model`` for a file operation: the one lookup of a save
    or load; several adapters are refused as ``"<operation> refused: ..."`` (a file holds one)."""
    try:
        return find_adapted(model)
    except ValueError as err:
        raise ValueError(f"{operation} refused: {err}") from None


# ---------------------------------------------------------------------- writing
def _target_path(directory: PathLike) -> str:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"save_adapter: directory={directory!r} must be a path (str or os.PathLike)")
    path = os.fspath(directory)
    if not path or not str(path).strip():
        raise ValueError(f"save_adapter: directory={path!r} is empty; give the directory to write, e.g. 'adapter'")
    return os.path.realpath(path) if os.path.islink(path) else path  # a symlink: save into its target


# ---------------------------------------------------------------------- loading into a named adapter
def _projection_problems(adapter: VeraAdapter, tensors: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for key, mine in ((fmt.PROJECTION_KEY["vera_A"], adapter.vera_A), (fmt.PROJECTION_KEY["vera_B"], adapter.vera_B)):
        if key not in tensors or tuple(tensors[key].shape) != tuple(mine.shape):
            continue  # absence and shapes are checked by check_tensors
        theirs, ours = tensors[key].float(), mine.detach().to("cpu", torch.float32)
        if not any(torch.equal(t, ours) for t in [theirs] + [theirs.to(h).float() for h in HALF_DTYPES]):
            problems.append(
                f"{key} differs from the projections the model's adapters share (drawn with the same "
                "projection_prng_key elsewhere, or trained with other projections); load this adapter into a separate "
                "copy of the base model"
            )
    return problems


def load_named(
    model: nn.Module, found: Adapted, name: str, config: VeraConfig, tensors: dict[str, torch.Tensor],
    metadata: dict[str, str], source: str,
) -> nn.Module:
    """Load a read adapter file into adapter ``name`` of a model holding (or about to hold) several adapters.

    Called by :func:`vera_lightning.load_adapter` with the model's adapter as it found it (``found``; its
    layers stay the same objects when a name is added). The shared projections are never overwritten: the
    file's must equal the model's. A new name is added with ``config``; an existing one keeps its config
    (as a single-adapter load does) and gets the file's tensors.

    Raises:
        ValueError: Naming every problem; the model is not changed.
    """
    adapter = found.adapter
    known = name in adapter.names
    if known and name == adapter.primary:
        problems = fmt.compare_configs(model, adapter.config_of(name), config)
    else:
        problems = compatibility_problems(model, found, config)
    if not problems:
        problems = fmt.check_tensors(model, config, tensors, metadata, found) + _projection_problems(adapter, tensors)
    if problems:
        raise ValueError(f"load_adapter({source!r}, adapter_name={name!r}) refused, the model was not changed:\n  - "
                         + "\n  - ".join(problems))
    if not known:
        add_adapter(model, name, config)
    with torch.no_grad():
        for key, (_, target) in fmt.layout(model, adapter.config_of(name), found=found, adapter_name=name).items():
            if key in tensors and key not in fmt.PROJECTION_KEYS:
                target.copy_(tensors[key].to(target.dtype))
    return model
