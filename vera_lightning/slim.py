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
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from vera_lightning.adapter import find_adapter, vera_layers
from vera_lightning.config import INIT_ONLY_OPTIONS, VeraConfig
from vera_lightning.resume import resume_problems, resume_record

__all__ = ["SLIM_MARK", "slim_checkpoint_", "install_slim_loading", "kept_state_keys"]

#: Key of the marker, in ``state_dict._metadata[""]`` and at the top level of the checkpoint.
SLIM_MARK = "vera_lightning"
_FORMAT = 1


def kept_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys a slim checkpoint keeps.

    Trainable parameters, every persistent buffer, and the λ's of every named adapter (frozen while
    another one trains, but not part of the base model the loader fills in).
    """
    keys = set(module.state_dict(keep_vars=True))
    adapter = find_adapter(module)
    lambdas = set() if adapter is None else {
        id(getattr(layer, attr)) for _, layer in vera_layers(module) for name in adapter.names
        for attr in adapter.lambda_names(name)
    }
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False)
              if not p.requires_grad and id(p) not in lambdas}
    return keys - frozen


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
    keep = kept_state_keys(module)
    slim: OrderedDict = OrderedDict((k, v) for k, v in state.items() if k in keep)
    metadata = OrderedDict((k, dict(v)) for k, v in getattr(state, "_metadata", OrderedDict()).items())
    marker = {"format": _FORMAT, "config": adapter.config.to_dict(), "dropped": len(state) - len(slim),
              "resume": resume_record(module)}  # checked on resume (vera_lightning.resume)
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
    problems = resume_problems(marker.get("resume"), module, adapter.config.save_projection)
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
