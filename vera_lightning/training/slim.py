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

Outside a ``Trainer`` (evaluation, serving), :func:`load_vera_checkpoint` applies the config a checkpoint
records (:func:`checkpoint_config`) to a freshly built module and loads it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vera_lightning.config import INIT_ONLY_OPTIONS, VeraConfig
from vera_lightning.core.adapter import ADAPTER_ATTR
from vera_lightning.core.lookup import Adapted, find_adapted
from vera_lightning.core.messages import shorten
from vera_lightning.io.peft_format import projection_sha256
from vera_lightning.ops.inject import apply_vera

__all__ = ["SLIM_MARK", "slim_checkpoint_", "install_slim_loading", "kept_state_keys", "resume_record",
           "resume_problems", "checkpoint_config", "load_vera_checkpoint"]

#: Key of the marker, in ``state_dict._metadata[""]`` and at the top level of the checkpoint.
SLIM_MARK = "vera_lightning"
_FORMAT = 1
_SAMPLES = 4096


def kept_state_keys(module: nn.Module, found: Optional[Adapted]) -> set[str]:
    """State-dict keys a slim checkpoint keeps.

    Trainable parameters, every persistent buffer, and the λ's of every named adapter (frozen while
    another one trains, but not part of the base model the loader fills in). ``found`` is ``module``'s
    adapter as the caller found it.
    """
    keys = set(module.state_dict(keep_vars=True))
    lambdas = set() if found is None else {
        id(getattr(layer, attr)) for _, layer in found.layers for name in found.adapter.names
        for attr in found.adapter.lambda_names(name)
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


def _projection_digest(found: Optional[Adapted]) -> Optional[str]:
    if found is None:
        return None
    return projection_sha256(found.adapter.vera_A, found.adapter.vera_B, checkpoint=True)


def resume_record(module: nn.Module, found: Optional[Adapted], kept: set[str]) -> dict[str, Any]:
    """Fingerprints of the frozen base and the projections of ``module`` (for the slim marker).

    ``found`` is ``module``'s adapter as the caller found it; ``kept`` is :func:`kept_state_keys` (what the
    checkpoint holds itself, e.g. frozen named adapters' λ's).
    """
    record: dict[str, Any] = {"projections": _projection_digest(found)}
    if not _sharded(module):
        record["base"] = {
            name: _fingerprint(p) for name, p in module.named_parameters(remove_duplicate=False)
            if not p.requires_grad and name not in kept
        }
    return record


def resume_problems(record: Optional[dict[str, Any]], module: nn.Module, found: Adapted) -> list[str]:
    """Why ``module`` (whose adapter is ``found``) is not the model a checkpoint with ``record`` was trained on
    (empty: it is)."""
    if not record:
        return []  # written before these records existed
    problems = []
    saved_base = record.get("base")
    if saved_base is not None and not _sharded(module):
        now = resume_record(module, found, kept_state_keys(module, found))["base"]
        differ = sorted(n for n in set(saved_base) | set(now) if saved_base.get(n) != now.get(n))
        if differ:
            problems.append(
                f"the frozen base differs from the one this checkpoint was trained on ({len(differ)} of "
                f"{len(saved_base)} frozen tensors differ, e.g. {differ[:3]}); the checkpoint holds only the adapter, "
                "so build the model exactly as for training (same from_pretrained weights; the same seed for a "
                "randomly initialised model)"
            )
    if (not found.adapter.config.save_projection and record.get("projections")
            and record["projections"] != _projection_digest(found)):
        problems.append(
            "the model's vera_A/vera_B differ from the ones this checkpoint was trained with (save_projection=False: "
            "the .ckpt does not hold them and the model's own draw from projection_prng_key is not the same); resume "
            "where it was trained, or train with save_projection=True"
        )
    return problems


def slim_checkpoint_(checkpoint: dict[str, Any], module: nn.Module, found: Optional[Adapted]) -> None:
    """Drop the frozen parameters from a Lightning checkpoint dict, in place, and mark it.

    Args:
        checkpoint: The dict Lightning passes to ``on_save_checkpoint``.
        module: The LightningModule whose state dict it holds.
        found: ``module``'s adapter as the caller found it (:func:`~vera_lightning.core.lookup.find_adapted`).

    Raises:
        ValueError: If ``module`` carries no VeRA adapter.
    """
    if found is None:
        raise ValueError(
            f"slim checkpoint requested but {type(module).__name__} carries no VeRA adapter; "
            "add VeraCallback or call apply_vera before saving"
        )
    adapter = found.adapter
    state = checkpoint["state_dict"]
    keep = kept_state_keys(module, found)
    slim: OrderedDict = OrderedDict((k, v) for k, v in state.items() if k in keep)
    metadata = OrderedDict((k, dict(v)) for k, v in getattr(state, "_metadata", OrderedDict()).items())
    marker = {"format": _FORMAT, "config": adapter.config.to_dict(), "dropped": len(state) - len(slim),
              "resume": resume_record(module, found, keep)}  # checked by _fill_frozen_base on resume
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
    found = find_adapted(module)  # the one lookup of this load
    if found is None:
        raise ValueError(
            f"this is a slim VeRA checkpoint (adapter tensors only) but {type(module).__name__} carries no VeRA "
            "adapter; add VeraCallback to the Trainer (or call apply_vera before loading) so the adapter is "
            "injected before the checkpoint is restored"
        )
    # d_initial/init_weights only set initial values, which a resumed run takes from the checkpoint
    diff = VeraConfig.from_dict(marker.get("config", {})).diff(found.adapter.config, ignore=INIT_ONLY_OPTIONS)
    if diff:
        raise ValueError(
            f"slim VeRA checkpoint was saved with a different VeraConfig (option: (checkpoint, model)) {diff}; "
            "use the config the checkpoint was trained with"
        )
    problems = resume_problems(marker.get("resume"), module, found)
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


# ---------------------------------------------------------------------- loading outside Lightning
def checkpoint_config(checkpoint: Any) -> Optional[VeraConfig]:
    """The :class:`~vera_lightning.VeraConfig` a Lightning checkpoint written with ``VeraCallback`` records.

    A slim checkpoint carries it in its marker, a full one (``slim_checkpoints=False``) in the callback's state.

    Returns:
        The config, or ``None`` if ``checkpoint`` (the loaded dict) has no state dict or records none.
    """
    if not isinstance(checkpoint, dict) or checkpoint.get("state_dict") is None:
        return None
    marker = checkpoint.get(SLIM_MARK)
    if marker is None:  # a full (not slim) checkpoint: the callback's state
        marker = next((v for k, v in (checkpoint.get("callbacks") or {}).items() if "VeraCallback" in str(k)), None)
    if not marker or "config" not in marker:
        return None
    return VeraConfig.from_dict(marker["config"])


def load_vera_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> VeraConfig:
    """Load a checkpoint written with ``VeraCallback`` into ``module``, built as for training but without VeRA.

    VeRA is applied with the config the checkpoint records, to the submodule that held the adapter, then the
    state dict loads strictly (a slim checkpoint's frozen base comes from ``module`` itself, see
    :func:`install_slim_loading`). For evaluating or serving a ``.ckpt`` outside a ``Trainer``.

    Args:
        module: The LightningModule (or model) the checkpoint was saved from, freshly built.
        checkpoint: The loaded checkpoint (``torch.load(path, weights_only=True)``).

    Returns:
        The config that was applied.

    Raises:
        ValueError: If the checkpoint records no VeRA config, or its state does not fit ``module``
            (``load_state_dict``'s problems, the first six).
    """
    config = checkpoint_config(checkpoint)
    if config is None:
        raise ValueError("not a checkpoint written with VeraCallback (no VeRA config marker)")
    state = checkpoint["state_dict"]
    key = f"{ADAPTER_ATTR}.vera_A"
    prefix = next((k[: -len(key)] for k in state if k.endswith(key)), "")
    apply_vera(module.get_submodule(prefix.rstrip(".")) if prefix else module, config)
    install_slim_loading(module)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        head, *problems = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise ValueError("\n  ".join([head, shorten(problems, 6, sep="\n  ", noun="problems")] if problems else [head])
                         ) from None
    return config
