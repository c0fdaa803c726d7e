"""``model.compute_dtype=auto|fp32|bf16`` in the app (app/models/precision.py, app/models/load.py): a decided dtype
applied (float32 enforced too), load dtypes that contradict it refused, the bf16 training form, checkpoints that
move between precisions (the λ's are float32 in both)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers.app import compose_app
from helpers.models import tiny_bert
from omegaconf import OmegaConf

from vera_lightning import VeraCallback, configure_autotune
from vera_lightning.app.commands.train import vera_config_from
from vera_lightning.app.data.datamodules import build_datamodule
from vera_lightning.app.models import load, precision, precision_choice
from vera_lightning.app.models.load import build_model, build_tokenizer
from vera_lightning.app.models.trained_float32 import float32_masters
from vera_lightning.app.tasks.module import build_module
from vera_lightning.core.lookup import vera_layers
from vera_lightning.forward.precision import PrecisionChoice


@pytest.fixture
def make_cfg(tmp_path):
    return lambda *overrides: compose_app("train", tmp_path / "run", "experiment=smoke", *overrides)


def built(cfg):
    return build_model(cfg.model, build_tokenizer(cfg.model))


def fit(cfg, max_steps, ckpt_path=None):
    pl.seed_everything(0)  # the same random tiny base each time (train() seeds the same way)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[VeraCallback(vera_config_from(cfg.vera))])
    module = build_module("causal_lm", model, cfg.optim)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True), tokenizer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, model


def test_without_a_decided_dtype_build_model_decides_and_says_so(make_cfg, monkeypatch, caplog):
    for dtype in (torch.bfloat16, torch.float32):
        chosen = PrecisionChoice(dtype, "measured", (512, 32, 64), 2.0, 1.0 if dtype == torch.bfloat16 else 4.0)
        monkeypatch.setattr(precision_choice, "measure_precision", lambda model, device, c=chosen, **k: c)
        with caplog.at_level(logging.INFO, logger=load.__name__):
            model = built(make_cfg("model.compute_dtype=auto"))
        assert model.lm_head.weight.dtype == dtype
        assert (f"precision: {'bf16-base' if dtype == torch.bfloat16 else 'fp32'} (model.compute_dtype=auto on cpu, "
                "trainer.precision=32-true: measured 2.00 ms fp32") in caplog.text
        assert "decided by build_model (the caller passed no compute_dtype)" in caplog.text


def test_auto_with_tuning_off_is_float32(make_cfg):  # the suite runs with VERA_LIGHTNING_AUTOTUNE=0
    assert built(make_cfg("model.compute_dtype=auto")).lm_head.weight.dtype == torch.float32


def test_a_decided_dtype_is_applied_and_nothing_is_decided(make_cfg, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("decided again")

    monkeypatch.setattr(load, "decide_precision", never)
    cfg = make_cfg("model.compute_dtype=auto")
    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = build_model(cfg.model, build_tokenizer(cfg.model), compute_dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {expected}
    with pytest.raises(ValueError, match=r"build_model\(compute_dtype='auto'\): pass a decided dtype"):
        build_model(cfg.model, build_tokenizer(cfg.model), compute_dtype="auto")


def bf16_checkpoint(tmp_path):
    """A tiny BERT classifier saved in bf16 (as a bf16 merged export is), with a tokenizer stand-in."""
    torch.manual_seed(0)
    tiny_bert().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    return {"task": "classification", "name_or_path": str(tmp_path / "bf16"), "compute_dtype": "fp32",
            "modules_to_save": ["classifier"]}, SimpleNamespace(pad_token_id=0)


def test_fp32_is_enforced_on_a_model_that_loads_in_bf16(tmp_path):
    model_cfg, tokenizer = bf16_checkpoint(tmp_path)
    for kwargs in ({}, {"compute_dtype": "fp32"}):
        model = build_model(model_cfg, tokenizer, num_labels=2, **kwargs)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    stored = build_model({**model_cfg, "from_pretrained_kwargs": {"dtype": "bfloat16"}}, tokenizer, num_labels=2,
                         compute_dtype="bf16")  # the same dtype as the compute dtype: loads straight into it
    assert stored.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert stored.classifier.weight.dtype == torch.float32  # modules_to_save: a float32 master


@pytest.mark.parametrize("key, value, compute", [("dtype", "float16", "fp32"), ("torch_dtype", "bfloat16", "fp32"),
                                                 ("dtype", "float32", "bf16"), ("dtype", "bfloat16", "auto")])
def test_a_load_dtype_that_contradicts_the_compute_dtype_is_refused(tmp_path, key, value, compute):
    model_cfg, tokenizer = bf16_checkpoint(tmp_path)
    cfg = {**model_cfg, "compute_dtype": compute, "from_pretrained_kwargs": {key: value}}
    with pytest.raises(ValueError, match=rf"model.from_pretrained_kwargs.{key}={value} conflicts with "
                                         rf"model.compute_dtype={compute}: .*remove from_pretrained_kwargs.{key}"):
        build_model(cfg, tokenizer, num_labels=2)


def test_apply_precision_applies_and_never_decides():
    torch.manual_seed(0)
    model = tiny_bert()
    head = model.classifier.weight.detach().clone()
    precision.apply_precision(model, torch.bfloat16, None, ["classifier"])
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    assert model.classifier.weight.dtype == torch.float32 and torch.equal(model.classifier.weight, head)  # unrounded
    assert set(float32_masters(model)) == {"classifier.weight", "classifier.bias"}
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16  # used in the base's dtype
    precision.apply_precision(model, "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match=r"apply_precision\(dtype='auto'\): apply a decided dtype"):
        precision.apply_precision(model, "auto")
    with pytest.raises(ValueError, match=r"model.quantize='nf3'"):
        precision.apply_precision(model, "fp32", "nf3")


def test_the_bf16_form_in_training_and_checkpoints_across_precisions(make_cfg, tmp_path):
    bf16 = make_cfg("model.compute_dtype=bf16")
    trainer, model = fit(bf16, 2)
    layer = next(layer for _, layer in vera_layers(model))
    assert layer.weight.dtype == torch.bfloat16
    assert {layer.vera_lambda_b.dtype, layer.vera_lambda_d.dtype} == {torch.float32}
    assert layer.adapter.compute_dtype == torch.bfloat16  # projections used in the base's dtype
    state = trainer.optimizers[0].state
    assert {t.dtype for s in state.values() for t in s.values() if t.dim()} == {torch.float32}
    ckpt = tmp_path / "bf16.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert {v.dtype for k, v in saved.items() if "vera_lambda" in k} == {torch.float32}

    fp32 = make_cfg("model.compute_dtype=fp32")  # the bf16 run's checkpoint resumes in float32 ...
    trainer, model = fit(fp32, 3, ckpt_path=str(ckpt))
    layer = next(layer for _, layer in vera_layers(model))
    assert trainer.global_step == 3 and layer.weight.dtype == torch.float32
    assert layer.adapter.compute_dtype is None
    ckpt32 = tmp_path / "fp32.ckpt"
    trainer.save_checkpoint(ckpt32)
    trainer, model = fit(bf16, 4, ckpt_path=str(ckpt32))  # ... and a float32 one in bf16
    layer = next(layer for _, layer in vera_layers(model))
    assert trainer.global_step == 4 and layer.vera_lambda_d.dtype == torch.float32
    assert torch.isfinite(layer.vera_lambda_b).all()


def test_tuning_on_measures_and_caches_in_the_tuners_file(make_cfg, tmp_path):
    cache = tmp_path / "autotune.json"
    with configure_autotune(enabled=True, cache_file=cache):
        model = built(make_cfg("model.compute_dtype=auto"))
    assert model.lm_head.weight.dtype in (torch.bfloat16, torch.float32)
    assert '"precision cpu n512' in cache.read_text() and ' warm"' in cache.read_text()
