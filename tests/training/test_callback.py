"""VeraCallback: injection in setup, freezing, optimizer checks, strategies, LightningCLI."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import TinyOptModule, snapshot, trainer_kwargs
from lightning.pytorch.demos.boring_classes import BoringModel

from vera_lightning import VeraCallback, VeraConfig, apply_vera
from vera_lightning.core.lookup import vera_layers


def _fit(module, tmp_path, callback, **kw):
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, **kw))
    trainer.fit(module)
    return trainer


def test_fit_tiny_opt_changes_only_lambdas(tmp_path):
    module = TinyOptModule()
    before = snapshot(module)
    _fit(module, tmp_path, VeraCallback(r=16, target_modules=["q_proj", "v_proj"]), max_steps=3)
    after = module.state_dict()
    names = {n for n, _ in vera_layers(module)}
    assert names == {f"model.model.decoder.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}
    lambda_keys = {f"{n}.vera_lambda_{s}" for n in names for s in "bd"}
    assert set(after) - set(before) == lambda_keys | {"vera_projections.vera_A", "vera_projections.vera_B"}
    for key, value in before.items():  # every base tensor bit-identical
        assert torch.equal(after[key], value), key
    changed = {k for k in lambda_keys if k.endswith("_b") and not torch.equal(after[k], torch.zeros_like(after[k]))}
    assert changed == {k for k in lambda_keys if k.endswith("_b")}
    assert all(not p.requires_grad for n, p in module.named_parameters() if "vera_lambda" not in n)


def test_fit_boring_model(tmp_path):
    module = BoringModel()
    torch.manual_seed(0)
    before = snapshot(module)
    with pytest.warns(UserWarning, match=r"frozen parameter\(s\) \(layer.weight, layer.bias\)"):
        _fit(module, tmp_path, VeraCallback(r=8, target_modules=["layer"]), max_steps=2)
    assert torch.equal(module.layer.weight, before["layer.weight"])
    assert torch.equal(module.layer.bias, before["layer.bias"])
    assert not torch.equal(module.layer.vera_lambda_b, torch.zeros(2))


def test_setup_is_idempotent_across_stages(tmp_path):
    module = TinyOptModule()
    callback = VeraCallback(r=8, target_modules=["q_proj"])
    trainer = _fit(module, tmp_path, callback, max_steps=1, limit_val_batches=1)
    lam = module.model.model.decoder.layers[0].self_attn.q_proj.vera_lambda_b.detach().clone()
    trainer.validate(module, verbose=False)
    trainer.test  # noqa: B018 (attribute exists; validate ran setup a second time)
    assert sum(1 for _ in vera_layers(module)) == 2
    assert len([m for m in module.modules() if type(m).__name__ == "VeraAdapter"]) == 1
    assert torch.equal(module.model.model.decoder.layers[0].self_attn.q_proj.vera_lambda_b, lam)


def test_logs_trainable_count_once(tmp_path, caplog):
    module = TinyOptModule()
    callback = VeraCallback(r=8, target_modules=["q_proj", "v_proj"])
    with caplog.at_level(logging.INFO):
        trainer = _fit(module, tmp_path, callback, max_steps=1, limit_val_batches=1)
        trainer.validate(module, verbose=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("VeRA:")]
    # 4 layers x (32 + 8) = 160 trainable
    assert len(lines) == 1 and "r=8 on 4 layers; trainable params 160 of" in lines[0]


def test_nothing_matches_lists_candidates_and_route(tmp_path):
    module = TinyOptModule()
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"(?s)matches no nn.Linear.*q_proj.*configure_model\(\)"):
        _fit(module, tmp_path, VeraCallback(r=8, target_modules=["query"]), max_steps=1)
    assert not list(vera_layers(module))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


class ConfigureModelModule(TinyOptModule):
    """Builds (and adapts) its model in configure_model, after Callback.setup."""

    def __init__(self, config=None, adapt=True):
        pl.LightningModule.__init__(self)
        self.lr, self.with_scheduler, self.shuffle = 1e-2, False, False
        self.config, self.adapt, self.model = config, adapt, None

    def configure_model(self):
        if self.model is not None:
            return
        from helpers.models import tiny_opt

        torch.manual_seed(0)
        self.model = tiny_opt().train()
        if self.adapt:
            apply_vera(self.model, self.config)


def test_configure_model_route_is_validated_not_reinjected(tmp_path):
    config = VeraConfig(r=8, target_modules=["v_proj"])
    module = ConfigureModelModule(config)
    _fit(module, tmp_path, VeraCallback(config), max_steps=2)
    assert {n for n, _ in vera_layers(module)} == {f"model.model.decoder.layers.{i}.self_attn.v_proj" for i in (0, 1)}
    assert hasattr(module.model, "vera_projections") and not hasattr(module, "vera_projections")
    assert not torch.equal(module.model.model.decoder.layers[0].self_attn.v_proj.vera_lambda_b, torch.zeros(32))


def test_configure_model_route_without_apply_vera_raises(tmp_path):
    module = ConfigureModelModule(adapt=False)
    with pytest.raises(ValueError, match=r"configure_model\(\) ran but the model carries no VeRA"):
        _fit(module, tmp_path, VeraCallback(r=8, target_modules=["v_proj"]), max_steps=1)


def test_configure_model_route_config_mismatch(tmp_path):
    module = ConfigureModelModule(VeraConfig(r=8, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"different VeraConfig.*'r': \(8, 16\)"):
        _fit(module, tmp_path, VeraCallback(r=16, target_modules=["v_proj"]), max_steps=1)


class FrozenOnlyOptimizer(TinyOptModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.model.lm_head.parameters(), lr=0.1)


def test_no_lambda_in_optimizer_raises(tmp_path):
    with pytest.raises(ValueError, match=r"No VeRA λ .* in any of the 1 optimizer"):
        _fit(FrozenOnlyOptimizer(), tmp_path, VeraCallback(r=8, target_modules=["q_proj"]), max_steps=1)


def test_refuses_deepspeed_like_strategy():
    from vera_lightning.training.distributed import check_strategy  # the callback calls it in setup

    class DeepSpeedStrategy(pl.strategies.SingleDeviceStrategy):  # stand-in: deepspeed is not installed
        pass

    with pytest.raises(ValueError, match=r"DeepSpeedStrategy.*strategy='ddp'"):
        check_strategy(DeepSpeedStrategy(device=torch.device("cpu")))

    class HomeMadeStrategy(pl.strategies.ParallelStrategy):  # an unknown parallel strategy
        pass

    HomeMadeStrategy.__abstractmethods__ = frozenset()
    with pytest.raises(ValueError, match=r"strategy=HomeMadeStrategy\); use a single device, strategy='ddp'"):
        check_strategy(HomeMadeStrategy())
    for supported in (pl.strategies.DDPStrategy(), pl.strategies.FSDPStrategy(),
                      pl.strategies.ModelParallelStrategy()):
        check_strategy(supported)  # no error


def test_config_and_fields_are_exclusive():
    with pytest.raises(TypeError, match="pass one or the other"):
        VeraCallback(VeraConfig(r=8), r=16)
    with pytest.raises(TypeError, match="expects a VeraConfig, got int"):
        VeraCallback(5)


def test_lightning_cli_instantiates_callback(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_steps: 2\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        f"  limit_val_batches: 0\n  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: vera_lightning.VeraCallback\n"
        "      init_args:\n        r: 16\n        target_modules: [layer]\n        d_initial: 0.5\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(BoringModel, args=["fit", f"--config={config}"], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, VeraCallback)]
    assert callback.config.r == 16 and callback.config.target_modules == frozenset({"layer"})
    assert callback.config.d_initial == 0.5
    assert type(cli.model.layer).__name__ == "VeraLinear" and cli.trainer.global_step == 2
    assert not torch.equal(cli.model.layer.vera_lambda_b, torch.zeros(2))
