"""``model.compile=true|false|auto`` (app/models/precision.py): what each value means, and a compiled body with VeRA
layers in bf16 traced in one graph, with the loss eager gives."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.models import tiny_llama

from vera_lightning import VeraConfig, apply_vera, set_projection_dtype
from vera_lightning.app.models.precision import compile_body, compile_wanted
from vera_lightning.app.tasks.lm_loss import response_loss


def test_values():
    assert compile_wanted(True) and not compile_wanted(False)
    assert compile_wanted("auto", cuda=True) and not compile_wanted("auto", cuda=False)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=rf"model.compile={bad!r}: use true, false or auto"):
            compile_wanted(bad)


def _adapted(dtype):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_vera(tiny_llama().to(dtype), VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    if dtype == torch.bfloat16:
        set_projection_dtype(model, torch.bfloat16)
    return model.train()


@pytest.mark.slow
def test_the_body_traces_without_graph_breaks_and_gives_the_eager_loss():
    import torch._dynamo as dynamo

    model = _adapted(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    explained = dynamo.explain(model.model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    eager = response_loss(model, batch)
    compile_body(model)
    compiled = response_loss(model, batch)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)  # bf16: fused kernels round differently
    assert model.model.layers[0].self_attn.q_proj.vera_lambda_d.grad.dtype == torch.float32
