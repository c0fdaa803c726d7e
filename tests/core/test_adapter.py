"""VeraAdapter (config, shared projections, caches) and find_adapter/locate_adapter, the one lookup."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import tiny_mlp, tiny_opt
from torch import nn

from vera_lightning import VeraAdapter, VeraConfig, apply_vera, find_adapter, unload_vera, vera_layers
from vera_lightning.core.lookup import locate_adapter


def test_save_projection_false_keeps_projections_out_of_the_state_dict():
    with pytest.warns(UserWarning):
        cfg = VeraConfig(r=8, target_modules=["q_proj"], save_projection=False)
    model = apply_vera(tiny_opt(), cfg)
    assert not any(k.endswith(("vera_A", "vera_B")) for k in model.state_dict())
    assert model.vera_projections.vera_A.shape == (8, 32)


def test_projections_sized_to_the_largest_layer_and_sliced():
    model = apply_vera(tiny_mlp(), VeraConfig(r=6, target_modules=["fc1", "fc2", "fc3"]))
    proj = model.vera_projections
    assert proj.vera_A.shape == (6, 40) and proj.vera_B.shape == (40, 6)
    a, b = model.fc3.sliced_projections()
    assert a.shape == (6, 24) and b.shape == (5, 6)
    assert a.data_ptr() == proj.vera_A.data_ptr() and b.data_ptr() == proj.vera_B.data_ptr()  # views, no copy


def test_adapter_owns_a_copy_of_its_config():
    cfg = VeraConfig(r=4, target_modules=["fc1"])
    adapter = VeraAdapter(cfg, max_in=12, max_out=40)
    cfg.d_initial = 0.5
    assert adapter.config.d_initial == 0.1 and adapter.config is not cfg
    with pytest.raises(AttributeError):
        adapter.config = cfg  # read-only: set at construction
    with pytest.raises(TypeError, match="expects a VeraConfig"):
        VeraAdapter({"r": 4}, max_in=12, max_out=40)


def test_find_adapter_for_the_model_and_for_any_part_of_it():
    assert find_adapter(tiny_opt()) is None and locate_adapter(nn.Linear(2, 2)) is None
    model = apply_vera(tiny_opt(), VeraConfig(r=4, target_modules=["q_proj"]))
    adapter = model.vera_projections
    assert locate_adapter(model) == ("vera_projections", adapter)
    inner = model.model.decoder.layers[1]  # a part whose layers refer to the root's adapter
    assert find_adapter(inner) is adapter and locate_adapter(inner) == ("", adapter)
    assert all(layer.adapter is adapter for _, layer in vera_layers(model))
    unload_vera(model)
    assert find_adapter(model) is None


def test_several_adapters_in_one_model_are_refused():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = tiny_mlp(), tiny_mlp()

    model = Two()
    apply_vera(model.a, VeraConfig(r=4, target_modules=["fc1"]))
    apply_vera(model.b, VeraConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"holds 2 separate VeRA adapters "
                                         r"\(\['a.vera_projections', 'b.vera_projections'\]\)"):
        find_adapter(model)


def test_cast_cache_follows_moves_and_in_place_changes():
    adapter = VeraAdapter(VeraConfig(r=4), max_in=6, max_out=5)
    cpu = torch.device("cpu")
    a16, _ = adapter.full(torch.bfloat16, cpu)
    assert adapter.full(torch.bfloat16, cpu)[0] is a16  # cached
    with torch.no_grad():
        adapter.vera_A.mul_(2)
    a16_new, _ = adapter.full(torch.bfloat16, cpu)
    assert a16_new is not a16 and torch.equal(a16_new, adapter.vera_A.to(torch.bfloat16))
    assert adapter.full(torch.float32, cpu)[0] is adapter.vera_A  # no copy in the buffers' own dtype
    clone = copy.deepcopy(adapter)
    assert torch.equal(clone.vera_A, adapter.vera_A) and clone.config == adapter.config
