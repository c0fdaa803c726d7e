"""training/resume.py: a checkpoint resumes only into the adapters it trained (issue 23, items 6 and 17).

Every checkpoint ``VeraCallback`` writes records the model's named adapters and the active one; the loader
checks them before anything loads, naming the fix (``set_adapter`` / ``add_adapter`` / ``delete_adapter``).
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import TinyOptModule, snapshot, trainer_kwargs

from vera_lightning import (
    VeraCallback,
    VeraConfig,
    add_adapter,
    apply_vera,
    find_adapter,
    load_vera_checkpoint,
    set_adapter,
)
from vera_lightning.core.lookup import vera_layers
from vera_lightning.training.resume import ADAPTERS_MARK
from vera_lightning.training.slim import install_slim_loading

CONFIG = VeraConfig(r=16, target_modules=["q_proj", "v_proj"], init_weights=False)


def _module(names=("b",), active=None, primary="default"):
    module = TinyOptModule()
    apply_vera(module, CONFIG, adapter_name=primary)
    for name in names:
        add_adapter(module, name, CONFIG)
    return set_adapter(module, active) if active else module


def _lambdas(module, name):
    attrs = find_adapter(module).lambda_names(name)
    return {f"{n}.{a}": getattr(layer, a).detach().clone() for n, layer in vera_layers(module) for a in attrs}


def _without_record(path, tmp_path):
    """The checkpoint at ``path`` as written before the adapters record existed."""
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]._metadata[""][ADAPTERS_MARK]
    torch.save(ckpt, tmp_path / "old.ckpt")
    return tmp_path / "old.ckpt"


@pytest.fixture(scope="module")
def trained_b(tmp_path_factory):
    """A slim checkpoint of 2 steps training adapter "b" (the model holds "default" and "b")."""
    tmp_path = tmp_path_factory.mktemp("trained_b")
    module = _module(active="b")
    trainer = pl.Trainer(max_steps=2, callbacks=[VeraCallback()], **trainer_kwargs(tmp_path))
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    return module, tmp_path / "b.ckpt"


def _resume(tmp_path, module, ckpt):
    pl.Trainer(max_steps=3, callbacks=[VeraCallback()], **trainer_kwargs(tmp_path)).fit(module, ckpt_path=ckpt)


def test_checkpoint_records_the_adapters_and_the_active_one(trained_b):
    _, ckpt = trained_b
    record = torch.load(ckpt, weights_only=True)["state_dict"]._metadata[""][ADAPTERS_MARK]
    assert record["primary"] == "default" and record["active"] == "b" and list(record["configs"]) == ["default", "b"]
    assert VeraConfig.from_dict(record["configs"]["b"]) == CONFIG


def test_resume_into_another_active_adapter_is_refused_before_loading(tmp_path, trained_b):
    """Item 6: "default" active would train with b's optimizer state; refused with the fix, nothing loaded."""
    trained, ckpt = trained_b
    fresh = _module()  # holds "b", but "default" is active
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*it trained adapter 'b' but the model's active "
                                         r"adapter is 'default'.*optimizer state of 'b'.*set_adapter\(model, 'b'\)"):
        _resume(tmp_path, fresh, ckpt)
    after = snapshot(fresh)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert find_adapter(fresh).active == "default"

    set_adapter(fresh, "b")  # the fix
    _resume(tmp_path, fresh, ckpt)
    assert not all(torch.equal(v, _lambdas(trained, "b")[k]) for k, v in _lambdas(fresh, "b").items())  # trained on
    assert all(torch.equal(v, _lambdas(trained, "default")[k]) for k, v in _lambdas(fresh, "default").items())


def test_resume_into_a_model_without_the_adapters_names_them(tmp_path, trained_b):
    """Item 17: not torch's "Unexpected key(s) ... vera_lambda_b_b", but which adapters and the fix."""
    _, ckpt = trained_b
    fresh = _module(names=())
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*it holds adapter\(s\) \['b'\] that TinyOptModule "
                                         r"does not \(the model holds \['default'\]\).*add_adapter\(model, 'b', "
                                         r"config\), then set_adapter\(model, 'b'\)"):
        _resume(tmp_path, fresh, ckpt)
    after = snapshot(fresh)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_other_adapter_sets_are_refused_with_the_fix(trained_b):
    """A model holding an adapter the checkpoint lacks (strict loads), or another primary adapter."""
    _, ckpt = trained_b
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    extra = _module(names=("b", "c"), active="b")
    install_slim_loading(extra)
    with pytest.raises(ValueError, match=r"holds adapter\(s\) \['c'\] that it does not: delete_adapter\(model, 'c'\)"):
        extra.load_state_dict(state)
    renamed = _module(names=("b",), active="b", primary="main")
    install_slim_loading(renamed)
    with pytest.raises(ValueError, match=r"its primary adapter .* is 'default', the model's is 'main': build the "
                                         r"model with apply_vera\(model, config, adapter_name='default'\)"):
        renamed.load_state_dict(state)


def test_checkpoints_without_the_record_still_load_and_name_missing_adapters(tmp_path, trained_b):
    trained, ckpt = trained_b
    old = _without_record(ckpt, tmp_path)
    fresh = _module(names=())
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*it holds the λ's of adapter\(s\) \['b'\] that "
                                         r"TinyOptModule does not.*add_adapter\(model, 'b', config\)"):
        _resume(tmp_path, fresh, old)
    fresh = _module(active="b")
    _resume(tmp_path, fresh, old)
    assert all(torch.equal(v, _lambdas(trained, "default")[k]) for k, v in _lambdas(fresh, "default").items())


@pytest.mark.parametrize("slim", [True, False])
def test_full_and_slim_checkpoints_record_the_adapters_and_load_outside_a_trainer(slim):
    """``load_vera_checkpoint`` rebuilds every recorded adapter, the trained one active; a full checkpoint refuses a
    model with another active adapter too."""
    trained = _module(names=("b", "c"), active="c")
    with torch.no_grad():
        for _, layer in vera_layers(trained):
            layer.vera_lambda_b_c.add_(1.0)
    checkpoint = {"state_dict": trained.state_dict()}
    VeraCallback(slim_checkpoints=slim).on_save_checkpoint(
        SimpleNamespace(global_step=1, current_epoch=0, is_global_zero=True), trained, checkpoint)
    if not slim:  # a full checkpoint records the (active adapter's) config in the callback's state
        checkpoint["callbacks"] = {"VeraCallback": {"config": CONFIG.to_dict()}}
    assert ("model.lm_head.weight" in checkpoint["state_dict"]) == (not slim)
    fresh = TinyOptModule()
    load_vera_checkpoint(fresh, checkpoint)
    adapter = find_adapter(fresh)
    assert adapter.names == ["default", "b", "c"] and adapter.active == "c" and adapter.primary == "default"
    for name in ("default", "b", "c"):
        assert all(torch.equal(v, _lambdas(trained, name)[k]) for k, v in _lambdas(fresh, name).items())
    other = _module(names=("b", "c"), active="b")
    install_slim_loading(other)
    with pytest.raises(ValueError, match=r"it trained adapter 'c' but the model's active adapter is 'b'"):
        other.load_state_dict(checkpoint["state_dict"])
