r"""Export a VeRA adapter as a PEFT LoRA adapter: ``export_lora(model, directory, adapter_name=..., rank=None)``.

A VeRA update is a LoRA update with fixed factors:

.. math::

    \Delta W = \Lambda_b B_s \Lambda_d A_s = \underbrace{(\Lambda_b B_s)}_{\texttt{lora\_B}}\,
    \underbrace{(\Lambda_d A_s)}_{\texttt{lora\_A}}

so ``lora_A = diag(λ_d) A_s`` (``r x in``) and ``lora_B = diag(λ_b) B_s`` (``out x r``) with rank ``r``
and ``lora_alpha = r`` reproduce it: PEFT scales LoRA by ``lora_alpha / r`` (``lora_alpha / sqrt(r)``
only with ``use_rslora=True``, which we write as ``False``), so the scaling is exactly 1. Any LoRA
server (PEFT, vLLM, TGI) can then serve the VeRA adapter; ``peft.PeftModel.from_pretrained`` gives
our outputs up to float32 rounding.

``rank=k`` writes the best rank-``k`` approximation (Eckart-Young, Frobenius norm) for servers with a
LoRA rank limit, computed from the thin factors without forming the ``out x in`` matrix: with
``P = diag(λ_b) B_s = Q_1 R_1`` and ``(diag(λ_d) A_s)ᵀ = Q_2 R_2`` (reduced QR), ``ΔW = Q_1 (R_1 R_2ᵀ) Q_2ᵀ``
and the SVD of the small ``R_1 R_2ᵀ = U S Vᵀ`` gives ``lora_B = Q_1 U_k S_k^{1/2}``,
``lora_A = S_k^{1/2} V_kᵀ Q_2ᵀ``. The relative error ``‖ΔW - ΔW_k‖_F / ‖ΔW‖_F`` is returned per layer
and for the whole adapter (all layers' ``ΔW`` taken together). Computed in float64, written in float32.

Target names are the exact adapted module names relative to ``model`` (pass the ``transformers``
model, as for :func:`vera_lightning.save_adapter`). The primary adapter's trainable biases and
``modules_to_save`` are written too (``bias="vera_only"`` becomes LoRA's ``"lora_only"``). The file
describes the update relative to the *unmerged* base weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from vera_lightning.config import BiasMode
from vera_lightning.core.lookup import find_adapted
from vera_lightning.io import adapter_files
from vera_lightning.io import peft_format as fmt
from vera_lightning.io.adapter_dir import PathLike

__all__ = ["export_lora", "LoraExport", "lora_factors"]

_BIAS = {BiasMode.none: "none", BiasMode.all: "all", BiasMode.vera_only: "lora_only"}


@dataclass(frozen=True)
class LoraExport:
    """What :func:`export_lora` wrote.

    Attributes:
        directory: The adapter directory.
        rank: The LoRA rank written (``r`` for the exact export).
        relative_error: ``‖ΔW - ΔW_k‖_F / ‖ΔW‖_F`` over all layers (``0.0`` for the exact export).
        layer_errors: The same per adapted layer (empty for the exact export).
    """

    directory: str
    rank: int
    relative_error: float
    layer_errors: dict[str, float] = field(default_factory=dict)


def lora_factors(
    lam_b: torch.Tensor, lam_d: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor, rank: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(lora_A, lora_B, tail, total)`` of one layer; ``tail/total`` are squared Frobenius norms.

    ``rank=None``: the exact factors (in the λ's dtype; ``tail = 0``). Otherwise the best rank-``rank``
    factors in float64 (padded with zeros when ``ΔW`` has a lower rank), ``tail`` the squared norm of
    what was cut and ``total`` that of ``ΔW``.
    """
    if rank is None:
        return lam_d[:, None] * a_s, lam_b[:, None] * b_s, 0.0, 0.0
    f64 = torch.float64
    left = lam_b.to(f64)[:, None] * b_s.to(f64)  # out x r
    right = lam_d.to(f64)[:, None] * a_s.to(f64)  # r x in
    q1, r1 = torch.linalg.qr(left)  # out x m1, m1 x r
    q2, r2 = torch.linalg.qr(right.T)  # in x m2, m2 x r
    u, s, vh = torch.linalg.svd(r1 @ r2.T)  # m1 x m2: the singular values of ΔW
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    lora_b = torch.zeros(left.shape[0], rank, dtype=f64)
    lora_a = torch.zeros(rank, right.shape[1], dtype=f64)
    lora_b[:, :keep] = (q1 @ u[:, :keep]) * root
    lora_a[:keep] = (root[:, None] * vh[:keep]) @ q2.T
    squares = s.square()
    return lora_a, lora_b, squares[keep:].sum().item(), squares.sum().item()


