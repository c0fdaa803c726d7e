"""Slim Lightning checkpoints: contents, size, exact resume; adapters written next to checkpoints."""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import TinyOptModule, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from vera_lightning import (
    VeraCallback,
    VeraConfig,
    apply_vera,
    checkpoint_config,
    load_adapter,
    load_vera_checkpoint,
)
from vera_lightning.core.lookup import vera_layers

TARGETS = ["q_proj", "v_proj"]


def _lambdas(module):
    return {f"{n}.{k}": p.detach().clone()
            for n, layer in vera_layers(module) for k, p in layer.adapter_params().items()}


def _fit(tmp_path, module, ckpt_path=None, callbacks=(), **kw):
    trainer = pl.Trainer(callbacks=list(callbacks), **trainer_kwargs(tmp_path, **kw))
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _epoch_checkpoints(tmp_path, shuffle=False, **vera):
    """Train 2 epochs (4 steps each) saving after every epoch; return (module, trainer, ckpt dir)."""
    ckpt_dir = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}-{step}")
    module = TinyOptModule(with_scheduler=True, shuffle=shuffle)
    trainer = _fit(tmp_path, module, callbacks=[VeraCallback(r=16, target_modules=TARGETS, **vera), saver],
                   max_epochs=2, enable_checkpointing=True)
    return module, trainer, ckpt_dir


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory):
    """One 2-epoch run with per-epoch checkpoints, shared by the tests that only read its checkpoints."""
    return _epoch_checkpoints(tmp_path_factory.mktemp("epoch_run"))


