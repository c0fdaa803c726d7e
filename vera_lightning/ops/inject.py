"""Swap :class:`VeraLinear` into the layers a :class:`VeraConfig` targets, freeze, choose the autograd path.

Which layers are targeted is decided by :mod:`vera_lightning.ops.targets` (PEFT's matching rules); folding
the update into the base and removing it again is :mod:`vera_lightning.ops.merge`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Optional

from torch import nn

from vera_lightning.config import BiasMode, VeraConfig
from vera_lightning.core.adapter import (
    ADAPTER_ATTR,
    DEFAULT_ADAPTER,
    VeraAdapter,
    check_adapter_name,
)
from vera_lightning.core.layer import VeraLinear, is_conv1d, layer_shape
from vera_lightning.core.lookup import locate_adapter, vera_layers
from vera_lightning.core.qtensor import is_quantized_weight
from vera_lightning.core.refusals import check_projection_memory, shared_parameters
from vera_lightning.forward import cost
from vera_lightning.forward.dispatch import PATHS
from vera_lightning.forward.protocol import VeraPath
from vera_lightning.ops.grad_checkpointing import install_checkpointing_guard
from vera_lightning.ops.targets import modules_to_save_of, resolve_target_names

__all__ = [
    "set_vera_path",
    "apply_vera",
    "vera_layers",
    "mark_trainable",
    "count_parameters",
]

def mark_trainable(
    model: nn.Module, config: VeraConfig, layers: Optional[Iterable[tuple[str, VeraLinear]]] = None
) -> None:
    """Freeze everything except the λ's, the biases ``config.bias`` selects and ``modules_to_save``.

    Args:
        model: The model (adapted or not: without VeRA layers only biases and ``modules_to_save`` train).
        config: Which biases and ``modules_to_save`` train.
        layers: ``model``'s VeRA layers when the caller has looked them up already (default: found here).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in vera_layers(model) if layers is None else layers:
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


