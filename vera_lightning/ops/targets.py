"""Which layers a :class:`VeraConfig` targets: PEFT's matching rules, and the one ``modules_to_save`` rule.

A list of names matches a module whose full name equals a name or ends with ``"." + name`` (then
``layers_to_transform`` filters by layer index); a string is a regex that must match the full module
name; ``"all-linear"`` takes every ``nn.Linear``/``Conv1D`` except a model's output-embedding head;
``None`` uses the known default of the Hugging Face model type. Modules listed in ``modules_to_save``
are never adapted. Targets VeRA cannot honour (non-linear layers, ``nn.MultiheadAttention.out_proj``,
absent layer indices) are refused by :func:`vera_lightning.core.refusals.check_matches`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Optional

from torch import nn

from vera_lightning.config import ALL_LINEAR, VeraConfig
from vera_lightning.core.layer import VeraLinear, is_supported_layer

__all__ = ["DEFAULT_TARGET_MODULES", "resolve_target_names", "modules_to_save_of", "in_modules_to_save",
           "describe_candidates", "output_heads"]

#: Default targets per Hugging Face ``model_type`` when ``target_modules`` is None (PEFT's choices).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}


def _hf_model_types(model: nn.Module) -> list[str]:
    types = []
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str) and model_type not in types:
            types.append(model_type)
    return types


def output_heads(model: nn.Module) -> set[int]:
    """``id`` of every output head (``get_output_embeddings()`` of a ``transformers`` model) in ``model``."""
    heads = set()
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter) and hasattr(module, "config"):
            try:
                head = getter()
            except (AttributeError, NotImplementedError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
    return heads


def _names_module(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith("." + wanted)


def in_modules_to_save(name: str, modules_to_save: Optional[list[str]]) -> bool:
    """Whether the module called ``name`` is, or sits inside, a module listed in ``modules_to_save``.

    The one rule (PEFT's): an entry names a module whose full name equals it or ends with ``"." + entry``.
    """
    if not modules_to_save or not name:
        return False
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return any(_names_module(prefix, m) for prefix in prefixes for m in modules_to_save)


def modules_to_save_of(model: nn.Module, modules_to_save: Optional[list[str]]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the outermost modules ``modules_to_save`` names, in module order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and any(_names_module(name, m) for m in modules_to_save or ()):
            if not any(name.startswith(f + ".") for f, _ in found):
                found.append((name, module))
    return found


def _layer_index_ok(name: str, config: VeraConfig) -> bool:
    indexes = config.layers_to_transform
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    index = _layer_index(name, config)
    if index is None:
        return False
    return index == indexes if isinstance(indexes, int) else index in indexes


def _layer_index(name: str, config: VeraConfig) -> Optional[int]:
    """The layer index in ``name`` (PEFT's rule: the number after ``layers_pattern`` or the second name part)."""
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return None if match is None else int(match.group("idx"))


def _effective_targets(model: nn.Module, config: VeraConfig):
    targets = config.target_modules
    if targets is not None:
        return targets
    for model_type in _hf_model_types(model):
        if model_type in DEFAULT_TARGET_MODULES:
            return frozenset(DEFAULT_TARGET_MODULES[model_type])
    raise ValueError(
        "VeraConfig.target_modules=None and no default is known for this model "
        f"(Hugging Face model types found: {_hf_model_types(model) or 'none'}). Name the layers to adapt, "
        f"e.g. target_modules=['q_proj', 'v_proj'], a regex, or 'all-linear'. {describe_candidates(model)}"
    )


def describe_candidates(model: nn.Module) -> str:
    """A sentence listing the layer names VeRA could adapt in ``model`` (for error messages)."""
    names = [n for n, m in model.named_modules() if is_supported_layer(m) or isinstance(m, VeraLinear)]
    if not names:
        return "The model has no nn.Linear or Conv1D layer at all."
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    examples = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"Candidate layer names: {short} (full names: {examples})."


def resolve_target_names(model: nn.Module, config: VeraConfig) -> list[str]:
    """Names of the modules ``config`` adapts in ``model``, in module order.

    Raises:
        ValueError: If nothing matches (the message lists the candidate layer names).
    """
    targets = _effective_targets(model, config)
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    heads = output_heads(model) if all_linear else set()
    found, unsupported, suffix_hits = [], [], []
    for name, module in model.named_modules():
        if not name or in_modules_to_save(name, config.modules_to_save):
            continue
        supported = is_supported_layer(module) or isinstance(module, VeraLinear)
        if all_linear:
            hit = supported and id(module) not in heads
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        elif name in targets:
            hit = True
        else:
            hit = any(name.endswith("." + t) for t in targets)
            suffix_hits += [name] if hit else []
            hit = hit and _layer_index_ok(name, config)
        if hit:
            (found if supported else unsupported).append(name)
    layers = config.layers_to_transform
    requested = (None if layers is None or isinstance(targets, str)
                 else ([layers] if isinstance(layers, int) else layers))
    found = check_matches(model, found, unsupported, all_linear, requested or None,
                          lambda n: _layer_index(n, config), suffix_hits)
    if not found:
        raise ValueError(
            f"VeraConfig.target_modules={sorted(targets) if not isinstance(targets, str) else targets!r} "
            f"(layers_to_transform={config.layers_to_transform!r}) matches no nn.Linear/Conv1D in "
            f"{type(model).__name__}. {describe_candidates(model)}"
        )
    return found


def check_matches(
    model: nn.Module,
    found: list[str],
    unsupported: list[str],
    all_linear: bool,
    requested_layers: Optional[list[int]],
    layer_index: Callable[[str], Optional[int]],
    candidates: Iterable[str],
) -> list[str]:
    """Validate the modules ``target_modules`` matched; returns the names to adapt.

    Args:
        model: The model being adapted.
        found: Matched ``nn.Linear``/``Conv1D`` (or ``VeraLinear``) names.
        unsupported: Matched names of other module types.
        all_linear: ``target_modules="all-linear"`` (MHA ``out_proj`` is skipped there, refused otherwise).
        requested_layers: ``layers_to_transform`` as a list, or ``None``.
        layer_index: The layer index of a module name (``None`` if it has none).
        candidates: Names that match ``target_modules`` before the ``layers_to_transform`` filter.

    Raises:
        ValueError: Listing every matched module VeRA cannot honour, or requested layers that do not exist.
    """
    problems = []
    if unsupported:
        kinds = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in unsupported[:6]]
        problems.append(
            f"target_modules matches {kinds}, which VeRA cannot adapt (it adapts nn.Linear and transformers' "
            "Conv1D); name only linear layers, e.g. their full names or a narrower regex"
        )
    mha_out = []
    for name in found:
        parent_name, _, child = name.rpartition(".")
        if child == "out_proj" and isinstance(model.get_submodule(parent_name), nn.MultiheadAttention):
            mha_out.append(name)
    if mha_out and not all_linear:
        problems.append(
            f"target_modules matches {mha_out}, the out_proj of nn.MultiheadAttention: MHA reads its weight "
            "directly and never calls it, so an adapter there would do nothing; remove it from target_modules"
        )
    if requested_layers is not None:
        present = {i for i in (layer_index(n) for n in candidates) if i is not None}
        absent = sorted(set(requested_layers) - present)
        if absent:
            problems.append(
                f"layers_to_transform={requested_layers}: the model has no layer {absent} among the targeted modules "
                f"(it has layers {sorted(present) or 'none'}); use indices that exist"
            )
    if problems:
        raise ValueError("Invalid VeraConfig for this model:\n  - " + "\n  - ".join(problems))
    return [n for n in found if n not in mha_out]