@pytest.mark.parametrize("shuffle", [False, True])
def test_ckpt_holds_adapter_only_and_resumes_bit_exactly(tmp_path, shuffle, epoch_run):
    module, trainer, ckpt_dir = epoch_run if not shuffle else _epoch_checkpoints(tmp_path, shuffle=True)
    assert sorted(os.listdir(ckpt_dir)) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    ckpt = torch.load(ckpt_dir / "epoch=0-step=4.ckpt", weights_only=True)
    lambda_keys = set(_lambdas(module))
    assert set(ckpt["state_dict"]) == lambda_keys | {"vera_projections.vera_A", "vera_projections.vera_B"}
    assert ckpt["vera_lightning"]["config"]["r"] == 16 and ckpt["vera_lightning"]["dropped"] > 0
    assert len(ckpt["optimizer_states"][0]["state"]) == len(lambda_keys)

    resumed = TinyOptModule(with_scheduler=True, shuffle=shuffle)
    cb = VeraCallback(r=16, target_modules=TARGETS)
    trainer2 = _fit(tmp_path / "b", resumed, ckpt_path=ckpt_dir / "epoch=0-step=4.ckpt", callbacks=[cb], max_epochs=2)
    assert trainer2.global_step == trainer.global_step == 8
    expected, got = _lambdas(module), _lambdas(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (trainer2.lr_scheduler_configs[0].scheduler.get_last_lr()
            == trainer.lr_scheduler_configs[0].scheduler.get_last_lr())
    state_a, state_b = trainer.optimizers[0].state_dict()["state"], trainer2.optimizers[0].state_dict()["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)
    base_a = {k: v for k, v in module.state_dict().items() if k not in lambda_keys}
    base_b = resumed.state_dict()
    assert all(torch.equal(base_b[k], v) for k, v in base_a.items())


def test_resume_without_the_callback_fails_loudly(tmp_path, epoch_run):
    _, _, ckpt_dir = epoch_run
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*vera_lambda"):
        _fit(tmp_path / "b", TinyOptModule(with_scheduler=True), ckpt_path=ckpt_dir / "epoch=0-step=4.ckpt",
             max_epochs=2)


def test_resume_with_other_config_refused_before_loading(tmp_path, epoch_run):
    _, _, ckpt_dir = epoch_run
    module = TinyOptModule(with_scheduler=True)
    with pytest.raises(ValueError, match=r"different VeraConfig .*'r': \(16, 8\)"):
        _fit(tmp_path / "b", module, ckpt_path=ckpt_dir / "epoch=0-step=4.ckpt",
             callbacks=[VeraCallback(r=8, target_modules=TARGETS)], max_epochs=2)
    assert all(torch.equal(p, torch.zeros_like(p)) for k, p in _lambdas(module).items() if k.endswith("_b"))


def test_full_checkpoints_still_load(tmp_path):
    module, trainer, ckpt_dir = _epoch_checkpoints(tmp_path, slim_checkpoints=False)
    ckpt = torch.load(ckpt_dir / "epoch=0-step=4.ckpt", weights_only=True)
    assert "model.lm_head.weight" in ckpt["state_dict"] and "vera_lightning" not in ckpt
    resumed = TinyOptModule(with_scheduler=True)
    _fit(tmp_path / "b", resumed, ckpt_path=ckpt_dir / "epoch=0-step=4.ckpt",
         callbacks=[VeraCallback(r=16, target_modules=TARGETS)], max_epochs=2)
    expected, got = _lambdas(module), _lambdas(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_save_projection_false_keeps_projections_out(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, ckpt_dir = _epoch_checkpoints(tmp_path, save_projection=False)
    ckpt = torch.load(ckpt_dir / "epoch=0-step=4.ckpt", weights_only=True)
    assert all("vera_lambda" in k for k in ckpt["state_dict"])


def test_adapter_written_next_to_each_checkpoint(tmp_path):
    module, _, _ = _epoch_checkpoints(tmp_path, adapter_dir=str(tmp_path / "adapters"))
    assert sorted(os.listdir(tmp_path / "adapters")) == ["epoch=0-step=4", "epoch=1-step=8"]
    fresh = TinyOptModule().model
    load_adapter(fresh, tmp_path / "adapters" / "epoch=1-step=8")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    module.eval()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, module.model(input_ids=ids).logits)


class BigOptModule(pl.LightningModule):
    """OPT-125m's shapes (hidden 768, 12 layers, ffn 3072, vocab 50272), random weights."""

    def __init__(self):
        super().__init__()
        from transformers import OPTConfig, OPTForCausalLM

        cfg = OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)
        self.model = OPTForCausalLM(cfg)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    def train_dataloader(self):
        ids = torch.randint(0, 50272, (2, 4), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=1)


@pytest.mark.slow
def test_opt125m_shaped_checkpoint_is_under_2mb(tmp_path):
    torch.manual_seed(0)
    module = BigOptModule()
    full_bytes = sum(p.numel() * p.element_size() for p in module.parameters())  # tied lm_head once
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    _fit(tmp_path, module, callbacks=[VeraCallback(r=256, target_modules=TARGETS), saver], max_steps=1,
         enable_checkpointing=True)
    size = os.path.getsize(tmp_path / "ckpt" / "last.ckpt")
    print(f"OPT-125m-shaped q,v r=256 .ckpt: {size / 1e6:.3f} MB (full model {full_bytes / 1e6:.0f} MB)")
    assert full_bytes > 450e6
    assert size < 2_000_000


def test_validate_from_slim_checkpoint(tmp_path, epoch_run):
    module, _, ckpt_dir = epoch_run
    fresh = TinyOptModule()
    trainer = pl.Trainer(callbacks=[VeraCallback(r=16, target_modules=TARGETS)],
                         **trainer_kwargs(tmp_path, limit_val_batches=1))
    (metrics,) = trainer.validate(fresh, ckpt_path=ckpt_dir / "epoch=1-step=8.ckpt", verbose=False)
    expected, got = _lambdas(module), _lambdas(fresh)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    ids = next(iter(fresh.val_dataloader()))[0]
    with torch.no_grad():
        assert metrics["val_loss"] == pytest.approx(module.model.eval()(input_ids=ids, labels=ids).loss.item(),
                                                    abs=1e-6)


@pytest.mark.parametrize("slim", [True, False])
def test_a_vera_checkpoint_loads_outside_a_trainer(slim):
    """``load_vera_checkpoint``: a freshly built module gets VeRA from the recorded config, then the λ's."""
    trained = TinyOptModule()
    config = VeraConfig(r=8, target_modules=TARGETS, init_weights=False)  # non-trivial λ's
    callback = VeraCallback(config, slim_checkpoints=slim)
    apply_vera(trained, config)
    checkpoint = {"state_dict": trained.state_dict()}
    callback.on_save_checkpoint(SimpleNamespace(global_step=1, current_epoch=0, is_global_zero=True), trained,
                                checkpoint)
    if not slim:  # a full checkpoint records the config in the callback's state
        checkpoint["callbacks"] = {"VeraCallback": callback.state_dict()}
    assert checkpoint_config(checkpoint) == config
    fresh = TinyOptModule()
    assert load_vera_checkpoint(fresh, checkpoint) == config
    assert _lambdas(fresh).keys() == _lambdas(trained).keys()
    assert all(torch.equal(a, b) for a, b in zip(_lambdas(fresh).values(), _lambdas(trained).values()))

    assert checkpoint_config({"state_dict": {}}) is None and checkpoint_config([]) is None
    with pytest.raises(ValueError, match=r"not a checkpoint written with VeraCallback \(no VeRA config marker\)"):
        load_vera_checkpoint(TinyOptModule(), {"state_dict": {}})
    other = dict(checkpoint, state_dict={**checkpoint["state_dict"], "unexpected.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"(?s)Unexpected key.*unexpected\.weight"):
        load_vera_checkpoint(TinyOptModule(), other)
