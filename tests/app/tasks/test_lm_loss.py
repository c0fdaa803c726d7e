"""app/tasks/lm_loss.py: the response-only causal-LM loss equals transformers' own loss, value and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_gpt2, tiny_llama, tiny_opt

from vera_lightning.app.tasks.lm_loss import response_loss, takes_plain_head

BUILDERS = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}


def batch_with_prompts(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, :8] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_equals_transformers_loss_and_gradients(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind]().train()
    assert takes_plain_head(model)
    batch = batch_with_prompts()
    reference = model(**batch).loss
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = response_loss(model, batch)
    ours.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_bf16_model_loss_is_float32_and_close_to_the_float32_loss():
    torch.manual_seed(0)
    model = tiny_llama().train()
    batch = batch_with_prompts(1)
    full = response_loss(model, batch)
    half = response_loss(model.to(torch.bfloat16), batch)
    assert half.dtype == torch.float32
    assert abs(half.item() - full.item()) < 0.02 * full.item()


def test_a_batch_with_nothing_scored_gives_zero_with_gradients():
    model = tiny_llama().train()
    batch = batch_with_prompts()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = response_loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0


def test_other_heads_fall_back_to_the_models_own_loss():
    model = tiny_llama().train()
    model.config.model_type = "gemma2"  # soft-capped logits: not a plain head
    assert not takes_plain_head(model)
    batch = batch_with_prompts()
    assert response_loss(model, batch).item() == model(**batch).loss.item()


def test_a_packed_batch_gives_the_padded_loss_through_the_plain_head():
    """Packed rows carry ``use_cache=False`` (see app/data/packing.py); the split body + head path passes it once."""
    from vera_lightning.app.data.packing import collate, pack
    from vera_lightning.app.tasks.lm_loss import sequence_logps

    torch.manual_seed(0)
    model = tiny_llama().double()
    assert takes_plain_head(model)
    g = torch.Generator().manual_seed(2)
    items = []
    for _ in range(6):
        ids = torch.randint(0, 96, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    packed, padded = collate(pack(items, max_length=40), pad_id=0), collate(items, pad_id=0)
    assert packed["use_cache"] is False
    with torch.no_grad():
        assert response_loss(model, packed).item() == pytest.approx(response_loss(model, padded).item(), rel=1e-6)
        assert sequence_logps(model, packed).sum().item() == pytest.approx(
            sequence_logps(model, padded).sum().item(), rel=1e-6)  # float32 logits (lm_loss casts)
