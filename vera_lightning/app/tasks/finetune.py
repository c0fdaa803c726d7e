"""What a training run trains (``finetune=``): VeRA, or one of the two baselines it is measured against.

* ``vera`` (default): :class:`~vera_lightning.VeraCallback` injects VeRA in ``setup`` and freezes the
  base; the λ vectors train at ``optim.lr``, ``modules_to_save`` (the fresh head) at ``optim.head_lr``.
* ``head``: no adapter; only ``modules_to_save`` trains (at ``optim.head_lr``): the floor.
* ``full``: no adapter; every weight trains (at ``optim.head_lr``, there being no λ's): the ceiling.

The baselines exist so a benchmark (``benchmarks/bench_glue.py``) runs every method through the same
``train(cfg)`` (same data, schedule, seeds and metrics) rather than a copy of it.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from safetensors.torch import save_file
from torch import nn

from vera_lightning import VeraCallback, VeraConfig, adapter_root, mark_trainable, save_adapter

__all__ = ["METHODS", "check_method", "prepare", "save_trained"]

METHODS = ("vera", "head", "full")


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`METHODS`.

    Raises:
        ValueError: Naming the option, the value and the choices.
    """
    if method not in METHODS:
        raise ValueError(
            f"finetune={method!r}: must be one of {list(METHODS)} (vera: the adapter; head: only "
            "vera.modules_to_save trains; full: every weight trains)"
        )
    return method


def prepare(method: str, model: nn.Module, vera_config: VeraConfig) -> list[pl.Callback]:
    """Set which parameters of ``model`` train for ``method``; returns the callbacks it needs.

    ``head`` freezes the model except ``vera_config.modules_to_save`` (matched as injection matches
    them); ``full`` leaves every parameter trainable; ``vera`` returns the :class:`VeraCallback`.
    """
    check_method(method)
    if method == "vera":
        return [VeraCallback(vera_config)]
    if method == "head":
        mark_trainable(model, vera_config)  # no VeRA layers: freezes all but modules_to_save (and biases asked for)
    else:
        model.requires_grad_(True)
    return []


def save_trained(method: str, module: pl.LightningModule, directory: Path, base_model_name_or_path: str) -> None:
    """Write what ``method`` trained into ``directory``.

    ``vera``: the adapter in PEFT's layout; ``head``/``full``: the trained tensors (by parameter name)
    in ``model.safetensors``.
    """
    if method == "vera":
        save_adapter(adapter_root(module), directory, base_model_name_or_path=base_model_name_or_path)
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in module.model.named_parameters() if p.requires_grad}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"finetune": method,
                                                                       "base_model": base_model_name_or_path})
