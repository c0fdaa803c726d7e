"""finetune=vera|head|full: which parameters train, what is saved, and the baselines through train(cfg)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import tiny_bert
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from vera_lightning import VeraCallback, VeraConfig
from vera_lightning.app.commands.train import register_configs, train
from vera_lightning.app.tasks.finetune import prepare, save_trained
from vera_lightning.app.tasks.module import ClassificationModule

ROOT = Path(__file__).resolve().parents[3]
CONFIG = VeraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])


def trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_head_trains_only_modules_to_save_and_full_trains_everything():
    model = tiny_bert()
    assert prepare("head", model, CONFIG) == []
    assert trainable(model) == ["classifier.bias", "classifier.weight"]
    assert not any(n.startswith("bert.") for n in trainable(model))
    assert prepare("full", model, CONFIG) == [] and trainable(model) == sorted(n for n, _ in model.named_parameters())


def test_vera_leaves_the_model_to_the_callback():
    model = tiny_bert()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    (callback,) = prepare("vera", model, CONFIG)
    assert isinstance(callback, VeraCallback)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items()) and len(before) == len(
        model.state_dict())


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"finetune='lora': must be one of \['vera', 'head', 'full'\]"):
        prepare("lora", tiny_bert(), CONFIG)


def test_head_saves_exactly_the_trained_tensors(tmp_path):
    model = tiny_bert()
    prepare("head", model, CONFIG)
    save_trained("head", ClassificationModule(model, num_labels=2), tmp_path / "trained", "tiny-bert")
    saved = load_file(str(tmp_path / "trained" / "model.safetensors"))
    assert sorted(saved) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(saved["classifier.weight"], model.classifier.weight)


@pytest.mark.parametrize("method", ["head", "full"])
def test_baselines_run_through_train(tmp_path, method):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.output_dir={tmp_path}", f"finetune={method}", "trainer.max_steps=2", "data.max_train_samples=8",
            "data.max_val_samples=8", "data.batch_size=4", "callbacks=none", "eval_before=false",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"])
    metrics = train(cfg)
    saved = load_file(str(tmp_path / "adapter" / "model.safetensors"))
    assert metrics["steps"] == 2 and metrics["finetune"] == method
    if method == "head":
        assert metrics["trainable_params"] == 770 and sorted(saved) == ["classifier.bias", "classifier.weight"]
    else:  # no λ's anywhere: every weight of the base model trains
        assert metrics["trainable_params"] == metrics["total_params"] == sum(t.numel() for t in saved.values())
        assert not any("vera" in name for name in saved)
