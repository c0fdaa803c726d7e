"""One place that turns a composed config into what every entry point runs.

``scripts/train.py``, ``scripts/eval.py`` and ``scripts/predict.py`` all call
:func:`build_components`: seed, tokenizer, Hugging Face model, DataModule and
LightningModule are built here, in this order, so a base model drawn from ``seed`` (a
``from_config`` model such as ``model=tiny_opt``) is the same in training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import hydra
import lightning.pytorch as pl
from omegaconf import OmegaConf
from torch import nn

from vera_lightning import VeraConfig
from vera_lightning.app.data.datamodules import TextDataModule, build_datamodule
from vera_lightning.app.data.packing import check_packing
from vera_lightning.app.data.preference_module import PreferenceDataModule
from vera_lightning.app.data.sft import check_max_length, position_limit
from vera_lightning.app.models.load import build_model, build_tokenizer, resolve_path
from vera_lightning.app.runs.plan import RunPlan
from vera_lightning.app.tasks.dpo import DpoModule
from vera_lightning.app.tasks.module import VeraTaskModule, build_module

__all__ = [
    "Components", "vera_config_from", "check_task", "check_head_trains", "instantiate_dict",
    "base_model_id", "build_components", "make_datamodule",
]


def vera_config_from(vera: Mapping[str, Any]) -> VeraConfig:
    """The :class:`VeraConfig` of ``vera`` settings (a plan's, or a composed config's ``vera`` node).

    Keys added with ``+vera.<key>=...`` get past Hydra's schema check, so unknown keys are
    rejected here too.

    Raises:
        ValueError: Naming unknown keys, or with :class:`VeraConfig`'s message listing every
            invalid option.
    """
    values = OmegaConf.to_container(vera, resolve=True) if OmegaConf.is_config(vera) else dict(vera or {})
    return VeraConfig.from_dict(values, source="vera", warn=True)


def check_task(model: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """The task (``classification`` or ``causal_lm``) the model and data configs agree on.

    Raises:
        ValueError: If they name different tasks (the message lists both ways to fix it).
    """
    model_task, data_task = model.get("task"), data.get("task")
    if model_task != data_task:
        raise ValueError(
            f"model={model.get('name')} is a {model_task} model but data={data.get('name')} is a {data_task} task. "
            + (
                "Pick classification data (data=demo_sentiment, data=sst2 data.data_dir=DIR, data=table) "
                if model_task == "classification"
                else "Pick text data (data=demo_text, or data.format=text with data.data_dir=DIR) "
            )
            + "or a model for that task (classification: minilm, roberta_base; causal_lm: tiny_opt, opt125m, "
            "gpt2, llama)."
        )
    return model_task


def check_head_trains(task: str, model: Any, vera_config: VeraConfig, method: str = "vera") -> None:
    """A classification head is freshly initialised: refuse to leave it frozen.

    Raises:
        ValueError: Naming ``model.modules_to_save`` and the head to put there.
    """
    if task != "classification" or vera_config.modules_to_save or method == "full":
        return
    heads = [name for name in ("classifier", "score") if hasattr(model, name)] or ["classifier"]
    raise ValueError(
        f"vera.modules_to_save={vera_config.modules_to_save!r}: {type(model).__name__} gets a freshly initialised "
        f"classification head, which would stay random and frozen. Train it with the λ's: "
        f"model.modules_to_save=[{heads[0]}]"
    )


def check_monitored(metric_name: str, logged: list[str]) -> None:
    """Refuse, before any work, to monitor a metric the run never logs."""
    if metric_name not in logged:
        raise ValueError(
            f"optimized_metric={metric_name!r} is not logged by this task (it logs {logged}); set optimized_metric "
            "to one of them (and monitor_mode=max|min), or `monitor:`/`monitor_mode:` in the data group"
        )


def instantiate_dict(specs: Any) -> list[Any]:
    """Instantiate every spec (``_target_`` dicts) of a plan's ``callbacks`` / ``loggers``, in order."""
    if not specs:
        return []
    values = specs.values() if isinstance(specs, Mapping) else specs
    return [hydra.utils.instantiate(value) for value in values if value is not None]


