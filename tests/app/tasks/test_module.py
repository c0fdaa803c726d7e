"""LightningModules of the training app: parameter groups, schedule, metrics."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_bert, tiny_opt

from vera_lightning import VeraConfig, apply_vera
from vera_lightning.app.tasks.module import CausalLMModule, ClassificationModule, build_module, linear_warmup


def test_linear_warmup_then_linear_decay():
    factor = linear_warmup(warmup_steps=3, total_steps=10)
    assert [round(factor(s), 4) for s in range(11)] == [
        0.25, 0.5, 0.75, 1.0, 0.8571, 0.7143, 0.5714, 0.4286, 0.2857, 0.1429, 0.0,
    ]
    assert linear_warmup(0, 4)(0) == 1.0


def test_lambdas_and_head_get_their_own_learning_rates():
    torch.manual_seed(0)
    module = ClassificationModule(tiny_bert(), num_labels=2, lr=0.02, head_lr=0.003)
    apply_vera(module, VeraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    groups = {g["name"]: g for g in module.param_groups()}
    assert (groups["vera_lambdas"]["lr"], groups["heads"]["lr"]) == (0.02, 0.003)
    names = {id(p): n for n, p in module.named_parameters()}
    lambda_names = sorted(names[id(p)] for p in groups["vera_lambdas"]["params"])
    head_names = sorted(names[id(p)] for p in groups["heads"]["params"])
    assert len(lambda_names) == 2 * 2 * 2 and all("vera_lambda" in n for n in lambda_names)
    assert head_names == ["model.classifier.bias", "model.classifier.weight"]
    frozen = {id(p) for p in module.parameters() if not p.requires_grad}
    assert not frozen & {id(p) for g in groups.values() for p in g["params"]}


def test_fully_frozen_model_is_refused():
    model = tiny_opt()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*VeraCallback"):
        CausalLMModule(model).param_groups()


def test_bad_optimiser_settings_are_listed_together():
    with pytest.raises(ValueError) as info:
        build_module("causal_lm", tiny_opt(), {"lr": 0.0, "head_lr": -1.0, "warmup_ratio": 1.5})
    message = str(info.value)
    assert "optim.lr=0.0" in message and "optim.head_lr=-1.0" in message and "optim.warmup_ratio=1.5" in message
    with pytest.raises(ValueError, match="task='translation'"):
        build_module("translation", tiny_opt(), {})


def test_classification_metrics_match_a_hand_count():
    torch.manual_seed(0)
    module = ClassificationModule(tiny_bert(), num_labels=2)
    module.eval()
    ids = torch.randint(0, 96, (6, 5))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    with torch.no_grad():
        module.validation_step(batch, 0)
        preds = module.model(**batch).logits.argmax(-1)
    assert module.val_metrics["acc"].compute().item() == pytest.approx((preds == labels).float().mean().item())
    f1s = []
    for c in (0, 1):
        tp = ((preds == c) & (labels == c)).sum().item()
        denom = (preds == c).sum().item() + (labels == c).sum().item()
        f1s.append(2 * tp / denom if denom else 0.0)
    assert module.val_metrics["f1"].compute().item() == pytest.approx(sum(f1s) / 2)


def test_causal_lm_validation_loss_is_transformers_loss_over_the_scored_tokens():
    torch.manual_seed(0)
    module = CausalLMModule(tiny_opt())
    module.eval()
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    ids = torch.randint(4, 50, (2, 3, 7))
    expected, weights = [], []
    for rows in ids:  # two batches, different numbers of scored tokens: the mean is weighted by tokens
        labels = rows.clone()
        labels[0, :4] = -100
        labels[1, :2] = -100
        batch = {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": labels}
        with torch.no_grad():
            module.validation_step(batch, 0)
            expected.append(module.model(**batch).loss.item())
        weights.append(int((labels[:, 1:] != -100).sum()))
    mean = sum(e * w for e, w in zip(expected, weights)) / sum(weights)
    assert module.val_nll.compute().item() == pytest.approx(mean, rel=1e-5)
