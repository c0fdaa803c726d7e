r"""The merged-weight training form of the VeRA update: one matmul per layer, exact gradients.

Per adapted layer, with ``C = B_s·diag(λ_d)·A_s`` (``out×in``) and ``W = W0 + diag(λ_b)·C``:

* forward ``y = x·Wᵀ + b``: ONE matmul that replaces the base layer's; forming ``W`` costs
  ``out·r·in`` multiply-adds, independent of the number of tokens ``N``;
* backward ``grad x = g·W`` (the frozen layer's own cost; ``W`` is formed again, not kept),
  ``G = gᵀ·x`` (``N·out·in``) and ``Q = G·A_sᵀ`` (``out·in·r``), or the same ``Q`` as
  ``gᵀ·(x·A_sᵀ)`` (``N·r·(in+out)``) when that is fewer multiply-adds (``r`` small against
  ``in``/``out``), from which both λ-gradients follow without any ``N``-sized product::

      grad λ_b[o] = Σ_i G[o,i]·C[o,i]                 = Σ_k Q[o,k]·B[o,k]·λ_d[k]
      grad λ_d[k] = Σ_i ((λ_b⊙B_s)ᵀ·G)[k,i]·A_s[k,i]  = Σ_o Q[o,k]·B[o,k]·λ_b[o]

* saves only ``x`` (one tensor for all siblings reading it), like the ``"lean"`` path.

So the extra work over the frozen layer is ``2·out·r·in + min(N·out·in + out·in·r, N·r·(in+out))``
multiply-adds against the low-rank forms' ``≈ 3·N·r·(in+out)``: the merged form wins at large
``N`` (see :mod:`vera_lightning.forward.cost`, which chooses).

**Siblings** (q/k/v, gate/up: layers reading the same ``x``): the first layer to read ``x``
(the leader) computes the outputs of the siblings it saw the last time (learned by
:class:`vera_lightning.forward.sharing.SiblingPlans`) in one autograd node: their ``W``'s are stacked,
``Y = x·[W_q; W_k; W_v]ᵀ`` is one matmul, and its backward forms ``[g_q g_k g_v]ᵀ·x`` and
``grad x`` as one matmul each, with ``x`` saved once. A sibling the leader did not expect (or
whose output was not taken) gets its own node; values are the same either way.

**Precision**: ``C``/``W`` are formed from float32 ``A_s``/``B_s``/λ's and rounded once to the
base dtype; ``G`` and ``Q`` are accumulated in float32 (half-precision operands are widened);
λ-gradients are float32, outputs and ``grad x`` are in the base dtype. Under autocast the
matmuls run in the autocast dtype, as the base layer's would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from vera_lightning.forward.protocol import HALF_DTYPES

if TYPE_CHECKING:  # pragma: no cover
    from vera_lightning.forward.protocol import AdaptedLayer

__all__ = ["MergedLinear", "merged_forward", "merged_weight"]


def merged_weight(weight, fan_in_fan_out, lam_b, lam_d, a_s, b_s, out: Optional[torch.Tensor] = None,
                  with_base: bool = True):
    """``W0 + diag(λ_b)·B_s·diag(λ_d)·A_s`` as an ``out×in`` matrix in the λ's dtype (float32).

    Args:
        weight: The base weight (``out×in``, or ``in×out`` with ``fan_in_fan_out``).
        fan_in_fan_out: Its layout.
        lam_b, lam_d: The λ vectors.
        a_s, b_s: The projection slices, in the λ's dtype.
        out: An ``out×in`` buffer to write into (e.g. rows of a stacked matrix).
        with_base: Add ``W0``; ``False`` gives ``ΔW`` alone.
    """
    scaled_b = b_s * lam_d * lam_b[:, None]  # out x r: both diagonals folded into B_s
    w = torch.mm(scaled_b, a_s, out=out) if out is not None else scaled_b @ a_s
    return w.add_(weight.T if fan_in_fan_out else weight) if with_base else w


class MergedLinear(torch.autograd.Function):
    """``y_m = x·W_mᵀ + b_m`` for every member ``m`` of a sibling group, as one node.

    Args (of ``apply``):
        x: The shared input ``(..., in)``.
        specs: Per member ``(fan_in_fan_out, out_features, has_bias)``.
        mm_dtype: The dtype the matmuls run in (the base dtype, or the autocast dtype).
        a_s: The shared ``A_s`` slice (λ dtype).
        *flat: Per member ``weight, bias (if has_bias), lam_b, lam_d, b_s``.

    Returns:
        One output per member, each ``(..., out_m)`` in ``mm_dtype``.
    """

    @staticmethod
    def forward(ctx, x, specs, mm_dtype, a_s, *flat):
        members = _unflatten(specs, flat)
        x2 = x.reshape(-1, x.shape[-1]).to(mm_dtype)
        bias = _stacked_bias(specs, members, mm_dtype)
        if mm_dtype in HALF_DTYPES:
            # W0 + ΔW rounded to half would lose ΔW (entirely when it is small: W0 is exact in half).
            # As PEFT: the frozen layer's own product in half, plus ΔW·x in float32, rounded once.
            w0 = _stacked_base(specs, members, mm_dtype)
            y = torch.addmm(bias, x2, w0.T) if bias is not None else x2 @ w0.T
            delta = _stacked_weight(specs, members, a_s, a_s.dtype, with_base=False)
            y = y.to(delta.dtype).addmm_(x2.to(delta.dtype), delta.T).to(mm_dtype)
        else:
            w_all = _stacked_weight(specs, members, a_s, mm_dtype)
            y = torch.addmm(bias, x2, w_all.T) if bias is not None else x2 @ w_all.T
        ctx.save_for_backward(x, a_s, *flat)
        ctx.specs, ctx.mm_dtype = specs, mm_dtype
        ctx.set_materialize_grads(False)
        lead = x.shape[:-1]
        if len(specs) == 1:
            return (y.view(*lead, specs[0][1]),)
        return tuple(part.reshape(*lead, part.shape[-1]).contiguous() for part in y.split([s[1] for s in specs], 1))

    @staticmethod
    def backward(ctx, *grads):
        x, a_s, *flat = ctx.saved_tensors
        specs, mm_dtype = ctx.specs, ctx.mm_dtype
        members = _unflatten(specs, flat)
        needs = ctx.needs_input_grad
        out_grads: list[Optional[torch.Tensor]] = [None] * len(flat)
        if all(g is None for g in grads):
            return (None, None, None, None, *out_grads)
        rows = x.numel() // x.shape[-1]
        g_all = torch.cat([  # a member whose output was not used gets zero rows (and no gradient below)
            (g.reshape(rows, s[1]) if g is not None else x.new_zeros(rows, s[1])).to(mm_dtype)
            for g, s in zip(grads, specs)
        ], 1) if len(specs) > 1 else grads[0].reshape(rows, specs[0][1]).to(mm_dtype)
        half = mm_dtype in HALF_DTYPES
        g_f32 = g_all.to(a_s.dtype) if half else g_all  # float32 operands: G and ΔW products accumulate in float32
        slots = list(_slots(specs))
        if any(needs[4 + i] for slot in slots for i in slot if i is not None):  # G = gᵀx, Q = G·A_sᵀ
            x_f32 = x.reshape(rows, -1).to(g_f32.dtype)
            big_g = None
            if (any(needs[4 + slot[0]] for slot in slots)
                    or not lowrank_q(rows, x.shape[-1], g_all.shape[1], a_s.shape[0])):
                big_g = g_f32.T @ x_f32  # G = gᵀx, sum(out) x in
                q = big_g @ a_s.T  # Q = G·A_sᵀ, sum(out) x r
            else:
                q = g_f32.T @ (x_f32 @ a_s.T)  # the same Q as gᵀ·(x·A_sᵀ): cheaper when N·r·(in+out) is smaller
            row = 0
            for g, (fan_in_fan_out, out, _), (weight, bias, lam_b, lam_d, b_s), (i_w, i_bias, i_b, i_d) in zip(
                grads, specs, members, slots
            ):
                if g is not None:
                    if needs[4 + i_w]:
                        gw = big_g[row:row + out]
                        out_grads[i_w] = (gw.T if fan_in_fan_out else gw).to(weight.dtype)
                    if i_bias is not None and needs[4 + i_bias]:
                        out_grads[i_bias] = g_f32[:, row:row + out].sum(0).to(bias.dtype)
                    qb = q[row:row + out] * b_s  # Q ⊙ B_s
                    out_grads[i_b] = qb @ lam_d if needs[4 + i_b] else None
                    out_grads[i_d] = lam_b @ qb if needs[4 + i_d] else None
                row += out
        grad_x = None
        if needs[0]:
            if half:  # as in forward: W0 in half, ΔW in float32, rounded once
                delta = _stacked_weight(specs, members, a_s, a_s.dtype, with_base=False)
                grad_x = (g_all @ _stacked_base(specs, members, mm_dtype)).to(delta.dtype).addmm_(g_f32, delta)
            else:
                grad_x = g_all @ _stacked_weight(specs, members, a_s, mm_dtype)
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return (grad_x, None, None, None, *out_grads)


def _unflatten(specs, flat) -> list[tuple]:
    members, i = [], 0
    for _, _, has_bias in specs:
        weight = flat[i]
        bias = flat[i + 1] if has_bias else None
        i += 2 if has_bias else 1
        members.append((weight, bias, flat[i], flat[i + 1], flat[i + 2]))
        i += 3
    return members


def lowrank_q(n: int, in_features: int, out_total: int, r: int) -> bool:
    """Whether ``Q = gᵀ·(x·A_sᵀ)`` (``N·r·(in+out)`` MACs) is cheaper than ``(gᵀ·x)·A_sᵀ`` (``N·out·in + out·in·r``)."""
    return n * r * (in_features + out_total) < n * out_total * in_features + out_total * in_features * r


def _slots(specs):
    """Per member, the positions in ``flat`` of ``(weight, bias or None, lam_b, lam_d)``."""
    i = 0
    for _, _, has_bias in specs:
        j = i + (2 if has_bias else 1)
        yield i, (i + 1 if has_bias else None), j, j + 1
        i = j + 3


def _stacked_weight(specs, members, a_s, mm_dtype, with_base: bool = True) -> torch.Tensor:
    """``[W_1; W_2; ...]`` (or the ``ΔW``'s) as ``Σout × in`` in ``mm_dtype``, formed in the λ's dtype."""
    lam_dtype = a_s.dtype
    if len(specs) == 1:
        (fan_in_fan_out, _, _), (weight, _, lam_b, lam_d, b_s) = specs[0], members[0]
        return merged_weight(weight, fan_in_fan_out, lam_b, lam_d, a_s, b_s, with_base=with_base).to(mm_dtype)
    w_all = torch.empty(sum(s[1] for s in specs), a_s.shape[1], dtype=lam_dtype, device=a_s.device)
    row = 0
    for (fan_in_fan_out, out, _), (weight, _, lam_b, lam_d, b_s) in zip(specs, members):
        merged_weight(weight, fan_in_fan_out, lam_b, lam_d, a_s, b_s, out=w_all[row:row + out], with_base=with_base)
        row += out
    return w_all.to(mm_dtype)


def _stacked_base(specs, members, mm_dtype) -> torch.Tensor:
    """``[W0_1; W0_2; ...]`` (``Σout × in``) in ``mm_dtype``."""
    parts = [(m[0].T if s[0] else m[0]).to(mm_dtype) for s, m in zip(specs, members)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stacked_bias(specs, members, mm_dtype) -> Optional[torch.Tensor]:
    if not any(s[2] for s in specs):
        return None
    parts = [(m[1] if m[1] is not None else m[0].new_zeros(s[1])).to(mm_dtype) for s, m in zip(specs, members)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Group:
    """The outputs a leader computed for its siblings, until each sibling takes its own."""

    __slots__ = ("outputs",)

    def __init__(self, outputs: dict[int, torch.Tensor]) -> None:
        self.outputs = outputs

    def take(self, layer: nn.Module) -> Optional[torch.Tensor]:
        return self.outputs.pop(id(layer), None)


def _mm_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return layer.weight.dtype


def _compatible(leader: nn.Module, member: nn.Module) -> bool:
    """Whether ``member`` can be computed in ``leader``'s node (same input slice, merged path)."""
    return (
        member is not leader and not member.merged and not member.base_is_quantized
        and member.in_features == leader.in_features and member.adapter is leader.adapter
        and member.vera_path in ("auto", "merged")
        and member.lambdas()[1].dtype == leader.lambdas()[1].dtype and member.weight.device == leader.weight.device
        and not (member.training and isinstance(member.vera_dropout, nn.Dropout))
    )


def _run(layers: list, x: torch.Tensor, mm_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    a_s = layers[0].sliced_projections()[0]
    specs, flat = [], []
    for layer in layers:
        _, b_s = layer.sliced_projections()
        specs.append((bool(layer.fan_in_fan_out), layer.out_features, layer.bias is not None))
        flat += [layer.weight] + ([layer.bias] if layer.bias is not None else [])
        flat += [*layer.lambdas(), b_s]
    with torch.autocast(x.device.type, enabled=False):
        return MergedLinear.apply(x, tuple(specs), mm_dtype, a_s, *flat)


def merged_forward(layer: "AdaptedLayer", result: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The ``"merged"`` path of a :class:`~vera_lightning.VeraLinear` (replaces its base forward).

    Uses only the layer's ``weight``, ``bias``, ``fan_in_fan_out``, ``in_features``,
    ``out_features``, ``lambdas()``, ``sliced_projections()`` and ``adapter.siblings``.

    Args:
        layer: The adapted layer (training, no active dropout, autograd recording).
        result: Unused (``None``): this path replaces the base layer's matmul (see
            :data:`vera_lightning.forward.dispatch.REPLACES_BASE`).
        x: Its input ``(..., in_features)``.

    Returns:
        ``x·(W0 + ΔW)ᵀ + b`` in the base (or autocast) dtype.
    """
    mm_dtype = _mm_dtype(layer, x)
    cache = layer.adapter.siblings
    a_s, _ = layer.sliced_projections()
    hit = cache.lookup(x, a_s, "merged", id(layer))
    if hit is not None:  # a sibling led: take the output it computed for us, or run alone
        if layer.vera_path == "merged":  # auto layers were recorded when the cost model chose
            cache.plans.join(layer, x)
        out = hit[0].take(layer)
        return out if out is not None else _run([layer], x, mm_dtype)[0]
    expected = cache.plans.lead(layer, x) if layer.vera_path == "merged" else cache.plans.current(layer)
    members = [layer] + [m for m in expected if _compatible(layer, m)]
    outputs = _run(members, x, mm_dtype)
    group = _Group({id(m): y for m, y in zip(members[1:], outputs[1:])})
    cache.store(x, a_s, "merged", (group,), id(layer))
    return outputs[0]