def base_model_id(model_cfg: Mapping[str, Any]) -> str:
    """What a saved adapter records as ``base_model_name_or_path`` for this ``model`` config.

    The resolved path (``pkg://...`` turned into the package directory) or the hub id; a
    randomly initialised ``from_config`` model records its config name (e.g. ``tiny_opt``).
    """
    name = model_cfg.get("name_or_path")
    return resolve_path(name) if name else str(model_cfg.get("name"))


def make_datamodule(data_cfg: Mapping[str, Any], tokenizer: Any) -> Any:
    """The DataModule of ``data_cfg``: preference pairs (``format: preference``) or any other format's."""
    if data_cfg.get("format") == "preference":
        return PreferenceDataModule(data_cfg, tokenizer)
    return build_datamodule(data_cfg, tokenizer)


@dataclass
class Components:
    """What :func:`build_components` returns."""

    task: str
    tokenizer: Any
    model: nn.Module
    datamodule: TextDataModule
    module: VeraTaskModule


def build_components(plan: RunPlan, model_cfg: Optional[Mapping[str, Any]] = None, *, tokenizer: Any = None,
                     datamodule: Optional[TextDataModule] = None) -> Components:
    """Seed, then build tokenizer, model, DataModule and LightningModule from ``plan``.

    The DataModule reads nothing yet (each stage reads the splits it needs), so this works
    for data folders without a training file. The model is cast to the plan's resolved precision
    (``plan.model['compute_dtype']``): nothing is decided here.

    Args:
        plan: The command's :class:`~vera_lightning.app.runs.plan.RunPlan`.
        model_cfg: Replaces ``plan.model`` (e.g. a merged export directory as ``name_or_path``).
        tokenizer: The tokenizer already built for ``model_cfg`` (by the preflight), else built here.
        datamodule: The DataModule already built (and set up) with ``tokenizer``, else built here.

    Raises:
        ValueError: If the model and data tasks differ, or the model config is incomplete.
        ModelUnavailableError: If the model or tokenizer cannot be loaded.
    """
    task = check_task(plan.model, plan.data)
    model_cfg = model_cfg if model_cfg is not None else plan.model
    data_cfg = plan.data
    num_labels, problem_type = data_cfg.get("num_labels"), data_cfg.get("problem_type")
    pl.seed_everything(plan.seed, workers=True, verbose=False)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(model_cfg)
    if datamodule is None:
        datamodule = make_datamodule(data_cfg, tokenizer)  # checks the folder and the columns first
    model = build_model(model_cfg, tokenizer, num_labels=num_labels, problem_type=problem_type,
                        compute_dtype=plan.base_dtype)
    check_max_length(data_cfg, position_limit(model, tokenizer))  # before any training or generation
    if data_cfg.get("packing"):
        check_packing(model)
    if plan.dpo is not None:  # objective=dpo: preference pairs, the reference resolved by the plan
        optim = {k: float(v) for k, v in (plan.optim or {}).items() if k in ("lr", "head_lr", "weight_decay",
                                                                             "warmup_ratio")}
        settings = {k: v for k, v in plan.dpo.items() if k != "reference_adapter"}
        module: VeraTaskModule = DpoModule(model, settings, reference_adapter=plan.dpo.get("reference_adapter"),
                                           **optim)
    else:
        module = build_module(task, model, plan.optim or {}, num_labels=num_labels,
                              metrics=data_cfg.get("metrics"), problem_type=problem_type,
                              generate=plan.generate if data_cfg.get("format") == "sft" else None)
    return Components(task=task, tokenizer=tokenizer, model=model, datamodule=datamodule, module=module)
