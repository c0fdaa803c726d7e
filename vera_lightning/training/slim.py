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

The marker records what the checkpoint was trained on (the frozen base's fingerprints, the projections'
digest: :mod:`vera_lightning.training.resume`), checked on resume. Every checkpoint ``VeraCallback`` writes,
slim or full, also records its named adapters and the active one (:func:`mark_adapters_`); the loader checks
them first, so a checkpoint that trained adapter ``"b"`` is refused by a model where another adapter is active
or ``"b"`` is missing, with the fix (``set_adapter`` / ``add_adapter``), before anything loads.

Configs are compared with ``VeraConfig.diff``, ignoring :data:`~vera_lightning.config.INIT_ONLY_OPTIONS`
(``d_initial``, ``init_weights`` only set the λ's initial values, which a resumed run takes from the checkpoint).
Checkpoints written before a record existed are not checked against it.

Outside a ``Trainer`` (evaluation, serving), :func:`load_vera_checkpoint` applies the config a checkpoint
records (:func:`checkpoint_config`) to a freshly built module and loads it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from torch import nn
from torch.utils.hooks import RemovableHandle

from vera_lightning.config import INIT_ONLY_OPTIONS, VeraConfig
from vera_lightning.core.adapter import ADAPTER_ATTR
from vera_lightning.core.lookup import Adapted, find_adapted
from vera_lightning.core.messages import shorten
from vera_lightning.ops.inject import apply_vera
from vera_lightning.ops.named import add_adapter, set_adapter
from vera_lightning.training.resume import (
    ADAPTERS_MARK,
    adapter_problems,
    adapters_record,
    kept_state_keys,
    resume_problems,
    resume_record,
)

__all__ = ["SLIM_MARK", "slim_checkpoint_", "mark_adapters_", "install_slim_loading", "checkpoint_config",
           "load_vera_checkpoint"]

#: Key of the marker, in ``state_dict._metadata[""]`` and at the top level of the checkpoint.
SLIM_MARK = "vera_lightning"
_FORMAT = 1


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
    slim._metadata = getattr(state, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    marker = {"format": _FORMAT, "config": adapter.config.to_dict(), "dropped": len(state) - len(slim),
              "resume": resume_record(module, found, keep)}  # checked by _fill_frozen_base on resume
    checkpoint["state_dict"] = slim
    mark_adapters_(checkpoint, found)
    slim._metadata[""][SLIM_MARK] = marker  # type: ignore[attr-defined]
    checkpoint[SLIM_MARK] = marker


def mark_adapters_(checkpoint: dict[str, Any], found: Adapted) -> None:
    """Record the model's named adapters and the active one in ``checkpoint["state_dict"]``'s metadata, in place
    (:func:`~vera_lightning.training.resume.adapters_record`, checked by the loader :func:`install_slim_loading`
    installs before anything loads).

    Args:
        checkpoint: The dict Lightning passes to ``on_save_checkpoint`` (slim or full).
        found: The adapter of the module whose state dict it holds, as the caller found it.
    """
    state = checkpoint["state_dict"]
    metadata = OrderedDict((k, dict(v)) for k, v in getattr(state, "_metadata", OrderedDict()).items())
    metadata.setdefault("", {})[ADAPTERS_MARK] = adapters_record(found)
    if not isinstance(state, OrderedDict):
        state = checkpoint["state_dict"] = OrderedDict(state)
    state._metadata = metadata  # type: ignore[attr-defined]


def _fill_frozen_base(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, *args: Any
) -> None:
    marker = local_metadata.get(SLIM_MARK)
    found = find_adapted(module)  # the one lookup of this load
    if found is not None:  # which adapters: first, a config or base check of the wrong adapter would mislead
        problems = adapter_problems(local_metadata.get(ADAPTERS_MARK), state_dict, prefix, found,
                                    type(module).__name__, strict)
        if problems:
            raise ValueError("this VeRA checkpoint does not fit the model's adapters, nothing was loaded:\n  - "
                             + "\n  - ".join(problems))
    if marker is None:
        return  # a full state dict: nothing more to do, the strict load checks it as usual
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

    VeRA is applied with the config the checkpoint records, to the submodule that held the adapter (with every
    named adapter it records, the one it trained active), then the state dict loads strictly (a slim checkpoint's
    frozen base comes from ``module`` itself, see :func:`install_slim_loading`). For evaluating or serving a
    ``.ckpt`` outside a ``Trainer``.

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
    target = module.get_submodule(prefix.rstrip(".")) if prefix else module
    named = getattr(state, "_metadata", {}).get("", {}).get(ADAPTERS_MARK)
    if named:  # every adapter the checkpoint holds, the one it trained active
        configs = {name: VeraConfig.from_dict(fields) for name, fields in named["configs"].items()}
        apply_vera(target, configs[named["primary"]], adapter_name=named["primary"])
        for name, named_config in configs.items():
            if name != named["primary"]:
                add_adapter(target, name, named_config)
        set_adapter(target, named["active"])
    else:
        apply_vera(target, config)
    install_slim_loading(module)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        head, *problems = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise ValueError("\n  ".join([head, shorten(problems, 6, sep="\n  ", noun="problems")] if problems else [head])
                         ) from None
    return config
