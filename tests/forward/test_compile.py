"""torch.compile of a tiny injected model: same outputs and λ-gradients as eager."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_opt

from vera_lightning import VeraConfig, apply_vera
from vera_lightning.core.lookup import vera_layers


def _model():
    torch.manual_seed(0)
    return apply_vera(tiny_opt(), VeraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "fc1"],
                                             init_weights=False))


def _step(model, run, ids):
    model.zero_grad(set_to_none=True)
    out = run(input_ids=ids).logits
    out.square().mean().backward()
    return out.detach(), {n: l.vera_lambda_d.grad.clone() for n, l in vera_layers(model)}


@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo + AOT autograd tracing, no C++ toolchain needed (a few seconds)
    pytest.param("inductor", marks=pytest.mark.slow),  # generates and compiles C++ (about a minute on CPU)
])
def test_compiled_model_matches_eager(backend):
    torch._dynamo.reset()
    model = _model()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    ref_out, ref_grads = _step(model, model, ids)
    compiled = torch.compile(model, backend=backend)
    out, grads = _step(model, compiled, ids)
    assert ref_out.abs().max() > 0
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
