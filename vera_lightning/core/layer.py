r"""`VeraLinear`: a frozen linear layer plus a VeRA update.

.. math::

    h = W_0 x + b + \Lambda_b B_s \Lambda_d A_s \,\mathrm{dropout}(x)

``A_s = vera_A[:, :in]`` and ``B_s = vera_B[:out, :]`` are slices of the random
projections shared by every adapted layer (see :mod:`vera_lightning.core.projection`);
``Λ_b = diag(vera_lambda_b)`` (``out`` entries, init 0) and ``Λ_d = diag(vera_lambda_d)``
(``r`` entries, init ``d_initial``) are the only trained tensors: ``out + r`` per layer.

The layer owns the base ``weight``/``bias`` itself, so the state-dict keys of the
un-adapted model (``...q_proj.weight``) stay exactly the same after injection.
Works for ``nn.Linear`` and ``transformers``' ``Conv1D`` (``fan_in_fan_out``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vera_lightning.core.qlinear import deepcopy_layer, merge_refusal, quantized_base_forward, quantized_to_base
from vera_lightning.core.qtensor import is_bnb_module, is_quantized_weight
from vera_lightning.core.refusals import is_meta, materialised
from vera_lightning.forward.dispatch import vera_forward
from vera_lightning.forward.protocol import HALF_DTYPES, VeraPath

if TYPE_CHECKING:  # pragma: no cover
    from vera_lightning.core.adapter import VeraAdapter

try:  # transformers is a dependency, but the layer also works without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = ["VeraLinear", "SUPPORTED_LAYERS", "is_supported_layer", "is_conv1d", "layer_shape", "initial_lambdas"]

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_supported_layer(module: nn.Module) -> bool:
    """Whether VeRA can adapt ``module`` (``nn.Linear`` or HF ``Conv1D``)."""
    return isinstance(module, SUPPORTED_LAYERS)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (weight stored ``(in, out)``)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear``, a ``Conv1D`` or a :class:`VeraLinear`."""
    if isinstance(module, (nn.Linear, VeraLinear)):
        return module.in_features, module.out_features
    if is_conv1d(module):
        in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
        return in_features, out_features
    raise TypeError(f"{type(module).__name__} is not an nn.Linear, transformers Conv1D or VeraLinear")


