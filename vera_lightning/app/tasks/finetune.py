"""What a training run trains (``finetune=``): VeRA, or one of the two baselines it is measured against.

* ``vera`` (default): :class:`~vera_lightning.VeraCallback` injects VeRA in ``setup`` and freezes the
  base; the λ vectors train at ``optim.lr``, ``modules_to_save`` (the fresh head) at ``optim.head_lr``.
* ``head``: no adapter; only ``modules_to_save`` trains (at ``optim.head_lr``): the floor.
* ``full``: no adapter; every weight trains (at ``optim.head_lr``, there being no λ's): the ceiling.

The baselines exist so a benchmark (``benchmarks/bench_glue.py``) runs every method through the same
``train(cfg)`` (same data, schedule, seeds and metrics) rather than a copy of it.

Whatever trains is float32, whatever the base's dtype (``docs/llm.md``, *Precision*): over a bf16 base
(the ``bf16-base`` scheme) the λ's are float32 by construction, and ``modules_to_save`` and trained biases become
float32 masters used in bf16 (:mod:`~vera_lightning.app.models.trained_float32`), for ``vera`` in
:class:`TrainedInFloat32`'s ``setup`` (after VeRA is injected, before the optimizer, the strategy's wrapping and a
checkpoint's restore) and for ``head`` here. ``full`` trains every weight, so its model is float32 throughout
(where bf16 is chosen, ``decide_precision(..., finetune="full")`` gives Lightning's ``bf16-mixed`` autocast
instead of a bf16 base); a model that arrives in bf16 is cast back, with a warning that its weights were rounded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from torch import nn

from vera_lightning import (
    VeraCallback,
    VeraConfig,
    adapter_root,
    apply_vera,
    load_adapter,
    mark_trainable,
    save_adapter,
    write_safetensors,
)
from vera_lightning.app.models.trained_float32 import drop_float32_masters, keep_trained_float32

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

__all__ = ["METHODS", "PRECISION_META", "TrainedInFloat32", "check_method", "prepare", "save_trained"]

#: The safetensors header entry of a saved adapter that records the precision it was trained in (JSON).
PRECISION_META = "vera_lightning.precision"

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


class TrainedInFloat32(pl.Callback):
    """In ``setup``, after :class:`VeraCallback`'s: every trained tensor but the λ's a float32 master over a half base.

    A no-op over a float32 base, and idempotent (``setup`` runs per stage).
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        keep_trained_float32(pl_module)


def prepare(method: str, model: nn.Module, vera_config: VeraConfig,
            start_from: Optional[str] = None) -> list[pl.Callback]:
    """Set which parameters of ``model`` train for ``method``, in float32; returns the callbacks it needs.

    ``head`` freezes the model except ``vera_config.modules_to_save`` (matched as injection matches
    them), float32 masters over a bf16 base; ``full`` leaves every parameter trainable, in float32;
    ``vera`` returns the :class:`VeraCallback` and :class:`TrainedInFloat32`, in that order. With ``start_from``
    (``train.py adapter=``, an adapter directory) VeRA is applied to ``model`` now and the adapter's λ's loaded into
    it, so training starts from them (the callback then adopts the adapted model; a resumed run's checkpoint
    replaces the λ's after), and named adapters (a DPO reference) can be added to ``model`` itself.
    """
    check_method(method)
    if method == "vera":
        if start_from:
            apply_vera(model, vera_config)
            load_adapter(model, start_from)
        return [VeraCallback(vera_config), TrainedInFloat32()]
    if method == "head":
        mark_trainable(model, vera_config)  # no VeRA layers: freezes all but modules_to_save (and biases asked for)
        keep_trained_float32(model)
        return []
    half = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32), None)
    if half is not None:
        warnings.warn(f"finetune=full trains every weight in float32, but the model arrived in {half} (its weights "
                      "are rounded through it): build it with the dtype decide_precision(..., finetune='full') "
                      "decides (bf16 comes as trainer.precision=bf16-mixed)", UserWarning, stacklevel=2)
        model.float()
    drop_float32_masters(model)
    model.requires_grad_(True)
    return []


def save_trained(method: str, module: pl.LightningModule, directory: Path, base_model_name_or_path: str,
                 precision: Optional[dict] = None) -> None:
    """Write what ``method`` trained into ``directory``.

    ``vera``: the adapter in PEFT's layout; ``head``/``full``: the trained tensors (by parameter name)
    in ``model.safetensors``. ``precision`` (the run plan's decision) is recorded in the file's header as
    ``vera_lightning.precision`` (JSON), so the adapter says what it was trained in even away from its run.
    """
    extra = {PRECISION_META: json.dumps(precision, sort_keys=True)} if precision else {}
    if method == "vera":
        save_adapter(adapter_root(module), directory, base_model_name_or_path=base_model_name_or_path, metadata=extra)
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in module.model.named_parameters() if p.requires_grad}
    write_safetensors(tensors, str(directory / "model.safetensors"),
                      metadata={"finetune": method, "base_model": base_model_name_or_path, **extra})
