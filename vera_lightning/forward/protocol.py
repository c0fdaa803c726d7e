"""What a path may read of an adapted layer, the names of the paths, and the dtypes they treat as half.

The modules of :mod:`vera_lightning.forward` compute a layer's output from what :class:`AdaptedLayer`
lists, never from the layer class itself (:class:`~vera_lightning.VeraLinear` satisfies it), so
the forward floor sits below the layer that calls it and imports nothing of it.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional, Protocol

import torch
from torch import nn

__all__ = ["VeraPath", "AdaptedLayer", "HALF_DTYPES"]

#: The half-precision dtypes: λ's of such models are kept in float32, products widened on the CPU,
#: projections possibly rounded through one of them (the one definition, for every floor above).
HALF_DTYPES = (torch.float16, torch.bfloat16)


class VeraPath(str, Enum):
    """An autograd path of the VeRA update (compares equal to its string)."""

    auto = "auto"
    plain = "plain"
    lean = "lean"
    save_h = "save_h"
    merged = "merged"
    nograd = "nograd"  # chosen, never set: autograd does not record
    mixed = "mixed"  # forced by adapter_batch, never set
    off = "off"  # forced by disable_adapter, never set

    def __str__(self) -> str:
        return self.value


class AdaptedLayer(Protocol):
    """The part of a VeRA layer the paths read (see :class:`vera_lightning.VeraLinear` for each attribute)."""

    in_features: int
    out_features: int
    r: int
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    fan_in_fan_out: bool
    training: bool
    vera_dropout: nn.Module
    vera_path: VeraPath
    vera_memory: str
    vera_lambda_b: torch.Tensor
    vera_lambda_d: torch.Tensor

    @property
    def adapter(self) -> Any:
        """The layer's adapter (``siblings``, ``forced_path``, ``batch``)."""

    @property
    def base_is_quantized(self) -> bool:
        """Whether ``weight`` is quantized (no merged forms)."""

    def lambdas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The active adapter's ``(λ_b, λ_d)``."""

    def sliced_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_s, B_s)`` in the compute dtype."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x + b``."""
