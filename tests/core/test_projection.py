"""The seeded draw of the shared projections: bit-identical to PEFT's for the same key."""

from __future__ import annotations

import pytest
import torch
from helpers.models import TINY_MODELS
from helpers.peft_oracle import adapt_both

from vera_lightning.core.projection import draw_projections

KINDS = list(TINY_MODELS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", [0, 1234])
def test_projections_bit_identical(twin, kind, key):
    ours, theirs = adapt_both(twin, kind, r=16, projection_prng_key=key)
    assert torch.equal(ours.vera_projections.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.vera_projections.vera_B, theirs.base_model.vera_B["default"])


def test_draw_is_a_pure_function_of_the_key_and_shape():
    a1, b1 = draw_projections(r=8, max_in=12, max_out=6, prng_key=5)
    a2, b2 = draw_projections(r=8, max_in=12, max_out=6, prng_key=5)
    a3, _ = draw_projections(r=8, max_in=12, max_out=6, prng_key=6)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, a3)
    bound_a, bound_b = (3 ** 0.5) * (2 ** 0.5) / 12 ** 0.5, (3 ** 0.5) * (2 ** 0.5) / 8 ** 0.5
    assert a1.abs().max() <= bound_a and b1.abs().max() <= bound_b and a1.dtype == torch.float32
