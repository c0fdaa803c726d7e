"""``model.quantize`` / ``model.compute_dtype`` in the Hydra app: a quantized run end to end, its checkpoint, errors.

Modules: vera_lightning/app/models/load.py (build_model, build_tokenizer).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers.app import compose_app
from omegaconf import OmegaConf

from vera_lightning import VeraCallback, is_quantized, load_adapter
from vera_lightning.app.commands.train import train, vera_config_from
from vera_lightning.app.data.datamodules import build_datamodule
from vera_lightning.app.models.load import build_model, build_tokenizer
from vera_lightning.app.tasks.module import build_module
from vera_lightning.core.lookup import vera_layers
from vera_lightning.core.qtensor import weight_scheme
from vera_lightning.ops.quantize import quantized_layers

# tiny_opt at hidden 128: every linear holds a multiple of 64 values, as NF4 needs
WIDE = ["model.from_config.hidden_size=128", "model.from_config.word_embed_proj_dim=128",
        "model.from_config.ffn_dim=256"]


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)`` -> the real conf/train.yaml composed, writing under ``tmp_path / "run"``."""
    return lambda *overrides: compose_app("train", tmp_path / "run", *overrides)


def test_nf4_run_trains_reports_bytes_and_its_checkpoint_resumes(make_cfg, tmp_path, capsys):
    cfg = make_cfg("experiment=smoke", *WIDE, "model.quantize=nf4", "eval_before=false")
    metrics = train(cfg)

    out = capsys.readouterr().out
    assert "model in memory" in out and "model.quantize=nf4" in out
    assert 0 < metrics["quantized_bytes"] < metrics["model_bytes"]
    float_cfg = make_cfg("experiment=smoke", *WIDE)
    tokenizer = build_tokenizer(float_cfg.model)
    float_model = build_model(float_cfg.model, tokenizer)
    float_weights = sum(m.weight.numel() * 4 for n, m in float_model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # every linear but the tied head holds 4-bit values: 1/8 of its float32 bytes plus scales
    assert metrics["quantized_bytes"] < 0.14 * float_weights

    # the adapter of the quantized run loads into the float base of the same config
    load_adapter(float_model, metrics["adapter_dir"])
    assert not is_quantized(float_model) and len(list(vera_layers(float_model))) == 4

    # a (slim) checkpoint of a quantized run resumes into a freshly quantized model, which stays quantized
    data = OmegaConf.to_container(cfg.data, resolve=True)

    def fit(max_steps: int, ckpt_path=None):
        model = build_model(cfg.model, tokenizer)
        trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[VeraCallback(vera_config_from(cfg.vera))])
        trainer.fit(build_module("causal_lm", model, cfg.optim), datamodule=build_datamodule(data, tokenizer),
                    ckpt_path=ckpt_path)
        return trainer, model

    trainer, _ = fit(2)
    ckpt = tmp_path / "quantized.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any("vera_lambda" in k for k in saved)  # slim: the frozen (quantized) base is not saved
    assert not [k for k in saved if k.endswith(("proj.weight", "fc1.weight", "fc2.weight"))]
    trainer, model = fit(3, ckpt_path=str(ckpt))
    assert trainer.global_step == 3
    assert set(quantized_layers(model).values()) == {"nf4"} and len(quantized_layers(model)) == 12


def test_int8_and_bf16_compute_dtype(make_cfg):
    cfg = make_cfg("experiment=smoke", "model.quantize=int8", "model.compute_dtype=bf16")
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    layers = quantized_layers(model)
    assert len(layers) == 12 and set(layers.values()) == {"int8"}
    fc1 = model.model.decoder.layers[0].fc1
    assert fc1.weight.dtype == torch.bfloat16 and weight_scheme(fc1.weight) == "int8"
    assert model.model.decoder.embed_tokens.weight.dtype == torch.bfloat16


def test_bad_precision_values_fail_before_the_model_loads(make_cfg):
    cfg = make_cfg("experiment=smoke", "model.quantize=nf3", "model.compute_dtype=fp8")
    tokenizer = build_tokenizer(cfg.model)
    with pytest.raises(ValueError, match=r"(?s)model.compute_dtype='fp8': use one of \['auto', 'bf16', 'fp32'\].*"
                                         r"model.quantize='nf3': use one of \['nf4', 'int8'\] or null"):
        build_model(cfg.model, tokenizer)
    # tiny_opt at hidden 36, MLP 60: no weight holds a multiple of 64 values (NF4's block); said before training
    odd = ("model.from_config.hidden_size=36", "model.from_config.word_embed_proj_dim=36",
           "model.from_config.ffn_dim=60")
    with pytest.raises(ValueError, match="no layer of OPTForCausalLM can be quantized"), pytest.warns(UserWarning):
        train(make_cfg("experiment=smoke", "model.quantize=nf4", *odd))
