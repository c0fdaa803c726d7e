r"""A small cost model choosing each layer's autograd path per forward (``set_vera_path(model, "auto")``).

Every path computes the same values (see :mod:`vera_lightning.forward.lowrank` and
:mod:`vera_lightning.forward.merged`); they differ in work and in what they keep for backward. For one
sibling group (the layers reading one input ``x``: q/k/v, gate/up, or a single layer) with
``N`` tokens, ``in`` input features, output features ``o_1..o_k`` (``O = Σ o_m``) and rank ``r``,
the extra work over the frozen layers, in multiply-adds (MAC), is:

====================  ======================================  =========================================
path                  GEMM MACs                               saved for backward
====================  ======================================  =========================================
``lean``              ``3·N·r·in + 3·N·r·O``                  ``x`` (``N·in``), once per group
``save_h``            ``2·N·r·in + 3·N·r·O``                  ``h = x·A_sᵀ`` (``N·r``), once per group
``merged``            ``2·O·r·in + min(N·O·in + O·in·r,``     ``x`` (``N·in``), once per group
                      ``N·r·(in+O))``
``plain`` (PEFT)      ``2·k·N·r·in + 2·N·r·O``                ``h`` and ``u`` (``N·(r+o)``) per layer
====================  ======================================  =========================================

(``lean``: ``h`` forward, recomputed, ``grad x``; ``u``, ``M = gᵀh``, ``grad h`` per layer.
``merged``: ``W`` formed in forward and again in backward; ``Q = (gᵀx)·A_sᵀ`` or ``gᵀ·(x·A_sᵀ)``,
whichever is fewer MACs; its ``x·Wᵀ`` and ``g·W`` replace the frozen layer's own two matmuls. In
half precision it keeps ``W0`` in half and runs ``ΔW·x`` and ``g·ΔW`` in float32 as well: ``+2·N·O·in``.
The low-rank forms run in float32 whatever the base dtype, as PEFT's.) Each path also moves bytes
through elementwise kernels (the λ scalings, casts, adds and the gradient accumulation of
``N×r``/``N×o`` tensors; forming ``W = W0 + ΔW``, which is ``O·in``) and launches a number of
kernels. The estimated time is::

    t = 2·MAC / F  +  bytes / BW  +  kernels · τ

with ``F`` the float32 GEMM rate, ``BW`` the elementwise bandwidth and ``τ`` the per-kernel
overhead of the device, fitted by ``benchmarks/calibrate_cost.py`` to measured per-path times (the
values and the run that produced them are in :data:`MACHINES` and ``docs/perf.md``).

Memory preference (``set_vera_path(model, "auto", memory=...)``): ``"lean"`` (default) allows
``lean`` and ``merged`` (``x`` once per group, the least an exact form that recomputes keeps, and
often a tensor the base model keeps anyway, e.g. the output of a ReLU) and ``save_h`` where ``h``
is no larger than ``x`` and at most :data:`LEAN_SHARE` (¼) of what PEFT's graph keeps for the group;
never ``plain``, which keeps PEFT's ``h`` and ``u`` per layer. ``"speed"`` allows every path.

The choice is made by the first layer of a group (its leader) for the group it saw the last
time (:class:`vera_lightning.forward.sharing.SiblingPlans`); siblings follow the leader's path, so
``x``/``h`` stay shared. :func:`group_of` says which group a leader prices (:class:`Group`);
:func:`choose_path` prices it with :data:`MACHINES`, :mod:`vera_lightning.forward.autotune` measures
the candidates instead (the cost model then only orders and prunes them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from vera_lightning.forward.protocol import HALF_DTYPES

if TYPE_CHECKING:  # pragma: no cover
    from vera_lightning.forward.protocol import AdaptedLayer

__all__ = ["MEMORY_PREFERENCES", "CHOICES", "LEAN_SHARE", "Machine", "MACHINES", "Group", "path_terms", "path_costs",
           "saved_bytes", "allowed_paths", "best_path", "group_of", "choose_path"]

MEMORY_PREFERENCES = ("lean", "speed")
CHOICES = ("lean", "save_h", "merged", "plain")
#: ``memory="lean"``: ``save_h`` keeps ``h`` only where that is at most this share of PEFT's ``h`` + ``u``.
LEAN_SHARE = 0.25


@dataclass(frozen=True)
class Machine:
    """Device constants, fitted to measured path times by ``benchmarks/calibrate_cost.py``.

    Attributes:
        gemm: Float32 GEMM rate, flop/s (2 per multiply-add; every extra product runs in float32).
        bandwidth: Elementwise kernel rate, bytes moved per second.
        overhead: Seconds per kernel launched (dispatch, autograd bookkeeping, launch).
        source: Where the numbers come from.
    """

    gemm: float
    bandwidth: float
    overhead: float
    source: str


#: Per device type. "cpu": fitted to 24 sibling groups x 4 paths measured on the project's 2-core
#: AMD EPYC VM (1 thread, shared with other jobs): ``benchmarks/calibrate_cost.py --threads 1 --repeats 5
#: --groups 768:768,768 768:768,768,768 768:3072 3072:768``, raw rows in
#: ``benchmarks/results/cpu1-float32-calibration.json``; the fitted "overhead" also absorbs every
#: size-independent cost (Python, autograd nodes), hence its size. "cuda": not measured (no GPU was
#: lent to this work): H100-class float32 (non-TF32) GEMM rate, HBM bandwidth, launch overhead.
#: ``best_path`` caches its answers: call ``_best_path.cache_clear()`` after changing these.
MACHINES = {
    "cpu": Machine(gemm=6.14e10, bandwidth=1.65e9, overhead=5.54e-4,
                   source="fitted, benchmarks/results/cpu1-float32-calibration.json"),
    "cuda": Machine(gemm=5.0e13, bandwidth=2.5e12, overhead=8.0e-6, source="H100 datasheet, not measured"),
}


def path_terms(n: int, in_features: int, outs: Sequence[int], r: int, dtype: torch.dtype) -> dict[str, tuple]:
    """Per path, the extra ``(flops, bytes moved, kernels)`` over the frozen layers for one sibling group.

    Args:
        n: Tokens (rows of ``x``).
        in_features: Input features (shared by the group).
        outs: Output features of each layer of the group.
        r: Rank.
        dtype: The base (matmul) dtype; λ's and the low-rank products are float32.
    """
    k, big_o, d = len(outs), float(sum(outs)), float(in_features)
    half = dtype in HALF_DTYPES
    xb = 2.0 if half else 4.0  # bytes of an x / g element
    cast = (n * d + n * big_o) * (xb + 4.0) if half else 0.0  # x and g widened to float32
    # low-rank forms: λ_d⊙h, λ_b⊙u, the add, grad-h accumulation (float32), grad-x accumulation
    low_bytes = 4.0 * n * (3 * k * r + 4 * big_o) + 3 * xb * n * d + cast
    lean = (2 * n * r * (3 * d + 3 * big_o), low_bytes, 13 * k + 5)
    save_h = (2 * n * r * (2 * d + 3 * big_o), low_bytes, 13 * k + 4)
    plain = (2 * n * r * (2 * k * d + 2 * big_o), 4.0 * n * (4 * k * r + 7 * big_o) + (3 * xb * n * d + cast) * k,
             16 * k)
    # merged: ΔW formed twice (out·r·in GEMM + the add of W0), G = gᵀx, Q = G·A_sᵀ; in half precision
    # ΔW·x and g·ΔW also run in float32 beside the half W0 products (see merged.py)
    macs = (2 * big_o * r * d + min(n * big_o * d + big_o * d * r, n * r * (d + big_o))
            + (2 * n * big_o * d if half else 0))
    moved = 2 * 3 * 4.0 * big_o * d
    if half:
        moved += cast + 2 * n * big_o * (4 + 4 + xb) + 2 * n * d * (4 + xb) + 2 * 2 * xb * big_o * d
    if k > 1:
        moved += 2 * 2 * xb * n * big_o  # split outputs, concatenated output gradients
    merged = (2 * macs, moved, 12 * k + (11 if half else 7))
    return {"lean": lean, "save_h": save_h, "merged": merged, "plain": plain}


def path_costs(n: int, in_features: int, outs: Sequence[int], r: int, dtype: torch.dtype,
               machine: Machine) -> dict[str, float]:
    """Estimated extra seconds over the frozen layers, per path (:func:`path_terms` priced by ``machine``)."""
    return {path: flops / machine.gemm + moved / machine.bandwidth + kernels * machine.overhead
            for path, (flops, moved, kernels) in path_terms(n, in_features, outs, r, dtype).items()}


def saved_bytes(n: int, in_features: int, outs: Sequence[int], r: int, dtype: torch.dtype) -> dict[str, float]:
    """Bytes each path keeps for backward for one sibling group (λ's float32)."""
    xb = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    x = float(n * in_features * xb)
    return {"lean": x, "merged": x, "save_h": float(n * r * 4), "plain": float(sum(n * (r + o) * 4 for o in outs))}


def allowed_paths(n: int, in_features: int, outs: Sequence[int], r: int, dtype: torch.dtype, memory: str,
                  merged_ok: bool = True) -> list[str]:
    """The paths ``memory`` allows, in the order of :data:`CHOICES`.

    ``"lean"``: ``lean`` and ``merged`` (``x`` once per group), ``save_h`` where ``h`` is no larger
    than ``x`` and at most :data:`LEAN_SHARE` of PEFT's ``h`` + ``u`` for the group, never ``plain``
    (PEFT's own graph: all of PEFT's memory; it used to be allowed where ``h`` + ``u`` is smaller than
    ``x``, e.g. fc2, but there ``x`` is usually kept by the base model already, so it only added).
    ``"speed"``: every path. ``merged_ok=False`` (a quantized base: the merged form would need a
    dequantized ``W0``) leaves ``merged`` out.
    """
    if memory not in MEMORY_PREFERENCES:
        raise ValueError(f"memory={memory!r}: must be one of {MEMORY_PREFERENCES}")
    choices = [p for p in CHOICES if merged_ok or p != "merged"]
    if memory == "speed":
        return choices
    saved = saved_bytes(n, in_features, outs, r, dtype)
    h_ok = saved["save_h"] <= min(saved["lean"], LEAN_SHARE * saved["plain"])
    return [p for p in choices if p in ("lean", "merged") or (p == "save_h" and h_ok)]


def best_path(n: int, in_features: int, outs: Sequence[int], r: int, dtype: torch.dtype, device_type: str = "cpu",
              memory: str = "lean", merged_ok: bool = True) -> str:
    """The cheapest allowed path for one sibling group (ties go to the earlier of lean, save_h, merged)."""
    return _best_path(n, in_features, tuple(outs), r, dtype, device_type, memory, merged_ok)


@functools.lru_cache(maxsize=4096)  # one entry per shape seen: the choice costs nothing after the first step
def _best_path(n, in_features, outs, r, dtype, device_type, memory, merged_ok) -> str:
    machine = MACHINES.get(device_type, MACHINES["cuda"])
    costs = path_costs(n, in_features, outs, r, dtype, machine)
    return min(allowed_paths(n, in_features, outs, r, dtype, memory, merged_ok), key=lambda p: costs[p])


@dataclass(frozen=True)
class Group:
    """The sibling group a leader prices: what the cost model and the tuner decide for.

    Attributes:
        n: Tokens (rows of ``x``).
        in_features: The group's input features.
        outs: Output features, the leader's first.
        r: Rank.
        dtype: The dtype the base matmuls run in (the autocast dtype under autocast).
        device: Where ``x`` lives.
        memory: The leader's memory preference.
        merged_ok: ``False`` over a quantized base (no merged form).
        grad_x: Whether ``x`` requires grad (``grad x`` is part of the backward).
        learned: Whether the leader has led a forward before, so ``outs`` holds its siblings.
        autocast: Whether ``dtype`` comes from autocast (the weights are cast per forward).
    """

    n: int
    in_features: int
    outs: tuple[int, ...]
    r: int
    dtype: torch.dtype
    device: torch.device
    memory: str
    merged_ok: bool
    grad_x: bool
    learned: bool
    autocast: bool = False
    proj_dtype: Optional[torch.dtype] = None

    def allowed(self) -> list[str]:
        """:func:`allowed_paths` for this group."""
        return allowed_paths(self.n, self.in_features, self.outs, self.r, self.dtype, self.memory, self.merged_ok)

    def costs(self) -> dict[str, float]:
        """:func:`path_costs` for this group with its device type's constants."""
        machine = MACHINES.get(self.device.type, MACHINES["cuda"])
        return path_costs(self.n, self.in_features, self.outs, self.r, self.dtype, machine)

    def best(self) -> str:
        """The cost model's choice (:func:`best_path`)."""
        return best_path(self.n, self.in_features, self.outs, self.r, self.dtype, self.device.type, self.memory,
                         self.merged_ok)


def group_of(layer: "AdaptedLayer", x: torch.Tensor) -> Union[str, Group]:
    """The path of the sibling ``layer`` follows, or the :class:`Group` it leads on ``x``.

    A layer that reads the input a sibling already read takes that sibling's path (so the shared
    ``x``/``h`` is reused); otherwise it leads a group, with the siblings it saw the last time
    (:class:`~vera_lightning.forward.sharing.SiblingPlans`). A quantized base never takes ``merged``.
    """
    cache = layer.adapter.siblings
    a_s = layer.sliced_projections()[0]
    mode = cache.peek_mode(x, a_s)
    if mode in ("lean", "save_h", "merged"):
        if mode == "merged" and (layer.base_is_quantized or a_s.dtype != layer.lambdas()[1].dtype):
            return "lean"  # cannot join a merged group; same values, its own h
        cache.plans.join(layer, x)
        return mode
    learned = cache.plans.learned(layer)
    members = [m for m in cache.plans.lead(layer, x) if m.in_features == layer.in_features]
    outs = (layer.out_features, *(m.out_features for m in members))
    n = x.numel() // x.shape[-1] if x.dim() else 1
    dtype = layer.weight.dtype if layer.weight.dtype.is_floating_point else layer.lambdas()[1].dtype
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
    lam_dtype = layer.lambdas()[1].dtype
    proj = a_s.dtype if a_s.dtype != lam_dtype else None  # the bf16 training form: no merged form (float32 ΔW)
    return Group(n, layer.in_features, outs, layer.r, dtype, x.device, layer.vera_memory,
                 not layer.base_is_quantized and proj is None, x.requires_grad, learned, autocast, proj)


def choose_path(layer: "AdaptedLayer", x: torch.Tensor) -> str:
    """The cost model's path for this forward of ``layer`` (autograd recording, no active dropout)."""
    group = group_of(layer, x)
    return group if isinstance(group, str) else group.best()