def export_lora(
    model: nn.Module, directory: PathLike, adapter_name: Optional[str] = None, rank: Optional[int] = None,
    base_model_name_or_path: Optional[str] = None,
) -> LoraExport:
    """Write VeRA adapter ``adapter_name`` of ``model`` to ``directory`` as a PEFT LoRA adapter.

    Args:
        model: An adapted model (names in the file are relative to it).
        directory: Target directory; created, or replaced if it holds only adapter files.
        adapter_name: Which named adapter (default: the active one).
        rank: ``None``: the exact export, rank ``r``. ``k`` (``1 <= k <= r``): the best rank-``k``
            approximation, with its relative error reported.
        base_model_name_or_path: Recorded in ``adapter_config.json``.

    Returns:
        A :class:`LoraExport` (directory, rank, relative error of ``ΔW``).

    Raises:
        ValueError: If ``model`` has no VeRA, for an unknown adapter name, a bad ``rank``, non-finite
            λ's, or a directory holding other files (nothing is written then).

    Example::

        >>> import tempfile
        >>> from vera_lightning import VeraConfig, apply_vera
        >>> net = apply_vera(torch.nn.Sequential(torch.nn.Linear(8, 4)), VeraConfig(r=4, target_modules=["0"]))
        >>> export_lora(net, tempfile.mkdtemp() + "/lora", rank=2).rank
        2
    """
    found = find_adapted(model)  # the one lookup of the export
    if found is None:
        raise ValueError(f"export_lora: {type(model).__name__} carries no VeRA adapter; call apply_vera first")
    adapter = found.adapter
    name = adapter.active if adapter_name is None else adapter_name
    config = adapter.config_of(name)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= config.r):
        raise ValueError(f"export_lora: rank={rank!r} must be an integer with 1 <= rank <= r={config.r} (or None for "
                         "the exact export at rank r)")
    directory = os.fspath(directory)
    adapter_files.check_target_dir(directory)
    attrs = adapter.lambda_names(name)
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    tail_sum = total_sum = 0.0
    conv1d = False
    with torch.no_grad():
        layers = found.layers
        bad = [n for n, layer in layers if not all(torch.isfinite(getattr(layer, a)).all() for a in attrs)]
        if bad:
            raise ValueError(f"export_lora: adapter {name!r} has NaN/inf λ's in {bad[:4]}; nothing was written")
        for layer_name, layer in layers:
            lam_b, lam_d = (getattr(layer, a) for a in attrs)
            a_s, b_s = layer.adapter.sliced(layer.in_features, layer.out_features, lam_d.dtype, lam_d.device)
            lora_a, lora_b, tail, total = lora_factors(lam_b, lam_d, a_s, b_s, rank)
            tensors[f"{fmt.MODEL_PREFIX}{layer_name}.lora_A.weight"] = lora_a.to("cpu", torch.float32).contiguous()
            tensors[f"{fmt.MODEL_PREFIX}{layer_name}.lora_B.weight"] = lora_b.to("cpu", torch.float32).contiguous()
            conv1d |= layer.fan_in_fan_out
            if rank is not None:
                errors[layer_name] = (tail / total) ** 0.5 if total > 0 else 0.0
                tail_sum, total_sum = tail_sum + tail, total_sum + total
        for key, (_, tensor) in fmt.layout(model, config, found=found, adapter_name=name).items():  # biases, saved
            if key not in fmt.PROJECTION_KEYS and ".vera_lambda_" not in key:
                tensors[key] = tensor.detach().to("cpu").contiguous().clone()
    written = config.r if rank is None else rank
    payload: dict[str, Any] = {
        **fmt.peft_extra_fields(base_model_name_or_path, peft_type="LORA"),
        "r": written, "lora_alpha": written, "use_rslora": False, "lora_dropout": 0.0,
        "target_modules": [n for n, _ in layers], "fan_in_fan_out": conv1d, "bias": _BIAS[config.bias],
        "modules_to_save": config.modules_to_save, "init_lora_weights": True, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    adapter_files.write_adapter_files(directory, payload, tensors,
                                      {"format": "pt", fmt.META_CONTENT: fmt.content_sha256(tensors)})
    relative = (tail_sum / total_sum) ** 0.5 if total_sum > 0 else 0.0
    return LoraExport(directory=directory, rank=written, relative_error=relative, layer_errors=errors)
