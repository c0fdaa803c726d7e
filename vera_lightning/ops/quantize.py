"""Train VeRA over a quantized frozen base: ``quantize_base``, ``dequantize_base``, byte counts.

With VeRA the trainable part is kilobytes; the frozen base is practically all of the memory.
:func:`quantize_base` stores the base's linear weights in 4-bit NF4 (QLoRA's format) or 8-bit
(int8 weight-only, one scale per output row); the λ's train over them as over a float base
(see :mod:`vera_lightning.core.qtensor` for the backends, :mod:`vera_lightning.core.qlinear` for the backward).

What is quantized: every ``nn.Linear`` (adapted or not) except a model's output head (in most
LMs it is tied to the input embedding, which stays as it is), weights shared with another module,
the adapter's ``modules_to_save`` and the names in ``skip``; embeddings, norms and biases stay in
their dtype. Or exactly the layers named in ``modules``.

Orders (docs/quantization.md):

* ``apply_vera`` then ``quantize_base``: allowed; the λ's and projections are untouched and
  ``modules_to_save`` are left in full precision automatically.
* ``quantize_base`` then ``apply_vera`` (or ``load_adapter``): allowed; pass the heads you will
  train as ``skip=[...]`` (``apply_vera`` refuses a quantized module in ``modules_to_save``).
* after ``merge_vera``: refused (the update would be quantized into the base); ``unmerge_vera`` first.
* ``merge_vera``/``unload_vera(merge=True)`` over a quantized base: refused with the fix,
  :func:`dequantize_base` first (then the export is a float model).

State dicts (docs/quantization.md, "State dicts and save_pretrained"): ``load_state_dict`` into a
quantized model quantizes a float weight as it loads and refuses one quantized otherwise, before
anything loads; ``save_pretrained`` of a ``transformers`` model holding torchao weights is refused
with the fixes (``save_adapter``, or ``dequantize_base`` first).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from vera_lightning.core.layer import Conv1D, VeraLinear
from vera_lightning.core.lookup import find_adapter, vera_layers
from vera_lightning.core.qlinear import QuantizedLinear
from vera_lightning.core.qtensor import (
    BACKENDS,
    SCHEMES,
    bnb_available,
    dequantize_weight,
    float_dtype,
    is_bnb_module,
    is_quantized_weight,
    nf4_shape_problem,
    quantize_weight,
    tensor_bytes,
    weight_scheme,
)
from vera_lightning.core.refusals import shared_parameters
from vera_lightning.ops.quantize_state import SavePretrainedRefusal, guard_state, linear_layers
from vera_lightning.ops.targets import in_modules_to_save, output_heads

__all__ = ["quantize_base", "dequantize_base", "is_quantized", "quantized_layers", "model_bytes"]


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): the modules holding it}`` for every parameter held by more than one module."""
    owners = {pid: sorted({n.rpartition(".")[0] for n in names}) for pid, names in shared_parameters(model).items()}
    return {pid: modules for pid, modules in owners.items() if len(modules) > 1}


