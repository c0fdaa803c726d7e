r"""Memory-lean autograd for the VeRA update.

Plain autograd on ``λ_b ⊙ (B_s (λ_d ⊙ (A_s x)))`` (PEFT's form) keeps two activations per
layer alive until backward: ``h = x A_sᵀ`` (``N×r``, for ``grad λ_d``) and ``u = (λ_d ⊙ h) B_sᵀ``
(``N×out``, for ``grad λ_b``). Here the update is split into two autograd nodes:

* :class:`ProjectIn` computes ``h = x A_sᵀ`` and saves nothing but the frozen ``A_s``. Sibling
  layers that read the same ``x`` (q/k/v, gate/up) reuse one ``h`` (see
  :mod:`vera_lightning.forward.sharing`), so autograd sums their ``grad h`` and ``grad x = (Σ grad h) A_s``
  is one matmul for the whole group.
* :class:`VeraUpdate` adds ``λ_b ⊙ ((λ_d ⊙ h) B_sᵀ)`` to the base output. In the ``"lean"`` mode
  it saves ``x`` (which sibling layers share, so it is stored once) and recomputes ``h`` once per
  group in backward; in the ``"save_h"`` mode it saves ``h`` (again once per group).

Both λ-gradients come from one ``out×r`` product ``M = gᵀ h`` (``g`` the output gradient)::

    grad λ_b[o] = Σ_k M[o,k] B[o,k] λ_d[k]        grad λ_d[k] = Σ_o M[o,k] B[o,k] λ_b[o]

so no ``N×out`` intermediate is needed. The forward runs exactly PEFT's operations in the
same order, so outputs are bit-identical to the plain path (float32 and half precision).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ProjectIn", "VeraUpdate", "SiblingGroup"]


class SiblingGroup:
    """Layers sharing one ``h = x A_sᵀ`` node; recomputes ``h`` once per backward for all of them.

    Args:
        a_s: The ``A_s`` slice the group projects with.
        dtype: The adapter (λ) dtype ``h`` is computed in.
    """

    __slots__ = ("a_s", "dtype", "members", "_h", "_used")

    def __init__(self, a_s: torch.Tensor, dtype: torch.dtype) -> None:
        self.a_s, self.dtype = a_s, dtype
        self.members = 0
        self._h: Optional[torch.Tensor] = None
        self._used = 0

    def recompute_h(self, x: torch.Tensor) -> torch.Tensor:
        """``h`` for one member's backward: computed by the first caller, dropped after the last."""
        h = self._h
        if h is None:
            h = F.linear(x.to(self.dtype), self.a_s)
        self._used += 1
        if self._used >= self.members:
            self._h, self._used = None, 0
        else:
            self._h = h
        return h


class ProjectIn(torch.autograd.Function):
    """``h = x.to(dtype) A_sᵀ``; backward ``grad x = grad h · A_s`` (saves only ``A_s``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a_s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(a_s)
        ctx.x_dtype = x.dtype
        return F.linear(x.to(dtype), a_s)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (a_s,) = ctx.saved_tensors
        # under autocast the forward ran in the autocast dtype and backward does not: match a_s first
        return (grad_h.to(a_s.dtype) @ a_s).to(ctx.x_dtype), None, None


class VeraUpdate(torch.autograd.Function):
    """``(result + λ_b ⊙ ((λ_d ⊙ h) B_sᵀ)).to(result.dtype)`` without saving ``N×r``/``N×out`` tensors.

    Args (of ``apply``):
        result: The base layer's output ``W0 x + b``.
        h: ``x A_sᵀ`` from :class:`ProjectIn` (shared by the sibling group).
        x: The layer input (saved in the ``"lean"`` mode to recompute ``h``).
        lam_b, lam_d: The trainable λ vectors.
        b_s: The ``B_s`` slice.
        group: The :class:`SiblingGroup` (recomputes ``h`` once for all its members).
        save_h: Save ``h`` instead of ``x`` (faster backward, ``N×r`` more memory per group).
    """

    @staticmethod
    def forward(ctx, result, h, x, lam_b, lam_d, b_s, group, save_h):
        # Exactly PEFT's operations, in its order: bit-identical outputs.
        out = (result + lam_b * F.linear((lam_d * h).to(b_s.dtype), b_s)).to(result.dtype)
        ctx.save_for_backward(h if save_h else x, lam_b, lam_d, b_s)
        ctx.group, ctx.save_h = group, save_h
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved, lam_b, lam_d, b_s = ctx.saved_tensors
        need_result, need_h, _, need_b, need_d = ctx.needs_input_grad[:5]
        # the products run in the projections' dtype: the λ's (float32), or bf16 in the bf16 training form,
        # where M = gᵀh and grad h are bf16 products (float32 accumulation) and the λ-gradients float32 sums
        g = grad_out.to(b_s.dtype)
        grad_b = grad_d = grad_h = None
        if need_b or need_d:
            h = (saved if ctx.save_h else ctx.group.recompute_h(saved)).to(g.dtype)  # autocast: h may be half
            m = (g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1])).to(lam_b.dtype)  # out x r
            mb = m.mul_(b_s)
            grad_b = mb @ lam_d if need_b else None
            grad_d = lam_b @ mb if need_d else None
        if need_h:
            grad_h = g @ (b_s * lam_b[:, None] * lam_d).to(g.dtype)
        return grad_out if need_result else None, grad_h, None, grad_b, grad_d, None, None, None
