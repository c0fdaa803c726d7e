"""``model.compute_dtype=auto|fp32|bf16`` in the app (app/models/precision.py): the measured choice, the bf16
training form, checkpoints that move between precisions (the λ's are float32 in both)."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers.app import compose_app

from vera_lightning import VeraCallback, configure_autotune
from vera_lightning.app.commands.train import vera_config_from
from vera_lightning.app.data.datamodules import build_datamodule
from vera_lightning.app.models import precision
from vera_lightning.app.models.load import build_model, build_tokenizer
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
                         enable_model_summary=False, callbacks=[VeraCallback(vera_config_from(cfg))])
    module = build_module("causal_lm", model, cfg.optim)
    trainer.fit(module, datamodule=build_datamodule(dict(cfg.data), tokenizer), ckpt_path=ckpt_path)
    return trainer, model


def test_auto_takes_the_measured_choice_and_logs_it(make_cfg, monkeypatch, caplog):
    for dtype in (torch.bfloat16, torch.float32):
        chosen = PrecisionChoice(dtype, "measured", (512, 32, 64), 2.0, 1.0 if dtype == torch.bfloat16 else 4.0)
        monkeypatch.setattr(precision, "measure_precision", lambda model, device, c=chosen: c)
        with caplog.at_level(logging.INFO, logger=precision.__name__):
            model = built(make_cfg("model.compute_dtype=auto"))
        assert model.lm_head.weight.dtype == dtype
        assert f"precision auto: {chosen.name} (measured" in caplog.text


def test_auto_with_tuning_off_is_float32(make_cfg):  # the suite runs with VERA_LIGHTNING_AUTOTUNE=0
    assert built(make_cfg("model.compute_dtype=auto")).lm_head.weight.dtype == torch.float32


def test_explicit_bf16_where_it_measured_slower_warns_with_the_slowdown(make_cfg, monkeypatch):
    slow = PrecisionChoice(torch.float32, "measured", (512, 32, 64), 2.0, 100.0)
    monkeypatch.setattr(precision, "measure_precision", lambda model, device: slow)
    with pytest.warns(UserWarning, match=r"model.compute_dtype=bf16 is 50.0x slower than float32 on this CPU"):
        built(make_cfg("model.compute_dtype=bf16"))


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
    assert '"precision cpu n512' in cache.read_text()
