"""Find the layers a :class:`VeraConfig` targets, swap in :class:`VeraLinear`, freeze, unload.

Target matching follows PEFT: a list of names matches a module whose full name equals
a name or ends with ``"." + name`` (then ``layers_to_transform`` filters by layer
index); a string is a regex that must match the full module name; ``"all-linear"``
takes every ``nn.Linear``/``Conv1D`` except a model's output-embedding head.
Modules listed in ``modules_to_save`` are never adapted.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

from vera_lightning.config import ALL_LINEAR, BiasMode, VeraConfig
from vera_lightning.layer import VeraLinear, _warn_fan_in_fan_out, is_supported_layer
from vera_lightning.projection import PROJECTIONS_ATTR, VeraProjections
from vera_lightning.states import check_matches, check_not_nested, check_projection_memory, check_untied

__all__ = [
    "apply_vera",
    "unload_vera",
    "merge_vera",
    "unmerge_vera",
    "vera_layers",
    "get_vera_config",
    "resolve_target_names",
    "mark_trainable",
    "count_parameters",
    "DEFAULT_TARGET_MODULES",
]

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


def vera_layers(model: nn.Module) -> Iterator[tuple[str, VeraLinear]]:
    """Yield ``(name, layer)`` for every :class:`VeraLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, VeraLinear):
            yield name, module


def get_vera_config(model: nn.Module) -> Optional[VeraConfig]:
    """The config ``model`` was adapted with, or ``None`` if it carries no VeRA."""
    projections = getattr(model, PROJECTIONS_ATTR, None)
    return getattr(projections, "config", None)


def _hf_model_types(model: nn.Module) -> list[str]:
    types = []
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str) and model_type not in types:
            types.append(model_type)
    return types


def _output_heads(model: nn.Module) -> set[int]:
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


def _in_modules_to_save(name: str, modules_to_save: Optional[list[str]]) -> bool:
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


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
        f"e.g. target_modules=['q_proj', 'v_proj'], a regex, or 'all-linear'. {_candidates_hint(model)}"
    )


def _candidates_hint(model: nn.Module) -> str:
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
    heads = _output_heads(model) if all_linear else set()
    found, unsupported, suffix_hits = [], [], []
    for name, module in model.named_modules():
        if not name or _in_modules_to_save(name, config.modules_to_save):
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
    requested = None if layers is None or isinstance(targets, str) else ([layers] if isinstance(layers, int) else layers)
    found = check_matches(model, found, unsupported, all_linear, requested or None,
                          lambda n: _layer_index(n, config), suffix_hits)
    if not found:
        raise ValueError(
            f"VeraConfig.target_modules={sorted(targets) if not isinstance(targets, str) else targets!r} "
            f"(layers_to_transform={config.layers_to_transform!r}) matches no nn.Linear/Conv1D in "
            f"{type(model).__name__}. {_candidates_hint(model)}"
        )
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def mark_trainable(model: nn.Module, config: VeraConfig) -> None:
    """Freeze everything except the λ's, the biases ``config.bias`` selects and ``modules_to_save``."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in vera_layers(model):
        for param in layer.adapter_params().values():
            param.requires_grad_(True)
        if config.bias == BiasMode.vera_only and layer.bias is not None:
            layer.bias.requires_grad_(True)
    if config.bias == BiasMode.all:
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad_(True)
    if config.modules_to_save:
        for name, module in model.named_modules():
            if name and any(name == m or name.endswith("." + m) for m in config.modules_to_save):
                module.requires_grad_(True)


def apply_vera(model: nn.Module, config: VeraConfig) -> nn.Module:
    """Adapt ``model`` in place with VeRA and freeze all but the adapter.

    The shared projections are drawn once, sized to the largest targeted layer, and
    attached as ``model.vera_projections``. Base state-dict keys are unchanged. Calling
    it again with an equal config is a no-op; ``config`` itself is never modified.

    Args:
        model: Any ``nn.Module`` holding ``nn.Linear``/``Conv1D`` layers.
        config: The adapter options.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: If no layer matches (listing the candidates), or if ``model`` already
            carries VeRA with a different config.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net = apply_vera(net, VeraConfig(r=16, target_modules=["0", "2"]))
        >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # (8 + 16) + (2 + 16)
        42
    """
    if not isinstance(config, VeraConfig):
        raise TypeError(f"apply_vera expects a VeraConfig, got {type(config).__name__}")
    existing = get_vera_config(model)
    if existing is not None:
        if existing.to_dict() != config.to_dict():
            changed = {k: v for k, v in config.to_dict().items() if existing.to_dict()[k] != v}
            raise ValueError(
                f"{type(model).__name__} already carries VeRA with a different config (differs in {changed}); "
                "call vera_lightning.unload_vera(model) first to re-inject with new options"
            )
        return model  # idempotent
    if hasattr(model, PROJECTIONS_ATTR):
        raise ValueError(f"{type(model).__name__} already has an attribute {PROJECTIONS_ATTR!r}; rename it")
    check_not_nested(model, (VeraLinear, VeraProjections))
    names = resolve_target_names(model, config)
    modules = {name: model.get_submodule(name) for name in names}
    if any(isinstance(m, VeraLinear) for m in modules.values()):
        raise ValueError("model holds VeraLinear layers but no vera_projections; it was not adapted by apply_vera")
    shapes = [_in_out(m) for m in modules.values()]
    max_in, max_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    check_projection_memory(config.r, max_in, max_out)
    try:
        projections = VeraProjections(config.r, max_in, max_out, config.projection_prng_key, config.save_projection)
    except RuntimeError as err:  # the allocator refused
        check_projection_memory(config.r, max_in, max_out, error=err)
        raise
    weight = next(iter(modules.values())).weight
    if weight.dtype in (torch.float16, torch.bfloat16):
        # PEFT moves the projections to the base dtype and then upcasts the adapter to float32,
        # so in a half-precision model they hold half-rounded values; do the same, bit for bit.
        projections.round_dtype = weight.dtype
        with torch.no_grad():
            for buf in (projections.vera_A, projections.vera_B):
                buf.copy_(buf.to(weight.dtype))
    projections.to(weight.device)  # on meta too: to_empty re-draws them (VeraProjections._apply)
    projections.train(model.training)
    projections.config = copy.deepcopy(config)
    for name, module in modules.items():
        fan_in_fan_out = _warn_fan_in_fan_out(name, module, config)
        layer = VeraLinear(module, projections, config, fan_in_fan_out=fan_in_fan_out)
        layer.train(module.training)  # the mode of the module it replaces (eval stays eval)
        _set_submodule(model, name, layer)
    setattr(model, PROJECTIONS_ATTR, projections)
    mark_trainable(model, config)
    return model


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
    return in_features, out_features


def merge_vera(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Fold every VeRA update into its base weight (idempotent). Returns ``model``.

    With ``safe_merge=True`` every merged weight is checked for NaN/inf before any
    layer is written, so a failure leaves the whole model unchanged.
    """
    layers = list(vera_layers(model))
    check_untied(model, layers, "merge_vera")
    if safe_merge:
        with torch.no_grad():
            for name, layer in layers:
                if not layer.merged and not torch.isfinite(layer.weight + layer.delta_weight()).all():
                    raise ValueError(
                        f"safe_merge refused: merging {name} gives non-finite weights (NaN/inf in its λ's or "
                        "base weight); no layer was changed. Inspect its vera_lambda_b/vera_lambda_d."
                    )
    for _, layer in layers:
        layer.merge()
    return model


def unmerge_vera(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_vera` on every layer (idempotent). Returns ``model``."""
    for _, layer in vera_layers(model):
        layer.unmerge()
    return model


def unload_vera(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every VeraLinear by a plain ``nn.Linear``/``Conv1D`` and drop the projections.

    Args:
        model: An adapted model.
        merge: Keep the adaptation by folding it into the weights (``True``), or return
            the original base weights (``False``).

    Returns:
        The same ``model`` object, free of VeRA modules (its ``requires_grad`` flags are left as they were).
    """
    layers = list(vera_layers(model))
    if merge:
        check_untied(model, layers, "unload_vera(merge=True)")
    for name, layer in layers:
        _set_submodule(model, name, layer.to_base(merge=merge))
    if isinstance(getattr(model, PROJECTIONS_ATTR, None), VeraProjections):
        delattr(model, PROJECTIONS_ATTR)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
