r"""`VeraLinear`: a frozen linear layer plus a VeRA update.

.. math::

    h = W_0 x + b + \Lambda_b B_s \Lambda_d A_s \,\mathrm{dropout}(x)

``A_s = vera_A[:, :in]`` and ``B_s = vera_B[:out, :]`` are slices of the random
projections shared by every adapted layer (see :mod:`vera_lightning.projection`);
``Λ_b = diag(vera_lambda_b)`` (``out`` entries, init 0) and ``Λ_d = diag(vera_lambda_d)``
(``r`` entries, init ``d_initial``) are the only trained tensors: ``out + r`` per layer.

The layer owns the base ``weight``/``bias`` itself, so the state-dict keys of the
un-adapted model (``...q_proj.weight``) stay exactly the same after injection.
Works for ``nn.Linear`` and ``transformers``' ``Conv1D`` (``fan_in_fan_out``).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vera_lightning.config import VeraConfig
from vera_lightning.functional import PATHS, ProjectIn, SiblingGroup, VeraUpdate
from vera_lightning.projection import VeraProjections
from vera_lightning.states import is_meta, materialised

try:  # transformers is a dependency, but the layer also works without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = ["VeraLinear", "SUPPORTED_LAYERS", "is_supported_layer", "set_vera_path"]

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def is_supported_layer(module: nn.Module) -> bool:
    """Whether VeRA can adapt ``module`` (``nn.Linear`` or HF ``Conv1D``)."""
    return isinstance(module, SUPPORTED_LAYERS)


class VeraLinear(nn.Module):
    """A linear layer with VeRA scaling vectors over shared random projections.

    Build it through :func:`vera_lightning.apply_vera`, which creates the shared
    projections; constructing it by hand needs a :class:`VeraProjections` sized for it.

    Args:
        base: The ``nn.Linear`` or ``Conv1D`` to adapt (its parameters are taken over, not copied).
        projections: The shared projections module (kept as an unregistered reference).
        config: The adapter options (only read).
        fan_in_fan_out: Whether ``base.weight`` is stored ``(in, out)``; defaults to
            ``True`` for ``Conv1D`` and ``False`` for ``nn.Linear``, whatever ``config`` says.

    Example::

        >>> from vera_lightning import VeraConfig, apply_vera
        >>> model = apply_vera(torch.nn.Sequential(torch.nn.Linear(8, 4)), VeraConfig(r=16, target_modules=["0"]))
        >>> type(model[0]).__name__, tuple(model[0].vera_lambda_b.shape), tuple(model[0].vera_lambda_d.shape)
        ('VeraLinear', (4,), (16,))
    """

    adapter_param_names = ("vera_lambda_b", "vera_lambda_d")
    #: Autograd path, one of :data:`vera_lightning.functional.PATHS` (set with :func:`set_vera_path`).
    vera_path: str = "auto"
    #: The path the last (uncompiled) forward took: "plain", "lean", "save_h" or "nograd".
    last_path: Optional[str] = None

    def __init__(
        self,
        base: nn.Module,
        projections: VeraProjections,
        config: VeraConfig,
        fan_in_fan_out: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if not is_supported_layer(base):
            raise TypeError(
                f"VeRA adapts nn.Linear and transformers' Conv1D layers, got {type(base).__name__}; "
                "remove it from target_modules"
            )
        is_conv1d = Conv1D is not None and isinstance(base, Conv1D)
        if fan_in_fan_out is None:
            fan_in_fan_out = is_conv1d
        self.base_type: type = type(base)
        self.fan_in_fan_out = fan_in_fan_out
        if is_conv1d:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        if projections.max_in < self.in_features or projections.max_out < self.out_features:
            raise ValueError(
                f"projections sized ({projections.max_in} in, {projections.max_out} out) are too small for a "
                f"layer with {self.in_features} in / {self.out_features} out features; use apply_vera, which "
                "sizes them to the largest targeted layer"
            )
        self.r = projections.r
        self.weight = base.weight
        self.bias = base.bias
        self._projections = (projections,)  # a tuple: a reference, not a submodule (one state-dict entry)
        self.vera_dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device}
        # λ's of half-precision models are kept in float32, as PEFT does by default
        # (autocast_adapter_dtype): AdamW updates of 1e-4 would vanish in bfloat16.
        dtype = base.weight.dtype
        if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
            dtype = torch.float32
        if config.init_weights:
            lam_b = torch.zeros(self.out_features, dtype=dtype, **factory)
            lam_d = torch.full((self.r,), float(config.d_initial), dtype=dtype, **factory)
        else:  # as PEFT: random, so tests see a non-trivial adapter
            lam_b = torch.ones(self.out_features, dtype=dtype, **factory)
            lam_d = torch.randn(self.r, **factory).to(dtype)
        self.vera_lambda_b = nn.Parameter(lam_b)
        self.vera_lambda_d = nn.Parameter(lam_d)
        self.merged = False
        self._lambda_init = (config.init_weights, float(config.d_initial))  # re-applied by to_empty (see _apply)

    @torch.no_grad()
    def reset_lambdas_(self) -> None:
        """Set the λ's to their initial values again (λ_b = 0, λ_d = ``d_initial``; PEFT's test init otherwise)."""
        init_weights, d_initial = self._lambda_init
        if init_weights:
            self.vera_lambda_b.zero_()
            self.vera_lambda_d.fill_(d_initial)
        else:
            self.vera_lambda_b.fill_(1.0)
            self.vera_lambda_d.copy_(torch.randn(self.r).to(self.vera_lambda_d))

    def _apply(self, fn, recurse=True):
        was_meta = is_meta(self.vera_lambda_b)
        out = super()._apply(fn, recurse)
        if materialised([self.vera_lambda_b, self.vera_lambda_d], was_meta):  # to_empty: meta held no values
            self.reset_lambdas_()
        return out

    # ------------------------------------------------------------------ protocol
    @property
    def projections(self) -> VeraProjections:
        """The shared projections this layer slices."""
        return self._projections[0]

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The tensors this layer adds (the trainable λ vectors), by name."""
        return {name: getattr(self, name) for name in self.adapter_param_names}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )

    # ------------------------------------------------------------------ compute
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone (``W0 x + b``), as the original module computes it."""
        if self.fan_in_fan_out:
            if self.bias is None:
                return x @ self.weight
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def sliced_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_s, B_s)`` in the λ's dtype and device."""
        lam = self.vera_lambda_d
        return self.projections.sliced(self.in_features, self.out_features, lam.dtype, lam.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged:
            return result
        path = self._pick_path(x)
        if not _compiling():
            self.last_path = path
        if path == "plain":
            return self._plain_update(result, x)
        return self._fast_update(result, x, save_h=None if path == "nograd" else path == "save_h")

    def _pick_path(self, x: torch.Tensor) -> str:
        """``"plain"``, ``"lean"`` or ``"save_h"`` for this call (see :data:`functional.PATHS`)."""
        path = self.vera_path
        if path == "plain" or _compiling() or (self.training and isinstance(self.vera_dropout, nn.Dropout)):
            return "plain"  # dropout: each layer draws its own mask, nothing to share or recompute
        records = torch.is_grad_enabled() and (
            x.requires_grad or self.vera_lambda_b.requires_grad or self.vera_lambda_d.requires_grad
        )
        if not records:
            return "nograd"
        return "lean" if path == "auto" else path

    def _plain_update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """PEFT's formulation under plain autograd (saves ``h`` and ``u`` per layer)."""
        lam_d, lam_b = self.vera_lambda_d, self.vera_lambda_b
        a_s, b_s = self.sliced_projections()
        if x.dtype != lam_d.dtype:  # as PEFT: the adapter runs in the λ's dtype
            x = x.to(lam_d.dtype)
        update = lam_b * F.linear(lam_d * F.linear(self.vera_dropout(x), a_s), b_s)
        return (result + update).to(result.dtype)

    def _fast_update(self, result: torch.Tensor, x: torch.Tensor, save_h: bool) -> torch.Tensor:
        """Same values as :meth:`_plain_update`; ``h = x A_sᵀ`` shared with siblings, lean backward."""
        lam_d, lam_b = self.vera_lambda_d, self.vera_lambda_b
        a_s, b_s = self.sliced_projections()
        mode = "nograd" if save_h is None else ("save_h" if save_h else "lean")
        cache = getattr(self.projections, "siblings", None)
        hit = cache.lookup(x, a_s, mode, id(self)) if cache is not None else None
        if hit is not None:
            h, group = hit
        elif mode == "nograd":
            h, group = F.linear(x.to(lam_d.dtype), a_s), None
        else:
            h, group = ProjectIn.apply(x, a_s, lam_d.dtype), SiblingGroup(a_s, lam_d.dtype)
        if hit is None and cache is not None:
            cache.store(x, a_s, mode, (h, group), id(self))
        if mode == "nograd":
            return (result + lam_b * F.linear(lam_d * h, b_s)).to(result.dtype)
        group.members += 1
        return VeraUpdate.apply(result, h, x, lam_b, lam_d, b_s, group, save_h)

    # ------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """``diag(λ_b) B_s diag(λ_d) A_s`` laid out like ``weight`` (computed in fp32 on CPU for half types)."""
        lam_d, lam_b = self.vera_lambda_d.detach(), self.vera_lambda_b.detach()
        a_s, b_s = self.sliced_projections()
        compute_dtype = lam_d.dtype
        if lam_d.device.type == "cpu" and compute_dtype in (torch.float16, torch.bfloat16):
            compute_dtype = torch.float32
        a_s, b_s = a_s.to(compute_dtype), b_s.to(compute_dtype)
        delta = (lam_b.to(compute_dtype)[:, None] * b_s) @ (lam_d.to(compute_dtype)[:, None] * a_s)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add the update into ``weight`` (no-op when already merged).

        Args:
            safe_merge: Compute the merged weight in a copy first and refuse to write it
                if it has NaN/inf entries.

        Raises:
            ValueError: With ``safe_merge=True``, if the merged weight is not finite.
        """
        if self.merged:
            return
        delta = self.delta_weight()
        if safe_merge:
            merged = self.weight + delta
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"safe_merge refused: merging this VeraLinear ({self.in_features}->{self.out_features}) "
                    "gives non-finite weights (NaN/inf in the λ's or the base weight); the weight was left "
                    "unchanged. Inspect vera_lambda_b/vera_lambda_d, or keep the adapter unmerged."
                )
            self.weight.copy_(merged)
        else:
            self.weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from ``weight`` again (no-op when not merged)."""
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def to_base(self, merge: bool = True) -> nn.Module:
        """A plain ``nn.Linear``/``Conv1D`` sharing this layer's ``weight``/``bias``.

        Args:
            merge: Fold the VeRA update into the weight first; otherwise return the
                original (unmerged) weights.
        """
        if merge:
            self.merge()
        else:
            self.unmerge()
        with torch.device("meta"):
            if Conv1D is not None and issubclass(self.base_type, Conv1D):
                plain = self.base_type(self.out_features, self.in_features)
            else:
                plain = self.base_type(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        plain.train(self.training)
        return plain


def _warn_fan_in_fan_out(name: str, layer: nn.Module, config: VeraConfig) -> bool:
    """The ``fan_in_fan_out`` to use for ``layer`` (warning when it overrides the config)."""
    is_conv1d = Conv1D is not None and isinstance(layer, Conv1D)
    if is_conv1d and not config.fan_in_fan_out:
        warnings.warn(
            f"{name} is a transformers Conv1D (weight stored in x out): using fan_in_fan_out=True for it "
            "(your VeraConfig is unchanged; set fan_in_fan_out=True to silence this)",
            UserWarning,
            stacklevel=4,
        )
    elif not is_conv1d and config.fan_in_fan_out:
        warnings.warn(
            f"{name} is an nn.Linear (weight stored out x in): using fan_in_fan_out=False for it "
            "(your VeraConfig is unchanged)",
            UserWarning,
            stacklevel=4,
        )
    return is_conv1d


def set_vera_path(model: nn.Module, path: str = "auto", share: Optional[bool] = None) -> nn.Module:
    """Choose the autograd path of every :class:`VeraLinear` in ``model``.

    Args:
        model: An adapted model (or a single ``VeraLinear``).
        path: ``"auto"`` (default: ``"lean"`` when training without dropout, else ``"plain"``),
            ``"plain"`` (PEFT's autograd graph), ``"lean"`` (saves ``x``, recomputes ``x A_sᵀ``
            in backward) or ``"save_h"`` (saves ``x A_sᵀ`` once per sibling group).
        share: If given, turn reuse of ``x A_sᵀ`` across sibling layers on or off.

    Returns:
        ``model``.

    Raises:
        ValueError: For an unknown ``path``.
    """
    if path not in PATHS:
        raise ValueError(f"vera path {path!r} is not one of {PATHS}")
    for module in model.modules():
        if isinstance(module, VeraLinear):
            module.vera_path = path
            if share is not None and hasattr(module.projections, "siblings"):
                module.projections.siblings.enabled = share
                module.projections.siblings.clear()
    return model
