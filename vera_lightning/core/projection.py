"""The seeded draw of the shared random projections ``vera_A`` (r x max_in) and ``vera_B`` (max_out x r).

The draw is bit-identical to PEFT's ``VeraModel._init_vera_A_vera_B``: a CPU ``torch.Generator``
seeded with ``projection_prng_key``, Kaiming-uniform with gain sqrt(2) in fan-in mode, ``vera_A``
first, then ``vera_B``. The projections are owned by :class:`vera_lightning.core.adapter.VeraAdapter`,
which hands out the per-layer slices ``vera_A[:, :in]`` / ``vera_B[:out, :]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["kaiming_uniform_projection", "draw_projections", "PRNG_KEY_RANGE"]

#: Seeds a CPU ``torch.Generator`` accepts (negative keys wrap around: -1 draws what 2**64 - 1 draws).
PRNG_KEY_RANGE = (-(2**63), 2**64)


def kaiming_uniform_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Draw a float32 CPU matrix ~ U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    tensor = torch.empty(shape, dtype=torch.float32, device="cpu")
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, max_in: int, max_out: int, prng_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vera_A, vera_B)`` of shapes ``(r, max_in)`` and ``(max_out, r)``, float32 on the CPU.

    Example::

        >>> a, b = draw_projections(r=4, max_in=8, max_out=6, prng_key=0)
        >>> tuple(a.shape), tuple(b.shape)
        ((4, 8), (6, 4))
    """
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_A = kaiming_uniform_projection((r, max_in), generator)
    vera_B = kaiming_uniform_projection((max_out, r), generator)
    return vera_A, vera_B
