"""The shared frozen projections ``vera_A`` (r x max_in) and ``vera_B`` (max_out x r).

One :class:`VeraProjections` module is attached to the root of an adapted model, so the
state dict holds exactly one ``vera_A`` and one ``vera_B``. Each ``VeraLinear`` keeps an
unregistered reference to it and slices ``vera_A[:, :in]`` / ``vera_B[:out, :]``.

The draw is bit-identical to PEFT's ``VeraModel._init_vera_A_vera_B``: a CPU
``torch.Generator`` seeded with ``projection_prng_key``, Kaiming-uniform with gain
sqrt(2) in fan-in mode, ``vera_A`` first, then ``vera_B``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from vera_lightning.sharing import SiblingCache
from vera_lightning.states import is_meta, materialised

__all__ = ["VeraProjections", "kaiming_uniform_projection", "PROJECTIONS_ATTR"]

#: Attribute name of the projections module on the adapted model's root.
PROJECTIONS_ATTR = "vera_projections"


def kaiming_uniform_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Draw a float32 CPU matrix ~ U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    tensor = torch.empty(shape, dtype=torch.float32, device="cpu")
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """Holds the shared ``vera_A``/``vera_B`` buffers and hands out slices in the dtype asked for.

    Casts are cached: a bfloat16 model gets its bfloat16 copy once, not at every forward;
    the cache is dropped when the buffers are moved, replaced or modified in place.

    Args:
        r: Rank.
        max_in: Largest ``in_features`` among the adapted layers.
        max_out: Largest ``out_features`` among the adapted layers.
        prng_key: Seed of the CPU generator.
        persistent: Whether the buffers belong in the state dict (``save_projection``).

    Example::

        >>> p = VeraProjections(r=4, max_in=8, max_out=6, prng_key=0)
        >>> a, b = p.sliced(in_features=5, out_features=3, dtype=torch.float32, device=torch.device("cpu"))
        >>> tuple(a.shape), tuple(b.shape)
        ((4, 5), (3, 4))
    """

    def __init__(self, r: int, max_in: int, max_out: int, prng_key: int, persistent: bool = True) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(prng_key)
        vera_A = kaiming_uniform_projection((r, max_in), generator)
        vera_B = kaiming_uniform_projection((max_out, r), generator)
        self.register_buffer("vera_A", vera_A, persistent=persistent)
        self.register_buffer("vera_B", vera_B, persistent=persistent)
        self.r, self.max_in, self.max_out, self.prng_key = r, max_in, max_out, prng_key
        self.round_dtype: Optional[torch.dtype] = None  # half dtype the draw was rounded through (apply_vera)
        self._cast_cache: dict[tuple[torch.dtype, torch.device], tuple] = {}
        self.siblings = SiblingCache()  # lets q/k/v (gate/up) reuse one x A_s^T

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, prng_key={self.prng_key}"

    def full(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(vera_A, vera_B)`` in ``dtype`` on ``device`` (no copy when they already match)."""
        a, b = self.vera_A, self.vera_B
        if a.dtype == dtype and a.device == device:
            return a, b
        key = (dtype, device)
        stamp = (id(a), a._version, id(b), b._version)
        hit = self._cast_cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
            self._cast_cache = {key: hit}  # at most one extra copy is ever kept
        return hit[1], hit[2]

    def sliced(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vera_A[:, :in_features]`` and ``vera_B[:out_features, :]`` as views in ``dtype``."""
        a, b = self.full(dtype, device)
        return a[:, :in_features], b[:out_features, :]

    @torch.no_grad()
    def redraw_(self) -> None:
        """Draw ``vera_A``/``vera_B`` from ``prng_key`` again, into the buffers (in place)."""
        generator = torch.Generator(device="cpu").manual_seed(self.prng_key)
        for buf, shape in ((self.vera_A, (self.r, self.max_in)), (self.vera_B, (self.max_out, self.r))):
            fresh = kaiming_uniform_projection(shape, generator)
            buf.copy_(fresh.to(self.round_dtype) if self.round_dtype is not None else fresh)

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() drop the cached casts
        self._cast_cache = {}
        self.siblings.clear()
        was_meta = is_meta(self.vera_A)
        out = super()._apply(fn, recurse)
        if materialised([self.vera_A, self.vera_B], was_meta):  # to_empty: meta held no values, draw them
            self.redraw_()
        return out
