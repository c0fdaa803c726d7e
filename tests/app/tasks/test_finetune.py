"""finetune=vera|head|full: which parameters train, in which dtype, what is saved, and the baselines through train(cfg).

The precision probe: over a bf16 base (the bf16 training form) everything that trains (λ's, the classifier head,
trained biases) and its AdamW state is float32, and is saved as F32; ``full`` trains float32 weights (bf16 comes as
``bf16-mixed`` autocast).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.models import tiny_bert
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from vera_lightning import VeraCallback, VeraConfig
from vera_lightning.app.commands.train import register_configs, train
from vera_lightning.app.models.precision import apply_precision
from vera_lightning.app.models.trained_float32 import float32_masters
from vera_lightning.app.tasks.finetune import TrainedInFloat32, prepare, save_trained
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
    callback, float32 = prepare("vera", model, CONFIG)
    assert isinstance(callback, VeraCallback) and isinstance(float32, TrainedInFloat32)  # in this order
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


class Probe(pl.Callback):
    """What trained, in which dtype: the trainable parameters, their AdamW state, and the head's output in training."""

    def on_train_start(self, trainer, pl_module):
        self.head_out = []
        self.handle = pl_module.model.classifier.register_forward_hook(
            lambda module, args, out: self.head_out.append(out.dtype))

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()
        names = {id(p): n for n, p in pl_module.model.named_parameters()}
        self.trained = {n: p.dtype for n, p in pl_module.model.named_parameters() if p.requires_grad}
        self.frozen = {p.dtype for p in pl_module.model.parameters() if not p.requires_grad}
        self.state = {names[id(p)]: {t.dtype for t in s.values() if t.dim()}
                      for p, s in trainer.optimizers[0].state.items()}


def fit_tiny_bert(method, model, config=CONFIG, precision="32-true"):
    rows = [{"input_ids": torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(i)),
             "attention_mask": torch.ones(10, dtype=torch.long), "labels": torch.tensor(i % 2)} for i in range(8)]
    probe = Probe()
    module = ClassificationModule(model.train(), num_labels=2)
    trainer = pl.Trainer(max_steps=3, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*prepare(method, model, config), probe])
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=4))
    return module, probe


def saved_dtypes(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_slice(key).get_dtype() for key in f.keys()}


@pytest.mark.parametrize("head_kept", [True, False], ids=["built", "arrived-bf16"])
def test_vera_over_a_bf16_base_trains_and_saves_everything_trained_in_float32(tmp_path, head_kept):
    """The head as build_model leaves it (a float32 master), or arriving bf16 (cast up in setup, before AdamW)."""
    config = VeraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"], bias="vera_only")
    torch.manual_seed(0)
    model = apply_precision(tiny_bert(), "bf16", None, ["classifier"] if head_kept else [])
    module, probe = fit_tiny_bert("vera", model, config)
    assert {n for n in probe.trained if "vera_lambda" not in n} == {
        "classifier.weight", "classifier.bias", *(f"bert.encoder.layer.{i}.attention.self.{m}.bias"
                                                  for i in (0, 1) for m in ("query", "value"))}
    assert set(probe.trained.values()) == {torch.float32} and probe.frozen == {torch.bfloat16}
    assert set(probe.state) == set(probe.trained) and all(d == {torch.float32} for d in probe.state.values())
    assert set(probe.head_out) == {torch.bfloat16}  # the head computes in the base's dtype (its master, rounded)
    assert set(float32_masters(model)) == set(probe.trained) - {n for n in probe.trained if "vera_lambda" in n}
    save_trained("vera", module, tmp_path / "adapter", "tiny-bert")
    saved = saved_dtypes(tmp_path / "adapter" / "adapter_model.safetensors")
    assert [k for k in saved if "classifier" in k] and set(saved.values()) == {"F32"}


def test_head_over_a_bf16_base_trains_float32_masters(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert().to(torch.bfloat16)
    module, probe = fit_tiny_bert("head", model)
    assert probe.trained == {"classifier.weight": torch.float32, "classifier.bias": torch.float32}
    assert all(d == {torch.float32} for d in probe.state.values()) and len(probe.state) == 2
    assert probe.frozen == {torch.bfloat16}
    save_trained("head", module, tmp_path / "trained", "tiny-bert")
    assert saved_dtypes(tmp_path / "trained" / "model.safetensors") == {"classifier.weight": "F32",
                                                                        "classifier.bias": "F32"}


def test_full_trains_float32_weights_under_bf16_autocast(tmp_path):
    torch.manual_seed(0)
    module, probe = fit_tiny_bert("full", tiny_bert(), precision="bf16-mixed")
    assert len(probe.trained) == len(list(module.model.parameters())) and set(probe.trained.values()) == {torch.float32}
    assert set(probe.state) == set(probe.trained) and all(d == {torch.float32} for d in probe.state.values())
    assert set(probe.head_out) == {torch.bfloat16}  # the products ran under autocast
    save_trained("full", module, tmp_path / "trained", "tiny-bert")
    assert set(saved_dtypes(tmp_path / "trained" / "model.safetensors").values()) == {"F32"}


def test_full_on_a_model_that_arrives_in_bf16_is_cast_back_with_a_warning():
    model = apply_precision(tiny_bert(), "bf16", None, ["classifier"])
    with pytest.warns(UserWarning, match=r"finetune=full trains every weight in float32, but the model arrived in "
                                         r"torch.bfloat16 .* decide_precision\(..., finetune='full'\)"):
        prepare("full", model, CONFIG)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and float32_masters(model) == {}
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.float32


@pytest.mark.parametrize("method", ["vera", "full"])
def test_train_with_compute_dtype_bf16_saves_what_trained_in_float32(tmp_path, method):
    """The default model (MiniLM, a classifier head in modules_to_save) through train(cfg) in bf16."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.output_dir={tmp_path}", f"finetune={method}", "model.compute_dtype=bf16", "trainer.max_steps=2",
            "data.max_train_samples=8", "data.max_val_samples=8", "data.batch_size=4", "callbacks=none",
            "eval_before=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"])
    train(cfg)
    saved = saved_dtypes(tmp_path / "adapter" / ("adapter_model.safetensors" if method == "vera" else
                                                 "model.safetensors"))
    assert [k for k in saved if "classifier" in k] and set(saved.values()) == {"F32"}
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["precision"]["scheme"] == ("bf16-base" if method == "vera" else "bf16-mixed")
