"""DPO (app/tasks/dpo.py): the loss and its λ-gradients against an independent float64 DPO, the reference.

Modules: vera_lightning/app/tasks/dpo.py, vera_lightning/app/tasks/dpo_loss.py (and ``sequence_logps`` of
vera_lightning/app/tasks/lm_loss.py).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers.llm import byte_bpe_tokenizer, tiny_lm

from vera_lightning import VeraConfig, apply_vera, disable_adapter, save_adapter, vera_layers
from vera_lightning.app.data.preference_module import PreferenceDataModule
from vera_lightning.app.tasks.dpo import REFERENCE_NAME, DpoModule
from vera_lightning.app.tasks.dpo_loss import DpoSettings

PAIRS = [
    {"prompt": "name[The Eagle], food[French]", "chosen": "The Eagle is a French restaurant.",
     "rejected": "Hello there."},
    {"prompt": "Hello there, how are you?", "chosen": "I am fine.", "rejected": "The Eagle is by the riverside."},
    {"prompt": "Describe the restaurant:", "chosen": "The Eagle, by the riverside.", "rejected": "I am fine, yes."},
]
CONFIG = VeraConfig(r=8, target_modules=["q_proj", "v_proj"], projection_prng_key=3)


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer(chat=True)


def batch_of(tmp_path, tok, pairs=PAIRS):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = {"task": "causal_lm", "format": "preference", "preference_format": "pairs", "prompt_field": "prompt",
           "chosen_field": "chosen", "rejected_field": "rejected", "data_dir": str(tmp_path),
           "train_file": "train.jsonl", "val_file": "train.jsonl", "chat_template": True, "max_length": 64,
           "batch_size": len(pairs), "eval_batch_size": 2}
    dm = PreferenceDataModule(cfg, tok)
    dm.setup("fit")
    return dm, next(iter(dm.val_dataloader() if len(pairs) <= 2 else dm.ordered_loader("train", len(pairs))))


def adapted(tok, seed=1):
    model = tiny_lm("llama", len(tok))
    base = copy.deepcopy(model)
    apply_vera(model, CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a policy away from the base (λ_b starts at 0)
        for _, layer in vera_layers(model):
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, base


def float64_logps(model, batch):
    """log p(response | prompt) summed over the labelled tokens, with plain torch on a float64 copy."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def paper_loss(pc, pr, rc, rr, beta, eps=0.0, ipo=False):
    h = (pc - rc) - (pr - rr)
    if ipo:
        return ((h - 1 / (2 * beta)) ** 2).mean()
    log_sigmoid = lambda x: -torch.log1p(torch.exp(-x))  # noqa: E731
    return (-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)).mean()


@pytest.mark.parametrize("settings", [{"beta": 0.1, "label_smoothing": 0.0}, {"beta": 0.5, "label_smoothing": 0.2},
                                      {"beta": 0.3, "loss_type": "ipo"}])
def test_loss_and_lambda_gradients_equal_a_float64_dpo(tmp_path, tok, settings):
    model, base = adapted(tok)
    _, batch = batch_of(tmp_path, tok)
    module = DpoModule(model, settings).train()
    loss = module.loss(batch)
    loss.backward()
    lambdas = {n: p for n, p in model.named_parameters() if "vera_lambda" in n}
    assert lambdas and all(p.grad is not None for p in lambdas.values())

    policy64, base64 = copy.deepcopy(model).double(), base.double()
    for p in policy64.parameters():
        p.grad = None
    n = len(PAIRS)
    ipo = settings.get("loss_type") == "ipo"
    pol, count = float64_logps(policy64, batch)
    with torch.no_grad():
        ref, _ = float64_logps(base64, batch)
    if ipo:
        pol, ref = pol / count, ref / count
    expected = paper_loss(pol[:n], pol[n:], ref[:n], ref[n:], settings["beta"], settings.get("label_smoothing", 0.0),
                          ipo)
    expected.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    grads64 = dict(policy64.named_parameters())
    scale = max(g.grad.abs().max().item() for g in lambdas.values())
    assert scale > 0
    for name, p in lambdas.items():
        torch.testing.assert_close(p.grad.double(), grads64[name].grad, rtol=1e-4, atol=1e-5 * scale)
    # the base (everything but the λ's) gets no gradient
    assert all(p.grad is None for n_, p in model.named_parameters() if "vera_lambda" not in n_)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(tmp_path, tok):
    model = tiny_lm("opt", len(tok))
    apply_vera(model, CONFIG)  # λ_b = 0: the policy is the base, which is the reference
    _, batch = batch_of(tmp_path, tok)
    terms = DpoModule(model, {"beta": 0.1}).pair_terms(batch)
    torch.testing.assert_close(terms["loss"], torch.full((3,), math.log(2.0)))
    assert terms["rewards_chosen"].abs().max().item() == 0.0
    assert terms["reward_accuracy"].sum().item() == 0.0  # a tie is not ranked right


def test_sft_adapter_as_reference_gives_its_log_probs(tmp_path, tok):
    sft, _ = adapted(tok, seed=7)
    save_adapter(sft, tmp_path / "sft")
    _, batch = batch_of(tmp_path, tok)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    from vera_lightning.app.tasks.lm_loss import sequence_logps

    with torch.no_grad():
        expected = sequence_logps(sft, inputs)
        with disable_adapter(sft):
            base = sequence_logps(sft, inputs)

    model = tiny_lm("llama", len(tok))
    apply_vera(model, CONFIG)
    module = DpoModule(model, {"beta": 0.1}, reference_adapter=str(tmp_path / "sft"))
    module.setup("fit")
    module.setup("validate")  # idempotent
    adapter = model.vera_projections
    assert adapter.names == ["default", REFERENCE_NAME] and adapter.active == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if REFERENCE_NAME in n)
    ref = module.reference_logps(inputs)
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-6)
    assert (ref - base).abs().min().item() > 1e-3  # not the base's
    # the policy (default, λ_b = 0) is the base here, untouched by the reference
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, inputs), base, rtol=0, atol=1e-6)


def test_precomputed_reference_equals_the_per_step_one(tmp_path, tok):
    model, _ = adapted(tok)
    dm, _ = batch_of(tmp_path, tok)
    module = DpoModule(model, {"beta": 0.1, "precompute_reference": True})
    chosen, rejected = module.precompute(dm.ordered_loader("train", 2), len(dm.splits["train"]))
    module._precomputed = (chosen, rejected)
    for batch in dm.train_dataloader():  # shuffled, batches of 3
        on_the_fly = module.pair_terms(batch)
        cached = module.pair_terms(batch, precomputed=True)
        torch.testing.assert_close(cached["loss"], on_the_fly["loss"], rtol=1e-5, atol=1e-6)


def test_settings_are_checked_naming_option_value_and_fix():
    with pytest.raises(ValueError) as err:
        DpoSettings(beta=0.0, label_smoothing=0.7, loss_type="hinge", reference="sft")
    text = str(err.value)
    for piece in ("dpo.beta=0.0", "dpo.label_smoothing=0.7", "dpo.loss_type='hinge'", "dpo.reference='sft'"):
        assert piece in text
    with pytest.raises(ValueError, match="IPO has none"):
        DpoSettings(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"dpo\.betta: not a dpo setting"):
        DpoSettings.from_dict({"betta": 0.1})
    assert DpoSettings.from_dict({"beta": 1}).beta == 1.0
