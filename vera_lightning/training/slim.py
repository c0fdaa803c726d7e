"""Slim Lightning checkpoints: the ``.ckpt`` keeps the adapter, the base comes from the model.

``slim_checkpoint_`` (called from ``VeraCallback.on_save_checkpoint``) drops every frozen
parameter from ``checkpoint["state_dict"]``: what stays are the trainable tensors (λ's,
trainable biases, ``modules_to_save``), the λ's of every named adapter, the buffers (the projections when
``save_projection=True``, running statistics) and a marker with the VeRA config, stored in
the state dict's own ``_metadata`` so that it travels with it.

Lightning restores the model with a strict ``load_state_dict`` before any callback sees
the checkpoint, so ``install_slim_loading`` registers a load pre-hook on the
LightningModule: when (and only when) the incoming state dict carries the marker, it checks
the config and fills in the frozen parameters from the model itself, which then loads
strictly as usual. Any other missing key still fails the load.

The marker records what the checkpoint was trained on (:func:`resume_record`), checked on resume
(:func:`resume_problems`):

* ``base``: a fingerprint per frozen tensor: SHA-256 (16 hex digits) of its dtype, shape and 4096
  evenly spaced values. A base built differently (another seed, other pretrained weights, another
  dtype) is refused; a change confined to values between the samples is not seen. Sharded
  parameters (FSDP) are not fingerprinted: their local shards depend on the world size.
* ``projections``: SHA-256 of ``vera_A``/``vera_B``. Checked when ``save_projection=False`` (the
  ``.ckpt`` does not hold them, so the model's own draw must be the one trained with).

Configs are compared with ``VeraConfig.diff``, ignoring :data:`~vera_lightning.config.INIT_ONLY_OPTIONS`
(``d_initial``, ``init_weights`` only set the λ's initial values, which a resumed run takes from the checkpoint).
Checkpoints written before the record existed are not checked.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vera_lightning.core.adapter import VeraAdapter
from vera_lightning.core.lookup import find_adapter, vera_layers
from vera_lightning.config import INIT_ONLY_OPTIONS, VeraConfig

__all__ = ["SLIM_MARK", "slim_checkpoint_", "install_slim_loading", "kept_state_keys", "resume_record",
           "resume_problems"]

#: Key of the marker, in ``state_dict._metadata[""]`` and at the top level of the checkpoint.
SLIM_MARK = "vera_lightning"
_FORMAT = 1
_SAMPLES = 4096


def kept_state_keys(module: nn.Module, adapter: Optional[VeraAdapter]) -> set[str]:
    """State-dict keys a slim checkpoint keeps.

    Trainable parameters, every persistent buffer, and the λ's of every named adapter (frozen while
    another one trains, but not part of the base model the loader fills in).
    """
    keys = set(module.state_dict(keep_vars=True))
    lambdas = set() if adapter is None else {
        id(getattr(layer, attr)) for _, layer in vera_layers(module) for name in adapter.names
        for attr in adapter.lambda_names(name)
    }
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False)
              if not p.requires_grad and id(p) not in lambdas}
    return keys - frozen


def _plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type != "meta"


def _sharded(module: nn.Module) -> bool:
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()) or any(
        not _plain(p) for p in module.parameters()
    )


def _fingerprint(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    sample = flat[::step][:_SAMPLES].to("cpu").contiguous()
    hasher = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    hasher.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return hasher.hexdigest()[:16]


def _projection_digest(adapter: Optional[VeraAdapter]) -> Optional[str]:
    if adapter is None:
        return None
    hasher = hashlib.sha256()
    for buf in (adapter.vera_A, adapter.vera_B):
        data = buf.detach().to("cpu", torch.float32).contiguous()
        hasher.update(f"{tuple(data.shape)}|".encode() + data.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def resume_record(module: nn.Module, adapter: Optional[VeraAdapter], kept: set[str]) -> dict[str, Any]:
    """Fingerprints of the frozen base and the projections of ``module`` (for the slim marker).

    ``kept`` is :func:`kept_state_keys` (what the checkpoint holds itself, e.g. frozen named adapters' λ's).
    """
    record: dict[str, Any] = {"projections": _projection_digest(adapter)}
    if not _sharded(module):
        record["base"] = {
            name: _fingerprint(p) for name, p in module.named_parameters(remove_duplicate=False)
            if not p.requires_grad and name not in kept
        }
    return record


def resume_problems(record: Optional[dict[str, Any]], module: nn.Module, adapter: VeraAdapter) -> list[str]:
    """Why ``module`` is not the model a checkpoint with ``record`` was trained on (empty: it is)."""
    if not record:
        return []  # written before these records existed
    problems = []
    saved_base = record.get("base")
    if saved_base is not None and not _sharded(module):
        now = resume_record(module, adapter, kept_state_keys(module, adapter))["base"]
        differ = sorted(n for n in set(saved_base) | set(now) if saved_base.get(n) != now.get(n))
        if differ:
            problems.append(
                f"the frozen base differs from the one this checkpoint was trained on ({len(differ)} of "
                f"{len(saved_base)} frozen tensors differ, e.g. {differ[:3]}); the checkpoint holds only the adapter, "
                "so build the model exactly as for training (same from_pretrained weights; the same seed for a "
                "randomly initialised model)"
            )
    if (not adapter.config.save_projection and record.get("projections")
            and record["projections"] != _projection_digest(adapter)):
        problems.append(
            "the model's vera_A/vera_B differ from the ones this checkpoint was trained with (save_projection=False: "
            "the .ckpt does not hold them and the model's own draw from projection_prng_key is not the same); resume "
            "where it was trained, or train with save_projection=True"
        )
    return problems


def slim_checkpoint_(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Drop the frozen parameters from a Lightning checkpoint dict, in place, and mark it.

    Args:
        checkpoint: The dict Lightning passes to ``on_save_checkpoint``.
        module: The LightningModule whose state dict it holds.

    Raises:
        ValueError: If ``module`` carries no VeRA adapter.
    """
    adapter = find_adapter(module)
    if adapter is None:
        raise ValueError(
            f"slim checkpoint requested but {type(module).__name__} carries no VeRA adapter; "
            "add VeraCallback or call apply_vera before saving"
        )
    state = checkpoint["state_dict"]
    keep = kept_state_keys(module, adapter)
    slim: OrderedDict = OrderedDict((k, v) for k, v in state.items() if k in keep)
    metadata = OrderedDict((k, dict(v)) for k, v in getattr(state, "_metadata", OrderedDict()).items())
    marker = {"format": _FORMAT, "config": adapter.config.to_dict(), "dropped": len(state) - len(slim),
              "resume": resume_record(module, adapter, keep)}  # checked by _fill_frozen_base on resume
    metadata.setdefault("", {})[SLIM_MARK] = marker
    slim._metadata = metadata  # type: ignore[attr-defined]
    checkpoint["state_dict"] = slim
    checkpoint[SLIM_MARK] = marker


