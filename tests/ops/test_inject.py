"""Injection, freezing, idempotency, PEFT-equal targeting (merge and unload: test_merge.py).

Modules: vera_lightning/ops/targets.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import TINY_MODELS, tiny_bert, tiny_gpt2, tiny_mlp, tiny_opt
from helpers.peft_oracle import adapt_both

from vera_lightning import VeraConfig, apply_vera, count_parameters
from vera_lightning.core.lookup import vera_layers

KINDS = list(TINY_MODELS)


def _meta_roberta(layers: int, hidden: int):
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64,
                        intermediate_size=4 * hidden)
    with torch.device("meta"):
        return RobertaModel(cfg)


@pytest.mark.parametrize("layers, hidden, r, expected", [(12, 768, 1024, 43_008), (24, 1024, 256, 61_440)])
def test_trainable_parameters_equal_the_papers_table(layers, hidden, r, expected):
    model = apply_vera(_meta_roberta(layers, hidden), VeraConfig(r=r, target_modules=["query", "value"]))
    assert count_parameters(model)[0] == expected == layers * 2 * (hidden + r)


def test_base_state_dict_keys_unchanged_and_projections_stored_once():
    model = tiny_opt()
    before = set(model.state_dict())
    apply_vera(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj", "fc1"]))
    after = set(model.state_dict())
    assert before <= after
    added = after - before
    assert sum(k.endswith("vera_A") for k in after) == 1 and sum(k.endswith("vera_B") for k in after) == 1
    assert all(k.endswith(("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B")) for k in added)
    assert sum(k.endswith("vera_lambda_b") for k in added) == 6
    # a checkpoint of the un-adapted model loads without any remapping
    missing, unexpected = model.load_state_dict(tiny_opt().state_dict(), strict=False)
    assert not unexpected and all("vera" in k for k in missing)


@pytest.mark.parametrize("bias, expected_bias_keys", [
    ("none", set()),
    ("vera_only", {"q_proj.bias", "v_proj.bias"}),
    ("all", "every"),
])
def test_bias_modes_and_modules_to_save(bias, expected_bias_keys):
    model = apply_vera(tiny_bert(), VeraConfig(r=8, target_modules=["query", "value"], bias=bias,
                                               modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    lambdas = {n for n in trainable if "vera_lambda" in n}
    assert len(lambdas) == 8
    biases = {n for n in trainable - lambdas if n.endswith("bias") and not n.startswith("classifier")}
    if expected_bias_keys == "every":
        assert biases == {n for n, _ in model.named_parameters() if "bias" in n and not n.startswith("classifier")}
    elif bias == "vera_only":
        assert biases and all(n.endswith(("query.bias", "value.bias")) for n in biases)
    else:
        assert biases == set()
    assert trainable - lambdas - biases == {"classifier.weight", "classifier.bias"}


def test_apply_twice_is_a_no_op_and_a_different_config_is_refused():
    cfg = VeraConfig(r=8, target_modules=["q_proj", "v_proj"])
    model = apply_vera(tiny_opt(), cfg)
    layer = model.model.decoder.layers[0].self_attn.q_proj
    projections = model.vera_projections
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_vera(model, VeraConfig(r=8, target_modules=["v_proj", "q_proj"])) is model
    assert model.model.decoder.layers[0].self_attn.q_proj is layer and model.vera_projections is projections
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"already carries VeRA with a different config "
                                         r"\(option: \(model, given\)\) \{'r': \(8, 16\)\}"):
        apply_vera(model, VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))


def test_user_config_is_never_mutated():
    cfg = VeraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=False)
    snapshot = copy.deepcopy(cfg)
    with pytest.warns(UserWarning, match="transformers Conv1D .* using fan_in_fan_out=True"):
        model = apply_vera(tiny_gpt2(), cfg)
    assert cfg == snapshot and cfg.fan_in_fan_out is False
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out is True
    assert model.vera_projections.config is not cfg


def test_no_match_lists_candidates():
    with pytest.raises(ValueError) as info:
        apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["query"]))
    msg = str(info.value)
    assert "matches no nn.Linear/Conv1D in OPTForCausalLM" in msg
    for name in ("q_proj", "k_proj", "fc1", "lm_head"):
        assert name in msg


def test_default_targets_from_model_type_and_error_for_plain_modules():
    model = apply_vera(tiny_opt(), VeraConfig(r=8))
    assert {n.rsplit(".", 1)[-1] for n, _ in vera_layers(model)} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="target_modules=None and no default is known"):
        apply_vera(tiny_mlp(), VeraConfig(r=8))


@pytest.mark.parametrize("kind", KINDS)
def test_same_trainable_parameter_count(twin, kind):
    fields = {"modules_to_save": ["classifier"]} if kind == "bert" else {}
    ours, theirs = adapt_both(twin, kind, r=16, **fields)
    peft_trainable, _ = theirs.get_nb_trainable_parameters()
    assert count_parameters(ours)[0] == peft_trainable


def test_all_linear_matches_peft_on_causal_lm(twin):
    ours, theirs = adapt_both(twin, "opt", r=8, target_modules="all-linear")
    peft_names = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "vera_lambda_b")}
    assert {n for n, _ in vera_layers(ours)} == peft_names
    assert "lm_head" not in peft_names


@pytest.mark.parametrize("fields", [
    {"target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"},
    {"target_modules": ["q_proj", "fc2"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
])
def test_targeting_matches_peft(twin, fields):
    ours, theirs = adapt_both(twin, "opt", r=8, **fields)
    peft_names = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "vera_lambda_b")}
    assert {n for n, _ in vera_layers(ours)} == peft_names and peft_names