def _select(model, scheme, modules, skip) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The layers to quantize, and the problems (each naming the layer and the fix)."""
    problems: list[str] = []
    candidates = list(linear_layers(model))
    leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in candidates})
    skip, tied = list(skip or []), _tied_weights(model)
    module_names = [n for n, _ in model.named_modules() if n]
    unknown = [s for s in skip if not any(in_modules_to_save(n, [s]) for n in module_names)]
    if unknown:  # as for modules=: a typo must not quantize the layer it meant to keep
        problems.append(f"skip={skip}: {unknown} match no module of {type(model).__name__} (a module's name or name "
                        f"suffix; its linear layers are left in full precision; candidates: {leaves})")
    if modules is not None:
        chosen = [(n, m) for n, m in candidates if n in modules or any(n.endswith("." + t) for t in modules)]
        missing = [t for t in modules if not any(n == t or n.endswith("." + t) for n, _ in chosen)]
        if missing:
            problems.append(f"modules={list(modules)}: {missing} match no linear layer of {type(model).__name__} "
                            f"(candidates: {leaves})")
        chosen = [(n, m) for n, m in chosen if not in_modules_to_save(n, skip)]
        explicit = True
    else:
        adapter = find_adapter(model)
        keep = skip + list((adapter.config.modules_to_save if adapter is not None else None) or [])
        heads = output_heads(model)
        chosen = [(n, m) for n, m in candidates
                  if id(m) not in heads and id(m.weight) not in tied and not in_modules_to_save(n, keep)]
        explicit = False
    selected, left_out = [], []
    for name, module in chosen:
        weight = module.weight
        current = weight_scheme(weight)
        if Conv1D is not None and (isinstance(module, Conv1D) or getattr(module, "fan_in_fan_out", False)):
            (problems if explicit else left_out).append(
                f"{name}: transformers Conv1D (weight stored in x out, GPT-2 style) is not supported by quantize_base")
        elif current == scheme:
            continue  # already quantized this way: idempotent
        elif id(weight) in tied:  # only named in modules=: the default selection leaves tied weights out
            others = [o or type(model).__name__ for o in tied[id(weight)] if o != name]
            layer = f"model.get_submodule({name!r})"
            problems.append(
                f"{name} (modules={list(modules)}): its weight is tied to {others} (one tensor, e.g. "
                "tie_word_embeddings); quantizing it would untie them. Leave it out of modules=[...], or untie it "
                f"first: {layer}.weight = "
                f"torch.nn.Parameter({layer}.weight.detach().clone()) and, for a transformers model, "
                "model.config.tie_word_embeddings = False")
        elif current is not None:
            problems.append(f"{name}: already quantized as {current}; call dequantize_base(model) before "
                            f"quantizing as {scheme}")
        elif isinstance(module, VeraLinear) and module.merged:
            problems.append(f"{name}: its VeRA update is merged into the weight; unmerge_vera(model) first (or "
                            "unload_vera(model, merge=True) and quantize the merged model as a new base)")
        elif weight.device.type == "meta":
            problems.append(f"{name}: weight on the meta device; load the weights before quantizing")
        elif scheme == "nf4" and (shape_problem := nf4_shape_problem(weight, name)):
            (problems if explicit else left_out).append(shape_problem)
        else:
            selected.append((name, module))
    if left_out:
        warnings.warn("quantize_base leaves these layers in full precision:\n  - " + "\n  - ".join(left_out)
                      + "\n(name them in skip=[...] to silence this)", UserWarning, stacklevel=3)
    return selected, problems


def quantize_base(
    model: nn.Module,
    scheme: str = "nf4",
    *,
    backend: str = "auto",
    skip: Optional[Sequence[str]] = None,
    modules: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Quantize the frozen linear weights of ``model`` in place (before or after ``apply_vera``).

    Args:
        model: Any ``nn.Module``; plain or adapted by :func:`~vera_lightning.apply_vera`.
        scheme: ``"nf4"`` (4-bit NormalFloat, blocks of 64, double-quantized scales) or
            ``"int8"`` (weight-only, symmetric, one scale per output row).
        backend: ``"auto"`` (= ``"torchao"``), ``"torchao"`` (CPU/CUDA) or ``"bitsandbytes"``
            (its ``Linear4bit``/``Linear8bitLt`` layers; CUDA, or CPU where its build supports it).
        skip: Names (or name suffixes) of modules whose linear layers stay in full precision, e.g.
            the heads you will train in ``modules_to_save``; each must name a module of ``model``.
        modules: Quantize exactly these layers instead of the default selection (less those in
            ``skip``). A weight tied to another module (a tied ``lm_head``) is refused: untie it first.

    Returns:
        ``model``. Quantized weights are frozen (``requires_grad=False``); plain ``nn.Linear``
        layers become :class:`~vera_lightning.core.qlinear.QuantizedLinear` (same state-dict keys).
        Quantizing again with the same scheme is a no-op.

    Raises:
        ValueError: Unknown scheme/backend, a name in ``modules``/``skip`` that matches nothing, a
            tied weight named in ``modules``, a layer already quantized otherwise, a merged
            adapter, a weight NF4 cannot block or on an unsupported device (every problem
            listed once, before any layer is changed).
        TypeError: A module named in ``modules`` that is not a linear layer.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128))
        >>> net = quantize_base(net, "nf4")
        >>> [type(m.weight).__name__ for m in (net[0], net[2])]
        ['NF4Tensor', 'NF4Tensor']
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_base(scheme={scheme!r}): use one of {SCHEMES}")
    if backend not in BACKENDS:
        raise ValueError(f"quantize_base(backend={backend!r}): use one of {BACKENDS}")
    if backend == "bitsandbytes" and not bnb_available():
        raise ValueError("quantize_base(backend='bitsandbytes') needs bitsandbytes (pip install bitsandbytes, on a "
                         "CUDA machine); backend='torchao' (the default) works on CPU and CUDA")
    if isinstance(modules, str) or isinstance(skip, str):
        raise TypeError("quantize_base: modules and skip are lists of layer names, e.g. skip=['classifier']")
    if modules is not None:
        named = dict(model.named_modules())
        wrong = [n for n in modules if n in named and not isinstance(named[n], (nn.Linear, VeraLinear))
                 and not (Conv1D is not None and isinstance(named[n], Conv1D))]
        if wrong:
            raise TypeError(f"quantize_base(modules=...): {[(n, type(named[n]).__name__) for n in wrong]} are not "
                            "linear layers; only nn.Linear (and VeraLinear over one) weights are quantized, "
                            "embeddings and norms stay as they are")
    selected, problems = _select(model, scheme, modules, skip)
    if problems:
        raise ValueError(f"quantize_base(scheme={scheme!r}) refused, nothing was changed:\n  - "
                         + "\n  - ".join(problems))
    if not selected and not quantized_layers(model):
        raise ValueError(f"quantize_base(scheme={scheme!r}): no layer of {type(model).__name__} can be quantized "
                         "(see the warning above for the ones left out, or name them in modules=[...])")
    for name, module in selected:
        _quantize_layer(model, name, module, scheme, "torchao" if backend == "auto" else backend)
    guard_state(model)
    return model


def _bnb_layer(weight: torch.Tensor, bias: Optional[nn.Parameter], scheme: str) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    data = weight.detach().clone()
    if scheme == "nf4":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=weight.dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    layer = layer.to(weight.device)  # bitsandbytes quantizes when the weight moves to its device
    layer.bias = bias
    return layer


def _quantize_layer(model: nn.Module, name: str, module: nn.Module, scheme: str, backend: str) -> None:
    if isinstance(module, VeraLinear):
        if backend == "bitsandbytes":
            base = _bnb_layer(module.weight, module.bias, scheme)
            module.weight = base.weight
            module.set_foreign_base(base)
        else:
            module.weight = nn.Parameter(quantize_weight(module.weight, scheme, name), requires_grad=False)
    elif backend == "bitsandbytes":
        layer = _bnb_layer(module.weight, module.bias, scheme)
        layer.train(module.training)
        model.set_submodule(name, layer)
    else:
        model.set_submodule(name, QuantizedLinear.from_linear(module, scheme, name))


def dequantize_base(model: nn.Module, dtype: Optional[torch.dtype | str] = None) -> nn.Module:
    """Undo :func:`quantize_base`: every quantized weight becomes a plain (frozen) float weight.

    The values are the quantized ones (``dequant(Q(W0))``, the base the λ's were trained
    against), so ``merge_vera``/``unload_vera(merge=True)`` afterwards export the trained model.

    Args:
        model: A model with quantized layers (torchao or bitsandbytes).
        dtype: float dtype of the weights (and of those layers' biases): a ``torch.dtype`` or
            ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``,
            ``"float64"``/``"fp64"``; ``None`` keeps the dtype they were quantized from. Other
            modules are untouched (``model.to(dtype)``).

    Returns:
        ``model`` (a no-op for a model without quantized layers).

    Raises:
        ValueError / TypeError: ``dtype`` not a float dtype (``torch.int8`` would round every weight
            to an integer), before any layer changes.
    """
    dtype = None if dtype is None else float_dtype(dtype, "dequantize_base(model, dtype)")
    for name, module in list(model.named_modules()):
        if isinstance(module, VeraLinear) and module.base_is_quantized:
            module.weight = nn.Parameter(dequantize_weight(module.weight, dtype, module.foreign_base),
                                         requires_grad=False)
            module.set_foreign_base(None)
            if module.base_type is QuantizedLinear or "bitsandbytes" in module.base_type.__module__:
                module.base_type = nn.Linear
            _cast_bias(module, dtype)
        elif isinstance(module, QuantizedLinear) or is_bnb_module(module):
            if not is_quantized_weight(module.weight):
                continue
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(dequantize_weight(module.weight, dtype, module), requires_grad=False)
            plain.bias = module.bias
            _cast_bias(plain, dtype)
            plain.train(module.training)
            model.set_submodule(name, plain)
    for module in model.modules():
        if isinstance(vars(module).get("save_pretrained"), SavePretrainedRefusal):
            del module.save_pretrained  # the model's own method again
    return model


def _cast_bias(module: nn.Module, dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and module.bias is not None and module.bias.dtype != dtype:
        module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=module.bias.requires_grad)


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """``{layer name: scheme}`` of every layer with a quantized weight."""
    return {name: weight_scheme(m.weight) for name, m in linear_layers(model) if is_quantized_weight(m.weight)}


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is quantized."""
    return any(is_quantized_weight(p) for p in model.parameters())


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the parameters and buffers of ``model`` hold in memory (shared tensors counted once).

    Returns:
        ``{"total", "quantized", "other"}``: ``quantized`` is the packed data and scales of the
        quantized weights, ``other`` everything else (embeddings, norms, biases, λ's, projections).
    """
    seen: set[int] = set()
    quantized = other = 0
    tensors = list(model.parameters()) + list(model.buffers())
    for _, layer in vera_layers(model):  # a bitsandbytes base inside a VeraLinear is not a submodule
        if layer.foreign_base is not None:
            tensors += list(layer.foreign_base.parameters())
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if is_quantized_weight(tensor):
            quantized += tensor_bytes(tensor)
        else:
            other += tensor_bytes(tensor)
    return {"total": quantized + other, "quantized": quantized, "other": other}
