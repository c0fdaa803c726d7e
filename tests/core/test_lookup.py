"""core/lookup.py: one walk finds the adapter, its layers and the PEFT root; a save looks the adapter up once.

"One lookup" means one call, during the whole operation, of any lookup function of
:mod:`vera_lightning.core.lookup` (``find_adapted``, ``locate_adapter``, ``find_adapter``, ``vera_layers``,
``adapter_root``): each walks ``named_modules`` once and calls none of the others. The ``lookups`` fixture
wraps them with a counter wherever a module of the package has imported them (its own module included), so
a lookup hidden in any helper a save calls is counted.
"""

from __future__ import annotations

import functools
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers.lightning import TinyOptModule
from helpers.models import tiny_mlp
from safetensors import safe_open

from vera_lightning import VeraCallback, VeraConfig, adapter_root, apply_vera, save_adapter, vera_layers
from vera_lightning.core import lookup
from vera_lightning.core.lookup import find_adapted, find_adapter, locate_adapter
from vera_lightning.training.slim import SLIM_MARK

WEIGHTS = "adapter_model.safetensors"
LOOKUPS = ("find_adapted", "locate_adapter", "find_adapter", "vera_layers", "adapter_root")
CONFIG = dict(r=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def lookups(monkeypatch):
    """The names of the lookup functions called, in order (every binding in the package counts)."""
    calls: list[str] = []
    originals = {name: getattr(lookup, name) for name in LOOKUPS}

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    wrappers = {name: counting(name, fn) for name, fn in originals.items()}
    patched = 0
    for module_name, module in list(sys.modules.items()):
        if module_name != "vera_lightning" and not module_name.startswith("vera_lightning."):
            continue
        for attr, value in list(vars(module).items()):
            for name, fn in originals.items():
                if value is fn:
                    monkeypatch.setattr(module, attr, wrappers[name])
                    patched += 1
    assert patched > len(LOOKUPS)  # the lookup module itself, and the modules that use it
    return calls


def adapted_module() -> TinyOptModule:
    module = TinyOptModule()
    apply_vera(module, VeraConfig(**CONFIG))  # as VeraCallback.setup does: the adapter on the LightningModule
    return module


def test_one_walk_finds_what_the_single_lookups_find():
    module = adapted_module()
    found = find_adapted(module)
    assert (found.name, found.adapter) == locate_adapter(module) == ("vera_projections", find_adapter(module))
    assert found.layers == tuple(vera_layers(module)) and len(found.layers) == 4
    assert find_adapted(tiny_mlp()) is None

    inner = found.at_root()  # the transformers model, as adapter_root picks it; names relative to it
    assert inner.module is adapter_root(module) is module.model
    assert inner.layers == tuple(vera_layers(module.model))
    assert (inner.name, inner.adapter) == locate_adapter(module.model) == ("", found.adapter)
    assert find_adapted(module.model).at_root() == find_adapted(module.model)


def test_save_adapter_looks_the_adapter_up_once(lookups, tmp_path):
    model = adapted_module().model
    lookups.clear()
    save_adapter(model, tmp_path / "adapter")
    assert lookups == ["find_adapted"]
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("slim, adapter_dir", [(True, True), (True, False), (False, True)])
def test_on_save_checkpoint_looks_the_adapter_up_once(lookups, tmp_path, slim, adapter_dir):
    module = adapted_module()
    callback = VeraCallback(adapter_dir=str(tmp_path / "adapters") if adapter_dir else None, slim_checkpoints=slim)
    trainer = SimpleNamespace(global_step=3, current_epoch=0, is_global_zero=True)
    checkpoint = {"state_dict": module.state_dict()}
    lookups.clear()
    callback.on_save_checkpoint(trainer, module, checkpoint)
    assert lookups == ["find_adapted"]
    assert (SLIM_MARK in checkpoint) == slim
    assert (len(checkpoint["state_dict"]) < len(module.state_dict())) == slim  # the frozen base dropped
    if adapter_dir:  # written relative to the transformers model, as save_adapter(adapter_root(module)) writes it
        save_adapter(module.model, tmp_path / "direct")
        written, direct = tmp_path / "adapters" / "epoch=0-step=3", tmp_path / "direct"
        assert (written / "adapter_config.json").read_text() == (direct / "adapter_config.json").read_text()
        with safe_open(str(written / WEIGHTS), "pt") as a, safe_open(str(direct / WEIGHTS), "pt") as b:
            assert a.metadata() == b.metadata()  # the same checksums (safetensors orders the header freely)
            assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k))
                                                                for k in a.keys())
    else:
        assert not (tmp_path / "adapters").exists()


def test_a_layer_reached_first_outside_the_root_is_named_from_the_root():
    module = adapted_module()
    shared = torch.nn.Module()
    shared.first = module.model.model.decoder.layers[1]  # reached first outside the transformers model
    shared.model = module.model
    found = find_adapted(shared)
    assert sorted(n for n, _ in found.layers)[:2] == ["first.self_attn.q_proj", "first.self_attn.v_proj"]
    assert found.at_root().module is module.model
    assert found.at_root().layers == tuple(vera_layers(module.model))