def apply_vera(model: nn.Module, config: VeraConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Adapt ``model`` in place with VeRA and freeze all but the adapter.

    The shared projections are drawn once, sized to the largest targeted layer, and
    attached as ``model.vera_projections``. Base state-dict keys are unchanged. Calling
    it again with an equal config is a no-op; ``config`` itself is never modified.

    Args:
        model: Any ``nn.Module`` holding ``nn.Linear``/``Conv1D`` layers.
        config: The adapter options.
        adapter_name: Name of this (primary) adapter; more are added with
            :func:`vera_lightning.add_adapter` (see :mod:`vera_lightning.ops.named`).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: If no layer matches (listing the candidates), if ``model`` already
            carries VeRA with a different config under ``adapter_name``, or carries VeRA
            without an adapter of that name (use ``add_adapter``).

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net = apply_vera(net, VeraConfig(r=16, target_modules=["0", "2"]))
        >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # (8 + 16) + (2 + 16)
        42
    """
    if not isinstance(config, VeraConfig):
        raise TypeError(f"apply_vera expects a VeraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name, "apply_vera")
    located = locate_adapter(model)
    if located is not None:
        where, existing = located
        if where != ADAPTER_ATTR:
            inside = f"at {where!r}" if where else "applied to an enclosing module"
            raise ValueError(
                f"apply_vera refused: {type(model).__name__} already holds VeRA modules of another adapter ({inside}); "
                "one model carries one adapter. Apply a single config to the module containing every layer to adapt, "
                "or call vera_lightning.unload_vera on the adapted module first"
            )
        if adapter_name not in existing.names:
            raise ValueError(
                f"apply_vera: {type(model).__name__} already carries VeRA adapters {existing.names}; add "
                f"{adapter_name!r} with vera_lightning.add_adapter(model, {adapter_name!r}, config)"
            )
        changed = existing.config_of(adapter_name).diff(config)
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
    _refuse_tied_modules_to_save(model, config)
    modules = {name: model.get_submodule(name) for name in names}
    if any(isinstance(m, VeraLinear) for m in modules.values()):
        raise ValueError("model holds VeraLinear layers but no vera_projections; it was not adapted by apply_vera")
    shapes = [layer_shape(m) for m in modules.values()]
    max_in, max_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    check_projection_memory(config.r, max_in, max_out)
    weight = next(iter(modules.values())).weight
    try:
        adapter = VeraAdapter(config, max_in=max_in, max_out=max_out, round_to=weight.dtype, name=adapter_name)
    except RuntimeError as err:  # the allocator refused
        check_projection_memory(config.r, max_in, max_out, error=err)
        raise
    adapter.to(weight.device)  # on meta too: to_empty re-draws them (VeraAdapter._apply)
    adapter.train(model.training)
    for name, module in modules.items():
        layer = VeraLinear(module, adapter, dropout=config.vera_dropout, d_initial=config.d_initial,
                           init_weights=config.init_weights, fan_in_fan_out=_fan_in_fan_out(name, module, config))
        model.set_submodule(name, layer)
    setattr(model, ADAPTER_ATTR, adapter)
    mark_trainable(model, config)
    install_checkpointing_guard(model)  # reentrant gradient checkpointing of a frozen base (checkpointing.py)
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


def _refuse_tied_modules_to_save(model: nn.Module, config: VeraConfig) -> None:
    """``modules_to_save`` train in place: refuse one sharing a weight with a module outside it (tied embeddings).

    Training a tied ``lm_head`` would change the input embedding too (PEFT trains a copy of the head instead);
    refusing keeps the input embedding and the saved file's meaning intact.
    """
    shared = shared_parameters(model)
    problems = []
    for name, module in modules_to_save_of(model, config.modules_to_save):
        prefix = f"{name}." if name else ""
        for own_name, param in module.named_parameters(remove_duplicate=False):
            others = [n for n in shared.get(id(param), []) if not n.startswith(prefix)]
            if others:
                problems.append(f"{prefix}{own_name} is tied to {others}")
    if problems:
        first = problems[0].split(" ", 1)[0].rsplit(".", 1)[0]
        raise ValueError(
            f"VeraConfig.modules_to_save={config.modules_to_save!r} refused, the model was not changed: "
            + "; ".join(problems) + ". Training it in full would change the tied module too. Untie first: "
            f"model.{first}.weight = torch.nn.Parameter(model.{first}.weight.detach().clone()) (and, for a "
            "transformers model, model.config.tie_word_embeddings = False), or leave it out of modules_to_save"
        )


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


def set_vera_path(
    model: nn.Module, path: str = "auto", share: Optional[bool] = None, memory: Optional[str] = None
) -> nn.Module:
    """Choose the autograd path of every :class:`~vera_lightning.VeraLinear` in ``model``.

    Args:
        model: An adapted model (or a single ``VeraLinear``).
        path: ``"auto"`` (default: per forward, the fastest allowed path, measured once per
            sibling-group shape on this machine by :mod:`vera_lightning.forward.autotune`, or priced by
            the cost model of :mod:`vera_lightning.forward.cost` when tuning is off: see
            :func:`vera_lightning.configure_autotune`; ``"plain"`` while dropout is active), ``"plain"`` (PEFT's
            autograd graph), ``"lean"`` (saves ``x``, recomputes ``x A_sᵀ`` in backward),
            ``"save_h"`` (saves ``x A_sᵀ`` once per sibling group) or ``"merged"`` (one matmul with
            ``W0 + ΔW``, see :mod:`vera_lightning.forward.merged`; not over a quantized base).
        share: If given, turn reuse of ``x A_sᵀ`` (and of ``x`` by merged siblings) on or off.
        memory: If given, what ``"auto"`` may keep for backward: ``"lean"`` (the default: the layer
            input once per sibling group, or ``x A_sᵀ`` where that is smaller and at most a quarter of
            PEFT's; never PEFT's graph) or ``"speed"`` (PEFT's graph included).

    Returns:
        ``model``.

    Raises:
        ValueError: For an unknown ``path`` or ``memory``, or ``"merged"`` on a quantized base
            (before any layer is changed).
    """
    if path not in PATHS:
        raise ValueError(f"set_vera_path(path={path!r}): must be one of {PATHS}")
    if memory is not None and memory not in cost.MEMORY_PREFERENCES:
        raise ValueError(f"set_vera_path(memory={memory!r}): must be one of {cost.MEMORY_PREFERENCES}")
    named = list(vera_layers(model))
    if path == VeraPath.merged:
        quantized = [name for name, layer in named if layer.base_is_quantized]
        if quantized:
            raise ValueError(
                f"set_vera_path(path='merged'): {len(quantized)} layer(s) (e.g. {quantized[0]!r}) have a quantized "
                "base, and the merged form needs a dequantized W0; use path='auto' (which skips it there) or 'lean'"
            )
    for _, layer in named:
        layer.vera_path = VeraPath(path)
        if memory is not None:
            layer.vera_memory = memory
        if share is not None:
            layer.adapter.siblings.enabled = share
            layer.adapter.siblings.clear()
    return model
