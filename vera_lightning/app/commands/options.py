"""The keys each command accepts, group by group: an unknown key anywhere is refused before any work.

Hydra checks the typed groups (``model``, ``data``, ``vera``, ``generate``) against their schemas when it composes,
but lets keys added with ``+group.key=value`` past them, and the other nodes (the run's own options, ``optim``,
``trainer``) have no schema of Hydra's. Nothing would read such a key, so a misspelt option (``+data.max_lenght=5``,
``+optim.momentum=0.9``, ``+generate.foo=1``, ``+trainer.max_step=5``, ``+overwrit=true``) would be ignored without a
word. :func:`check_keys` names each one, where it is, and what the group holds.

:data:`RUN_OPTIONS` is the schema of each command's own options (the top level of ``conf/<command>.yaml``);
:func:`command_options` returns them as one typed dict for the plan.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vera_lightning import VeraConfig
from vera_lightning.app.data.schema import DataSchema
from vera_lightning.app.generation.generate import GenerateSettings
from vera_lightning.app.models.schema import ModelSchema

__all__ = ["RUN_OPTIONS", "OPTIM_KEYS", "RECIPE_TABLES", "check_keys", "command_options"]

#: Nodes every command composes (groups and the objective's keys).
_COMMON = ("data", "model", "vera", "trainer", "callbacks", "logger", "paths", "generate", "optimized_metric",
           "monitor_mode", "seed", "optim", "dpo")
#: Each command's own options: ``{key: (type, default)}``; a key not listed here or in :data:`_COMMON` is refused.
RUN_OPTIONS: dict[str, dict[str, tuple[type, Any]]] = {
    "train": {"finetune": (str, "vera"), "eval_before": (bool, True), "ckpt_path": (str, None),
              "overwrite": (bool, False), "export": (str, None), "adapter": (str, None)},
    "eval": {"adapter": (str, None)},
    "predict": {"adapter": (str, None), "input": (str, None), "output": (str, None), "overwrite": (bool, False),
                "batch_size": (int, 32), "progress": (bool, True)},
}
#: ``optim`` keys (AdamW with linear warm-up and decay, :mod:`vera_lightning.app.tasks.module`).
OPTIM_KEYS = ("lr", "head_lr", "weight_decay", "warmup_ratio")
#: ``paths`` keys (``conf/paths/default.yaml``).
PATH_KEYS = ("output_dir",)
#: Top-level tables an experiment config defines for its own interpolations (``experiment=glue_minilm``'s ``glue``).
RECIPE_TABLES = ("glue",)


def _trainer_keys() -> set[str]:
    from lightning.pytorch import Trainer

    return set(inspect.signature(Trainer.__init__).parameters) - {"self"} | {"_target_"}


def _unknown(group: str, keys: Any, known: Any, where: str, reference: str = "") -> list[str]:
    """One problem naming every unknown key of ``group``, a close known name for each, and the known names."""
    known = sorted(str(k) for k in known)
    unknown = sorted(str(k) for k in keys if k not in known)
    if not unknown:
        return []
    names = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        names.append((f"{group}.{key}" if group else key) + (f" (did you mean {close[0]}?)" if close else ""))
    listed = reference or ", ".join(known)
    return [f"{', '.join(names)}: not a {where}, so it would be ignored (a typo?). Remove it; {where}s are {listed}"]


def _keys(cfg: DictConfig, key: str) -> list[str]:
    node = cfg.get(key)
    return list(node.keys()) if OmegaConf.is_dict(node) else []


def check_keys(cfg: DictConfig, command: str) -> list[str]:
    """Every unknown key of ``cfg`` for ``command`` (``train``, ``eval``, ``predict``), as one problem per group."""
    problems: list[str] = []
    top = set(_COMMON) | set(RUN_OPTIONS[command]) | set(RECIPE_TABLES)
    problems += _unknown("", cfg.keys(), top, f"{command}.py option")
    problems += _unknown("model", _keys(cfg, "model"), [f.name for f in fields(ModelSchema)], "model setting")
    problems += _unknown("data", _keys(cfg, "data"), [f.name for f in fields(DataSchema)], "data setting",
                         "the keys of conf/data/*.yaml (DataSchema)")
    problems += _unknown("generate", _keys(cfg, "generate"), [f.name for f in fields(GenerateSettings)],
                         "generate setting")
    problems += _unknown("optim", _keys(cfg, "optim"), OPTIM_KEYS, "optim setting")
    problems += _unknown("vera", _keys(cfg, "vera"), [f.name for f in fields(VeraConfig)], "vera setting")
    problems += _unknown("paths", _keys(cfg, "paths"), PATH_KEYS, "paths setting")
    for group in ("callbacks", "logger"):
        node = cfg.get(group)
        for key in _keys(cfg, group):
            value = node.get(key)
            if value is not None and not (OmegaConf.is_dict(value) and "_target_" in value):
                shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
                problems.append(f"{group}.{key}={shown!r}: each {group} entry is a class to instantiate "
                                f"({{_target_: ..., ...}}) or null; remove it, or pick a {group} group "
                                f"(conf/{group}/*.yaml)")
    problems += _unknown("trainer", _keys(cfg, "trainer"), _trainer_keys(), "Lightning Trainer argument",
                         "those of lightning.pytorch.Trainer (max_steps, max_epochs, devices, precision, ...)")
    return problems


def command_options(cfg: DictConfig, command: str) -> dict[str, Any]:
    """The command's own options, each checked against its type.

    Raises:
        ValueError: Naming every option of the wrong type (``overwrite=no``: true or false only).
    """
    out: dict[str, Any] = {}
    problems = []
    for key, (kind, default) in RUN_OPTIONS[command].items():
        value = cfg.get(key, default)
        if value is None:
            out[key] = None
            continue
        if kind is bool and not isinstance(value, bool):
            problems.append(f"{key}={value!r}: must be true or false")
            continue
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{key}={value!r}: must be a positive integer")
            continue
        out[key] = str(value) if kind is str else value
    if problems:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return out