def _fill_frozen_base(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, *args: Any
) -> None:
    marker = local_metadata.get(SLIM_MARK)
    if marker is None:
        return  # a full state dict: nothing to do, the strict load checks it as usual
    adapter = find_adapter(module)
    if adapter is None:
        raise ValueError(
            f"this is a slim VeRA checkpoint (adapter tensors only) but {type(module).__name__} carries no VeRA "
            "adapter; add VeraCallback to the Trainer (or call apply_vera before loading) so the adapter is "
            "injected before the checkpoint is restored"
        )
    # d_initial/init_weights only set initial values, which a resumed run takes from the checkpoint
    diff = VeraConfig.from_dict(marker.get("config", {})).diff(adapter.config, ignore=INIT_ONLY_OPTIONS)
    if diff:
        raise ValueError(
            f"slim VeRA checkpoint was saved with a different VeraConfig (option: (checkpoint, model)) {diff}; "
            "use the config the checkpoint was trained with"
        )
    problems = resume_problems(marker.get("resume"), module, adapter)
    if problems:
        raise ValueError("this slim VeRA checkpoint does not fit the model, nothing was loaded: " + "; ".join(problems))
    for name, param in module.named_parameters(remove_duplicate=False):
        if not param.requires_grad and prefix + name not in state_dict:
            state_dict[prefix + name] = param.detach()


def install_slim_loading(module: nn.Module) -> RemovableHandle:
    """Let ``module.load_state_dict`` accept slim VeRA checkpoints (full ones are unaffected).

    Returns:
        The hook handle (``.remove()`` uninstalls it).
    """
    return module.register_load_state_dict_pre_hook(_fill_frozen_base)
