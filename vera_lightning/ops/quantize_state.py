"""What a quantized model's state dict and ``save_pretrained`` may do (docs/quantization.md).

:func:`guard_state` (called by :func:`~vera_lightning.ops.quantize.quantize_base`) makes
``load_state_dict`` into a model holding torchao weights check every incoming weight before anything
loads (a float weight is quantized as it loads, one quantized otherwise is refused with the fix), and
replaces a ``transformers`` model's ``save_pretrained`` by a refusal naming the fixes
(``save_adapter``, or ``dequantize_base`` first) while torchao weights are in it.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from vera_lightning.core.layer import Conv1D, VeraLinear
from vera_lightning.core.messages import shorten
from vera_lightning.core.qtensor import is_torchao_weight, prepare_load, weight_scheme

__all__ = ["guard_state", "linear_layers", "SavePretrainedRefusal"]


def linear_layers(model: nn.Module):
    """``(name, module)`` of every linear layer below ``model``: ``nn.Linear``, ``VeraLinear``, ``Conv1D``."""
    for name, module in model.named_modules():
        if name and (isinstance(module, (nn.Linear, VeraLinear))
                     or (Conv1D is not None and isinstance(module, Conv1D))):
            yield name, module


_LOAD_GUARDED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _has_torchao_weights(module: nn.Module) -> bool:
    return any(is_torchao_weight(getattr(m, "weight", None)) for m in module.modules())


def guard_state(model: nn.Module) -> None:
    """Make ``load_state_dict`` and ``save_pretrained`` of ``model`` honour (or refuse) its torchao weights."""
    if not _has_torchao_weights(model):
        return
    for _, module in model.named_modules():
        # the root checks every weight before anything loads; a VeraLinear for loads started below the root
        # (QuantizedLinear does it in its own _load_from_state_dict)
        if (module is model or isinstance(module, VeraLinear)) and module not in _LOAD_GUARDED:
            module.register_load_state_dict_pre_hook(_check_quantized_load)
            _LOAD_GUARDED.add(module)
        is_pretrained = callable(getattr(type(module), "save_pretrained", None)) and hasattr(module, "config")
        if is_pretrained and "save_pretrained" not in vars(module) and _has_torchao_weights(module):
            module.save_pretrained = SavePretrainedRefusal(module)


def _check_quantized_load(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook: each incoming quantized weight checked (float ones quantized) first."""
    loads, problems = {}, []
    for name, layer in module.named_modules():
        weight, key = getattr(layer, "weight", None), f"{prefix}{name}.weight" if name else f"{prefix}weight"
        if is_torchao_weight(weight) and key in state_dict:
            value, problem = prepare_load(weight, state_dict[key], key)
            problems += [problem] if problem else []
            loads[key] = value
    if problems:
        raise ValueError(f"load_state_dict refused, nothing of {type(module).__name__} was loaded:\n  - "
                         + shorten(problems, sep="\n  - ", noun="problems"))
    state_dict.update(loads)  # torch's own copy of the caller's dict


class SavePretrainedRefusal:
    """Stands in for ``save_pretrained`` of a ``transformers`` model while torchao weights are in it.

    safetensors cannot store torchao's tensor subclasses (``transformers`` fails half-way, after writing
    ``config.json``, with "invalid python storage"), and ``from_pretrained`` could not rebuild them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        names = [n for n, m in linear_layers(model) if is_torchao_weight(m.weight)]
        if not names:  # dequantized since: the model's own method again
            vars(model).pop("save_pretrained", None)
            return model.save_pretrained(*args, **kwargs)
        schemes = sorted({weight_scheme(model.get_submodule(n).weight) for n in names})
        raise ValueError(
            f"save_pretrained refused, nothing was written: {len(names)} linear weights of {type(model).__name__} "
            f"are quantized by quantize_base ({'/'.join(schemes)}: {shorten(names, 3)}), which safetensors cannot "
            "store and from_pretrained could not load back. Save the adapter alone: save_adapter(model, dir) (then "
            "load the original base, quantize_base it again and load_adapter); or write a float model: "
            "dequantize_base(model) (or dequantize_base(model, torch.bfloat16)) first, then "
            "model.save_pretrained(dir), or unload_vera(model, merge=True).save_pretrained(dir) to bake the adapter in")