def initial_lambdas(
    out_features: int, r: int, init_weights: bool, d_initial: float, dtype: torch.dtype,
    device: Optional[torch.device] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ_b, λ_d)`` as an adapter starts: the one rule for every layer, named adapter and re-initialisation.

    ``init_weights=True``: λ_b = 0, λ_d = ``d_initial`` (VeRA's init: the adapted model starts as the base).
    ``False``: PEFT's test init, λ_b = 1, λ_d ~ N(0, 1), drawn with ``device``'s generator (the default
    device's for ``None``), so tests see a non-trivial adapter.
    """
    factory = {"dtype": dtype, "device": device}
    if init_weights:
        return torch.zeros(out_features, **factory), torch.full((r,), float(d_initial), **factory)
    return torch.ones(out_features, **factory), torch.randn(r, device=device).to(dtype)


class VeraLinear(nn.Module):
    """A linear layer with VeRA scaling vectors over shared random projections.

    Build it through :func:`vera_lightning.apply_vera`, which creates the shared
    :class:`~vera_lightning.core.adapter.VeraAdapter` sized for every targeted layer; the layer
    takes plain values, as read from the config once, at injection.

    Args:
        base: The ``nn.Linear`` or ``Conv1D`` to adapt (its parameters are taken over, not copied).
        adapter: The model's adapter, whose projections this layer slices (an unregistered reference).
        dropout: Dropout probability on the adapter input.
        d_initial: Initial value of every ``vera_lambda_d`` entry.
        init_weights: ``True``: λ_b = 0, λ_d = ``d_initial``; ``False``: λ_b = 1, λ_d ~ N(0, 1) (as PEFT).
        fan_in_fan_out: Whether ``base.weight`` is stored ``(in, out)``; defaults to ``True`` for
            ``Conv1D`` and ``False`` for ``nn.Linear``.

    Example::

        >>> from vera_lightning import VeraConfig, apply_vera
        >>> model = apply_vera(torch.nn.Sequential(torch.nn.Linear(8, 4)), VeraConfig(r=16, target_modules=["0"]))
        >>> type(model[0]).__name__, tuple(model[0].vera_lambda_b.shape), tuple(model[0].vera_lambda_d.shape)
        ('VeraLinear', (4,), (16,))
    """

    adapter_param_names = ("vera_lambda_b", "vera_lambda_d")
    #: Parameter names of the λ's the forward uses: the layer's own (the primary adapter's), or a named
    #: adapter's after :func:`vera_lightning.set_adapter` (see :mod:`vera_lightning.ops.named`).
    active_lambda_names: tuple[str, str] = adapter_param_names
    #: Autograd path (set with :func:`vera_lightning.set_vera_path`; see :mod:`vera_lightning.forward.dispatch`).
    vera_path: VeraPath = VeraPath.auto
    #: What ``auto`` may keep for backward, ``"lean"`` or ``"speed"`` (see :mod:`vera_lightning.forward.cost`).
    vera_memory: str = "lean"

    def __init__(
        self,
        base: nn.Module,
        adapter: "VeraAdapter",
        dropout: float = 0.0,
        d_initial: float = 0.1,
        init_weights: bool = True,
        fan_in_fan_out: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if not is_supported_layer(base):
            raise TypeError(
                f"VeRA adapts nn.Linear and transformers' Conv1D layers, got {type(base).__name__}; "
                "remove it from target_modules"
            )
        self.base_type: type = type(base)
        self.fan_in_fan_out = is_conv1d(base) if fan_in_fan_out is None else fan_in_fan_out
        self.in_features, self.out_features = layer_shape(base)
        if adapter.max_in < self.in_features or adapter.max_out < self.out_features:
            raise ValueError(
                f"projections sized ({adapter.max_in} in, {adapter.max_out} out) are too small for a "
                f"layer with {self.in_features} in / {self.out_features} out features; use apply_vera, which "
                "sizes them to the largest targeted layer"
            )
        self.r = adapter.r
        self.weight = base.weight
        self.bias = base.bias
        # a bitsandbytes base is kept and called for W0 x (its quantization state lives on the module)
        self._foreign_base = (base,) if is_bnb_module(base) else None  # see foreign_base
        self._adapter = (adapter,)  # a tuple: a reference, not a submodule (one state-dict entry)
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # λ's of half-precision models are kept in float32, as PEFT does by default
        # (autocast_adapter_dtype): AdamW updates of 1e-4 would vanish in bfloat16.
        dtype = base.weight.dtype
        if dtype in HALF_DTYPES or not dtype.is_floating_point:
            dtype = torch.float32
        lam_b, lam_d = initial_lambdas(self.out_features, self.r, init_weights, d_initial, dtype, base.weight.device)
        self.vera_lambda_b = nn.Parameter(lam_b)
        self.vera_lambda_d = nn.Parameter(lam_d)
        self.merged = False
        self.train(base.training)  # the mode of the module it replaces (eval stays eval)
        self._lambda_init = (init_weights, float(d_initial))  # re-applied by to_empty (see _apply)

    @torch.no_grad()
    def reset_lambdas_(self) -> None:
        """Set the λ's to their initial values again (λ_b = 0, λ_d = ``d_initial``; PEFT's test init otherwise)."""
        init_weights, d_initial = self._lambda_init
        lam_b, lam_d = initial_lambdas(self.out_features, self.r, init_weights, d_initial, self.vera_lambda_d.dtype)
        self.vera_lambda_b.copy_(lam_b)
        self.vera_lambda_d.copy_(lam_d)

    def _apply(self, fn, recurse=True):
        was_meta = is_meta(self.vera_lambda_b)
        out = super()._apply(fn, recurse)
        if materialised([self.vera_lambda_b, self.vera_lambda_d], was_meta):  # to_empty: meta held no values
            self.reset_lambdas_()
        return out

    # ------------------------------------------------------------------ protocol
    @property
    def adapter(self) -> "VeraAdapter":
        """The model's adapter: config and the shared projections this layer slices."""
        return self._adapter[0]

    @property
    def foreign_base(self) -> Optional[nn.Module]:
        """The bitsandbytes layer called for ``W0 x`` (unregistered; ``None``: ``weight``/``bias`` alone)."""
        return self._foreign_base[0] if self._foreign_base is not None else None

    def set_foreign_base(self, module: Optional[nn.Module]) -> None:
        """Call ``module`` (a bitsandbytes layer over ``weight``, see ``quantize_base``) for ``W0 x``; or stop."""
        self._foreign_base = (module,) if module is not None else None  # a tuple: not a registered submodule

    def lambdas(self) -> tuple[nn.Parameter, nn.Parameter]:
        """``(λ_b, λ_d)`` of the active adapter (the only λ's the forward and ``merge`` read)."""
        name_b, name_d = self.active_lambda_names
        return getattr(self, name_b), getattr(self, name_d)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of the active adapter (its λ vectors), by their role."""
        return dict(zip(self.adapter_param_names, self.lambdas()))

    def __deepcopy__(self, memo: dict) -> "VeraLinear":
        return deepcopy_layer(self, memo)  # a quantized base weight is copied exactly, not re-quantized

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )

    @property
    def base_is_quantized(self) -> bool:
        """Whether ``weight`` is quantized (NF4/int8; see :mod:`vera_lightning.ops.quantize`): no merged forms."""
        return is_quantized_weight(self.weight)

    # ------------------------------------------------------------------ compute
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone (``W0 x + b``), as the original module computes it."""
        if self.base_is_quantized:
            return quantized_base_forward(self, x)
        if self.fan_in_fan_out:
            if self.bias is None:
                return x @ self.weight
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def sliced_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_s, B_s)`` on the λ's device, in the adapter's compute dtype (default: the λ's dtype)."""
        lam = self.vera_lambda_d
        dtype = self.adapter.compute_dtype or lam.dtype
        return self.adapter.sliced(self.in_features, self.out_features, dtype, lam.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_forward(x)
        return vera_forward(self, x)

    # ------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """``diag(λ_b) B_s diag(λ_d) A_s`` laid out like ``weight`` (computed in fp32 on CPU for half types)."""
        lam_b, lam_d = (lam.detach() for lam in self.lambdas())
        a_s, b_s = self.sliced_projections()
        compute_dtype = lam_d.dtype
        if lam_d.device.type == "cpu" and compute_dtype in HALF_DTYPES:
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
        if self.base_is_quantized:
            raise merge_refusal("merge", self.weight)
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
        if self.base_is_quantized:  # a QuantizedLinear (or the bitsandbytes layer); merging is refused
            return quantized_to_base(self, merge)
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

