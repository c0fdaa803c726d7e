"""A stand-in sibling group the autotuner times: the real paths on synthetic tensors of the group's shape.

:class:`GroupProbe` captures, in the caller's thread, what a group's forward depends on (dims,
dtypes, bias, whether ``x`` needs a gradient, autocast); :meth:`GroupProbe.build` allocates the
stand-in layers and returns ``run(path)``: one forward and backward of the whole group on that
path, through the same path table as a real layer (``apply``, passed in by
:mod:`vera_lightning.forward.dispatch`), synchronised on CUDA. The stand-ins have their own
adapter (their own :class:`~vera_lightning.forward.sharing.SiblingCache`), so the model's sibling
state is never touched; their values come from a private generator, so the global RNG stream is
not consumed either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vera_lightning.forward.protocol import AdaptedLayer, VeraPath
from vera_lightning.forward.sharing import SiblingCache

__all__ = ["GroupProbe", "Apply"]

#: ``apply(layer, x, path) -> output``: the path table's entry for ``path`` (base forward included).
Apply = Callable[[AdaptedLayer, torch.Tensor, VeraPath], torch.Tensor]


class _ProbeAdapter:
    """What the paths read of an adapter: the sibling cache, no forced path, the projection slices."""

    forced_path = None

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b
        self.siblings = SiblingCache()

    def sliced(self, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a[:, :in_features], self.b[:out_features]


class _ProbeLayer:
    """A stand-in satisfying :class:`~vera_lightning.forward.protocol.AdaptedLayer` (training, no dropout)."""

    fan_in_fan_out = False
    training = True
    merged = False
    base_is_quantized = False
    vera_dropout = nn.Identity()

    def __init__(self, adapter: _ProbeAdapter, weight, bias, lam_b, lam_d, memory: str) -> None:
        self._adapter = adapter
        self.weight, self.bias = weight, bias
        self.vera_lambda_b, self.vera_lambda_d = lam_b, lam_d
        self.out_features, self.in_features = weight.shape
        self.r = lam_d.shape[0]
        self.vera_path = VeraPath.lean
        self.vera_memory = memory

    @property
    def adapter(self) -> _ProbeAdapter:
        return self._adapter

    def lambdas(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_lambda_b, self.vera_lambda_d

    def sliced_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._adapter.sliced(self.in_features, self.out_features)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class GroupProbe:
    """The shape and dtypes of one sibling group, to time its paths on synthetic tensors.

    Attributes:
        tokens: Rows of the synthetic ``x``.
        in_features, outs, r: The group's dims.
        x_dtype, base_dtype, lam_dtype: Dtypes of the input, the frozen weights, the λ's.
        bias: Whether the layers have a bias.
        grad_x: Whether ``x`` requires grad.
        memory: The memory preference (read by nothing that changes the work; kept for fidelity).
        device: Where to allocate.
        autocast: The autocast dtype the caller runs under, or ``None``.
    """

    tokens: int
    in_features: int
    outs: tuple[int, ...]
    r: int
    x_dtype: torch.dtype
    base_dtype: torch.dtype
    lam_dtype: torch.dtype
    bias: bool
    grad_x: bool
    memory: str
    device: torch.device
    autocast: Optional[torch.dtype]
    proj_dtype: Optional[torch.dtype] = None  # the projections' dtype (``None``: the λ's)

    @classmethod
    def of(cls, layer: AdaptedLayer, x: torch.Tensor, tokens: int, outs: tuple[int, ...]) -> "GroupProbe":
        """The probe for the group ``layer`` leads on ``x`` (called in the forward's thread: autocast is per thread)."""
        lam_dtype = layer.lambdas()[1].dtype
        base_dtype = layer.weight.dtype if layer.weight.dtype.is_floating_point else lam_dtype
        dev = x.device.type
        autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        proj_dtype = layer.sliced_projections()[0].dtype
        return cls(tokens, layer.in_features, tuple(outs), layer.r, x.dtype, base_dtype, lam_dtype,
                   layer.bias is not None, x.requires_grad, layer.vera_memory, x.device, autocast,
                   proj_dtype if proj_dtype != lam_dtype else None)

    def build(self, apply: Apply) -> Callable[[str], None]:
        """Allocate the stand-in group; returns ``run(path)`` (one forward + backward of every member)."""
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(0)

        def randn(*shape, dtype, scale=1.0):
            return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dtype)

        proj = self.proj_dtype or self.lam_dtype
        adapter = _ProbeAdapter(randn(self.r, self.in_features, dtype=proj, scale=self.in_features ** -0.5),
                                randn(max(self.outs), self.r, dtype=proj, scale=self.r ** -0.5))
        layers = []
        for out in self.outs:
            weight = randn(out, self.in_features, dtype=self.base_dtype, scale=self.in_features ** -0.5)
            bias = torch.zeros(out, device=dev, dtype=self.base_dtype) if self.bias else None
            lam_b = torch.full((out,), 0.1, device=dev, dtype=self.lam_dtype, requires_grad=True)
            lam_d = randn(self.r, dtype=self.lam_dtype).requires_grad_(True)
            layers.append(_ProbeLayer(adapter, weight, bias, lam_b, lam_d, self.memory))
        x = randn(self.tokens, self.in_features, dtype=self.x_dtype).requires_grad_(self.grad_x)

        def run(path: str) -> None:
            chosen = VeraPath(path)
            with torch.autocast(dev.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                for layer in layers:
                    layer.vera_path = chosen
                outputs = [apply(layer, x, chosen) for layer in layers]
                total = sum(y.float().sum() for y in outputs)
            total.backward()
            x.grad = None
            for layer in layers:
                layer.vera_lambda_b.grad = layer.vera_lambda_d.grad = None
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        return run
