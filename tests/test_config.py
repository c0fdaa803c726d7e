"""vera_lightning/config.py: every VeraConfig validation rule, checked on its message."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.models import MLP

from vera_lightning import VeraConfig, apply_vera
from vera_lightning.config import BiasMode


def test_defaults_match_the_issue_and_peft():
    import peft

    ours = VeraConfig()
    theirs = peft.VeraConfig()
    for field in ("r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                  "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform",
                  "layers_pattern"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.bias == "none" and isinstance(ours.bias, BiasMode)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"r": 0}, "r=0: must be a positive integer"),
    ({"r": -3}, "r=-3: must be a positive integer"),
    ({"r": 2.5}, "r=2.5: must be a positive integer"),
    ({"r": True}, "r=True: must be a positive integer"),
    ({"vera_dropout": 1.0}, "vera_dropout=1.0: must be a number with 0 <= vera_dropout < 1"),
    ({"vera_dropout": -0.1}, "vera_dropout=-0.1"),
    ({"bias": "some"}, "bias='some': must be one of 'none', 'all', 'vera_only'"),
    ({"layers_pattern": "layers"}, "layers_pattern='layers' requires layers_to_transform"),
    ({"target_modules": 3}, "target_modules=3: must be a list of module names"),
    ({"target_modules": []}, "target_modules=[]: empty"),
    ({"layers_to_transform": "0"}, "layers_to_transform='0': must be an int or a list of ints"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "encode the layers in the regex"),
    ({"d_initial": "big"}, "d_initial='big': must be a number"),
    ({"projection_prng_key": 1.5}, "projection_prng_key=1.5: must be an integer seed"),
    ({"save_projection": "yes"}, "save_projection='yes': must be True or False"),
    ({"modules_to_save": "classifier"}, "modules_to_save='classifier': must be a list of module names"),
])
def test_each_rule_has_a_clear_message(kwargs, fragment):
    with pytest.raises(ValueError, match="Invalid VeraConfig") as info:
        VeraConfig(**kwargs)
    assert fragment in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as info:
        VeraConfig(r=0, vera_dropout=2.0, bias="most", layers_pattern="h")
    message = str(info.value)
    for fragment in ("r=0", "vera_dropout=2.0", "bias='most'", "layers_pattern='h'"):
        assert fragment in message
    assert message.count("\n  - ") == 4


def test_save_projection_false_warns_not_errors():
    with pytest.warns(UserWarning, match="depends on regenerating them from projection_prng_key"):
        cfg = VeraConfig(save_projection=False)
    assert cfg.save_projection is False


def test_no_warning_by_default():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VeraConfig(target_modules=["q_proj"])


def test_list_targets_become_a_set_like_collection():
    cfg = VeraConfig(target_modules=["q_proj", "v_proj", "q_proj"])
    assert cfg.target_modules == {"q_proj", "v_proj"}
    assert VeraConfig(target_modules="all-linear").target_modules == "all-linear"


def test_round_trip_through_dict():
    cfg = VeraConfig(r=8, target_modules=["v", "q"], bias="vera_only", layers_to_transform=[1])
    data = cfg.to_dict()
    assert data["target_modules"] == ["q", "v"] and data["bias"] == "vera_only"
    assert VeraConfig.from_dict(copy.deepcopy(data)) == cfg
    with pytest.raises(ValueError, match=r"Unknown VeraConfig option\(s\) \['rank'\]"):
        VeraConfig.from_dict({"rank": 4})


def test_diff_names_what_differs_and_nothing_else():
    base = VeraConfig(r=8, target_modules=["q", "v"], modules_to_save=["head", "pooler"], layers_to_transform=[0, 1])
    same = VeraConfig(r=8, target_modules=["v", "q"], modules_to_save=["pooler", "head"], layers_to_transform=[1, 0])
    assert base.diff(same) == {}  # order of names and layer indices is not a difference
    assert VeraConfig(modules_to_save=[]).diff(VeraConfig()) == {}  # [] and None both mean "none"
    other = VeraConfig(r=16, target_modules=["q"], modules_to_save=["head", "pooler"], layers_to_transform=[0, 1],
                       d_initial=0.2)
    assert base.diff(other) == {"r": (8, 16), "target_modules": (["q", "v"], ["q"]), "d_initial": (0.1, 0.2)}
    assert base.diff(other, ignore=("d_initial", "target_modules")) == {"r": (8, 16)}


# ---------------------------------------------------------------------- finite, in range (issue 10, items 6, 12)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e308, 10**400])
def test_non_finite_or_huge_d_initial_is_refused(value):
    with pytest.raises(ValueError, match=r"d_initial=.*: must be a number, finite, with \|d_initial\| <= 3.4e\+38"):
        VeraConfig(d_initial=value)


@pytest.mark.parametrize("key", [2**64, -(2**63) - 1, 10**30])
def test_prng_key_outside_torch_range_is_refused(key):
    with pytest.raises(ValueError, match=r"projection_prng_key=.*integer seed in \[-2\*\*63, 2\*\*64\)"):
        VeraConfig(projection_prng_key=key)


def test_prng_key_range_ends_are_accepted_and_wrap_as_documented():
    low = VeraConfig(r=4, target_modules=["fc1"], projection_prng_key=-1)
    high = VeraConfig(r=4, target_modules=["fc1"], projection_prng_key=2**64 - 1)
    a, b = apply_vera(MLP(), low), apply_vera(MLP(), high)
    assert torch.equal(a.vera_projections.vera_A, b.vera_projections.vera_A)


def test_bad_regex_names_target_modules():
    with pytest.raises(ValueError, match=r"target_modules='\[': not a valid regular expression"):
        VeraConfig(target_modules="[")
