"""Find the layers a :class:`VeraConfig` targets, swap in :class:`VeraLinear`, freeze, unload.

Target matching follows PEFT: a list of names matches a module whose full name equals
a name or ends with ``"." + name`` (then ``layers_to_transform`` filters by layer
index); a string is a regex that must match the full module name; ``"all-linear"``
takes every ``nn.Linear``/``Conv1D`` except a model's output-embedding head.
Modules listed in ``modules_to_save`` are never adapted.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional

import torch
from torch import nn

from vera_lightning.adapter import ADAPTER_ATTR, VeraAdapter, find_adapter, vera_layers
from vera_lightning.config import ALL_LINEAR, BiasMode, VeraConfig
from vera_lightning.layer import VeraLinear, is_conv1d, is_supported_layer, layer_shape
from vera_lightning.qlinear import is_quantized_weight, merge_refusal

__all__ = [
    "apply_vera",
    "unload_vera",
    "merge_vera",
    "unmerge_vera",
    "vera_layers",
    "resolve_target_names",
    "modules_to_save_of",
    "in_modules_to_save",
    "describe_candidates",
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
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


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
    heads = _output_heads(model) if all_linear else set()
    found = []
    for name, module in model.named_modules():
        if not name or not (is_supported_layer(module) or isinstance(module, VeraLinear)):
            continue
        if in_modules_to_save(name, config.modules_to_save):
            continue
        if all_linear:
            hit = id(module) not in heads
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        elif name in targets:
            hit = True
        else:
            hit = any(name.endswith("." + t) for t in targets) and _layer_index_ok(name, config)
        if hit:
            found.append(name)
    if not found:
        raise ValueError(
            f"VeraConfig.target_modules={sorted(targets) if not isinstance(targets, str) else targets!r} "
            f"(layers_to_transform={config.layers_to_transform!r}) matches no nn.Linear/Conv1D in "
            f"{type(model).__name__}. {describe_candidates(model)}"
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
    for _, module in modules_to_save_of(model, config.modules_to_save):
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
    existing = find_adapter(model)
    if existing is not None:
        changed = existing.config.diff(config)
        if changed:
            raise ValueError(
                f"{type(model).__name__} already carries VeRA with a different config (option: (model, given)) "
                f"{changed}; call vera_lightning.unload_vera(model) first to re-inject with new options"
            )
        return model  # idempotent
    if hasattr(model, ADAPTER_ATTR):
        raise ValueError(f"{type(model).__name__} already has an attribute {ADAPTER_ATTR!r}; rename it")
    names = resolve_target_names(model, config)
    _refuse_quantized_modules_to_save(model, config)
    modules = {name: model.get_submodule(name) for name in names}
    if any(isinstance(m, VeraLinear) for m in modules.values()):
        raise ValueError("model holds VeraLinear layers but no vera_projections; it was not adapted by apply_vera")
    shapes = [layer_shape(m) for m in modules.values()]
    weight = next(iter(modules.values())).weight
    adapter = VeraAdapter(config, max_in=max(s[0] for s in shapes), max_out=max(s[1] for s in shapes),
                          round_to=weight.dtype)
    if weight.device.type != "meta":
        adapter.to(weight.device)
    for name, module in modules.items():
        layer = VeraLinear(module, adapter, dropout=config.vera_dropout, d_initial=config.d_initial,
                           init_weights=config.init_weights, fan_in_fan_out=_fan_in_fan_out(name, module, config))
        _set_submodule(model, name, layer)
    setattr(model, ADAPTER_ATTR, adapter)
    mark_trainable(model, config)
    return model


def _fan_in_fan_out(name: str, layer: nn.Module, config: VeraConfig) -> bool:
    """The ``fan_in_fan_out`` to use for ``layer`` (warning when it overrides the config)."""
    conv1d = is_conv1d(layer)
    if conv1d != config.fan_in_fan_out:
        kind = "a transformers Conv1D (weight stored in x out)" if conv1d else "an nn.Linear (weight stored out x in)"
        hint = "; set fan_in_fan_out=True to silence this" if conv1d else ""
        warnings.warn(
            f"{name} is {kind}: using fan_in_fan_out={conv1d} for it (your VeraConfig is unchanged{hint})",
            UserWarning,
            stacklevel=3,
        )
    return conv1d


def _refuse_quantized_modules_to_save(model: nn.Module, config: VeraConfig) -> None:
    """``modules_to_save`` train in full: refuse one whose weights were quantized (before anything changes)."""
    bad = [name for name, module in modules_to_save_of(model, config.modules_to_save)
           if any(is_quantized_weight(p) for p in module.parameters())]
    if bad:
        raise ValueError(
            f"VeraConfig.modules_to_save={config.modules_to_save!r} trains {bad} in full, but their weights are "
            "quantized (frozen); pass them to quantize_base(..., skip=[...]) or quantize after apply_vera, "
            "which leaves modules_to_save in full precision"
        )


def _refuse_quantized_merge(layers: list[tuple[str, VeraLinear]], what: str) -> None:
    for name, layer in layers:
        if layer.base_is_quantized and not layer.merged:
            raise merge_refusal(f"{what} ({name})", layer.weight)


def merge_vera(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Fold every VeRA update into its base weight (idempotent). Returns ``model``.

    With ``safe_merge=True`` every merged weight is checked for NaN/inf before any
    layer is written, so a failure leaves the whole model unchanged.

    Raises:
        ValueError: Over a quantized base (:func:`~vera_lightning.quantize_base`), before any layer
            changes: re-rounding W0+ΔW would lose the update; ``dequantize_base`` first.
    """
    layers = list(vera_layers(model))
    _refuse_quantized_merge(layers, "merge_vera")
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
        The same ``model`` object, free of VeRA modules (its ``requires_grad`` flags are left as they were);
        quantized layers unload to :class:`~vera_lightning.qlinear.QuantizedLinear` (or their bitsandbytes layer).

    Raises:
        ValueError: ``merge=True`` over a quantized base, before anything changes (``dequantize_base`` first).
    """
    if merge:
        _refuse_quantized_merge(list(vera_layers(model)), "unload_vera(merge=True)")
    for name, layer in list(vera_layers(model)):
        _set_submodule(model, name, layer.to_base(merge=merge))
    if isinstance(getattr(model, ADAPTER_ATTR, None), VeraAdapter):
        delattr(model, ADAPTER_ATTR)
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
