"""Quantized bases at the edges (quantize.py, qlinear.py): tied heads, ``skip=`` names, dequantize dtypes,
``load_state_dict`` across storage and ``save_pretrained`` (issue 23, items 7, 8, 9, 13).

Every refusal is checked twice: the message (option, value, fix) and that nothing changed (the stored
tensors, bit for bit, and the model's output).

Modules: vera_lightning/ops/quantize_state.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import model_inputs, tiny_opt
from torch import nn

from vera_lightning import VeraConfig, apply_vera, dequantize_base, is_quantized, quantize_base, unload_vera
from vera_lightning.core.lookup import vera_layers
from vera_lightning.core.qtensor import dequantize_weight, quantize_weight, weight_scheme
from vera_lightning.ops.quantize import quantized_layers

HIDDEN = 128  # NF4 needs multiples of 64 values per weight


def _adapted(seed: int = 0, scheme: str | None = None):
    """The issue's repro: a tiny OPT with VeRA on q/v (random λ's), quantized after apply_vera."""
    torch.manual_seed(seed)
    model = apply_vera(tiny_opt(HIDDEN), VeraConfig(r=16, target_modules=["q_proj", "v_proj"], init_weights=False))
    return quantize_base(model, scheme) if scheme else model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs("opt")).logits


def _snapshot(model) -> dict[str, tuple[str, list[torch.Tensor]]]:
    """Every parameter and buffer: its type and the tensors it is stored in (a quantized one's inner tensors)."""
    out = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        flatten = getattr(tensor, "__tensor_flatten__", None)
        inner = [getattr(tensor, n).clone() for n in flatten()[0]] if weight_scheme(tensor) else [tensor.clone()]
        out[name] = (type(tensor).__name__, inner)
    return out


def _assert_unchanged(model, snapshot, logits) -> None:
    now = _snapshot(model)
    assert now.keys() == snapshot.keys()
    for name, (kind, tensors) in snapshot.items():
        assert now[name][0] == kind, name
        assert all(torch.equal(a, b) for a, b in zip(now[name][1], tensors)), name
    assert torch.equal(_logits(model), logits)


# ---------------------------------------------------------------- 7: a tied head named in modules=
def test_a_tied_head_in_modules_is_refused_and_stays_tied():
    model = _adapted()
    before, logits = _snapshot(model), _logits(model)
    with pytest.raises(ValueError, match=(
            r"(?s)nothing was changed.*lm_head \(modules=\['lm_head'\]\): its weight is tied to "
            r"\['model.decoder.embed_tokens'\].*would untie them\. Leave it out of modules=\[\.\.\.\], or untie it "
            r"first: model.get_submodule\('lm_head'\).weight = torch.nn.Parameter\(.*tie_word_embeddings = False")):
        quantize_base(model, "int8", modules=["lm_head"])
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # still tied
    assert not is_quantized(model)
    _assert_unchanged(model, before, logits)

    # the fix in the message works: untied explicitly, the head quantizes and the embedding stays as it was
    embedding = model.model.decoder.embed_tokens.weight.detach().clone()
    model.get_submodule("lm_head").weight = torch.nn.Parameter(model.get_submodule("lm_head").weight.detach().clone())
    model.config.tie_word_embeddings = False
    quantize_base(model, "int8", modules=["lm_head"])
    assert quantized_layers(model) == {"lm_head": "int8"}
    assert weight_scheme(model.model.decoder.embed_tokens.weight) is None
    assert torch.equal(model.model.decoder.embed_tokens.weight, embedding)
    assert (_logits(model) - logits).abs().max() < 0.05 * logits.abs().max()  # int8 rounding of the head only


# ---------------------------------------------------------------- 8: skip= is validated like modules=
def test_a_skip_name_that_matches_nothing_is_refused():
    model = _adapted()
    before, logits = _snapshot(model), _logits(model)
    with pytest.raises(ValueError, match=(
            r"(?s)quantize_base\(scheme='int8'\) refused, nothing was changed.*skip=\['nothign'\]: \['nothign'\] "
            r"match no module of OPTForCausalLM.*candidates: \['fc1', 'fc2', 'k_proj', 'lm_head', 'out_proj', "
            r"'q_proj', 'v_proj'\]")):
        quantize_base(model, "int8", skip=["nothign"])
    with pytest.raises(ValueError, match=r"skip=\['layers.0.fc1', 'fc3'\]: \['fc3'\] match no module"):
        quantize_base(model, "int8", modules=["fc1"], skip=["layers.0.fc1", "fc3"])
    assert not is_quantized(model)
    _assert_unchanged(model, before, logits)


def test_skip_names_layers_or_modules_holding_them_and_applies_to_modules():
    model = quantize_base(_adapted(), "int8", skip=["fc1", "model.decoder.layers.1"])
    layers = quantized_layers(model)
    assert not any(n.endswith("fc1") or ".layers.1." in n for n in layers)
    assert sorted(layers) == [f"model.decoder.layers.0.{n}" for n in
                              ("fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj")]
    # a module without linear layers is a real name (nothing of it is quantized anyway): accepted
    assert quantized_layers(quantize_base(_adapted(), "int8", skip=["embed_tokens"])) == quantized_layers(
        quantize_base(_adapted(), "int8"))
    only = quantize_base(_adapted(), "int8", modules=["fc1"], skip=["layers.0"])
    assert quantized_layers(only) == {"model.decoder.layers.1.fc1": "int8"}


# ---------------------------------------------------------------- 9: dequantize dtypes
@pytest.mark.parametrize(("dtype", "error", "shown"), [
    (torch.int8, ValueError, "torch.int8"), ("int8", ValueError, "'int8'"), ("float32x", ValueError, "'float32x'"),
    (torch.float8_e4m3fn, ValueError, "torch.float8_e4m3fn"), (3, TypeError, "3"),
])
def test_dequantize_refuses_a_dtype_that_is_not_float(dtype, error, shown):
    model = _adapted(scheme="int8")
    before, logits = _snapshot(model), _logits(model)
    with pytest.raises(error, match=(
            rf"dequantize_base\(model, dtype\) got {shown}: a quantized weight dequantizes to a float dtype only; use "
            r"torch.float32, torch.bfloat16, torch.float16, torch.float64 or one of the strings \['float32', 'fp32', "
            r"'bfloat16', 'bf16', 'float16', 'fp16', 'float64', 'fp64'\] \(None keeps")):
        dequantize_base(model, dtype)
    assert set(quantized_layers(model).values()) == {"int8"}
    _assert_unchanged(model, before, logits)


@pytest.mark.parametrize(("name", "dtype"), [
    ("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), ("BF16", torch.bfloat16), ("torch.float64", torch.float64),
])
def test_dequantize_accepts_the_common_dtype_names(name, dtype):
    model = _adapted(scheme="int8")
    q_proj = model.model.decoder.layers[0].self_attn.q_proj
    expected = dequantize_weight(q_proj.weight).to(dtype)
    dequantize_base(model, name)
    assert not is_quantized(model)
    assert q_proj.weight.dtype == dtype and q_proj.bias.dtype == dtype and torch.equal(q_proj.weight, expected)


# ---------------------------------------------------------------- 13: load_state_dict across storage
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_float_state_dict_loads_into_a_quantized_model_quantized(scheme):
    source = _adapted(seed=1)  # other weights and λ's than the destination's
    model = _adapted(seed=0, scheme=scheme)
    expected = quantize_base(copy.deepcopy(source), scheme)  # what quantizing the source itself gives

    assert not model.load_state_dict(source.state_dict()).missing_keys

    assert quantized_layers(model) == quantized_layers(expected)
    for name in quantized_layers(model):
        got, want = model.get_submodule(name).weight, expected.get_submodule(name).weight
        assert type(got) is type(want) and not got.requires_grad
        assert torch.equal(dequantize_weight(got), dequantize_weight(want)), name
    assert torch.equal(_logits(model), _logits(expected))
    assert all(p.requires_grad == n.endswith(("vera_lambda_b", "vera_lambda_d")) for n, p in model.named_parameters())


def test_a_load_started_below_the_root_is_quantized_too():
    source = _adapted(seed=1)
    model = _adapted(seed=0, scheme="int8")
    attention, float_attention = model.model.decoder.layers[0].self_attn, source.model.decoder.layers[0].self_attn
    attention.load_state_dict(float_attention.state_dict())  # q/v: VeraLinear, k/out: QuantizedLinear
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        got = attention.get_submodule(name).weight
        want = quantize_weight(float_attention.get_submodule(name).weight, "int8")
        assert weight_scheme(got) == "int8" and torch.equal(dequantize_weight(got), dequantize_weight(want)), name


def test_another_quantization_or_an_integer_tensor_is_refused_before_anything_loads():
    model = _adapted(seed=0, scheme="int8")
    before, logits = _snapshot(model), _logits(model)
    nf4 = _adapted(seed=1, scheme="nf4").state_dict()
    with pytest.raises(ValueError, match=(
            r"(?s)load_state_dict refused, nothing of OPTForCausalLM was loaded:\n  - "
            r"model.decoder.layers.0.self_attn.k_proj.weight: the state dict holds a nf4 weight \(NF4Tensor\), this "
            r"model's is int8 \(Int8Tensor\); save the source's state dict after dequantize_base\(source_model\) "
            r"\(a float weight is quantized as it loads\), or quantize this model the same way: "
            r"dequantize_base\(model\), then quantize_base\(model, 'nf4'\).*\(12 problems in all\)")):
        model.load_state_dict(nf4)
    _assert_unchanged(model, before, logits)  # embeddings, biases and λ's too: the check runs before any copy

    ints = {k: v for k, v in _adapted(seed=1).state_dict().items()}
    ints["model.decoder.layers.1.fc2.weight"] = torch.ones(HIDDEN, 2 * HIDDEN, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"layers.1.fc2.weight: the state dict holds a torch.int32 tensor; a "
                                         r"quantized \(int8\) weight loads a float tensor"):
        model.load_state_dict(ints)
    # a load started below the root: the first quantized layer refuses (k_proj: nothing before it holds a tensor)
    with pytest.raises(ValueError, match=r"load_state_dict refused: self_attn.k_proj.weight: the state dict holds"):
        model.model.decoder.layers[1].load_state_dict(
            {k.removeprefix("model.decoder.layers.1."): v for k, v in nf4.items() if ".layers.1." in k})
    _assert_unchanged(model, before, logits)


# ---------------------------------------------------------------- 13: save_pretrained
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_save_pretrained_is_refused_with_the_fix_and_writes_nothing(scheme, tmp_path):
    model = _adapted(scheme=scheme)
    before, logits, config = _snapshot(model), _logits(model), model.config.to_dict()
    for owner in (model, model.model, copy.deepcopy(model)):  # the inner transformers model too, and a copy
        with pytest.raises(ValueError, match=(
                rf"save_pretrained refused, nothing was written: 12 linear weights of \w+ are quantized by "
                rf"quantize_base \({scheme}: .*\(12 in all\)\), which safetensors cannot store.*"
                r"save_adapter\(model, dir\).*dequantize_base\(model\).*"
                r"unload_vera\(model, merge=True\).save_pretrained\(dir\)")):
            owner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert model.config.to_dict() == config
    _assert_unchanged(model, before, logits)


def test_after_dequantize_save_pretrained_writes_the_trained_model(tmp_path):
    from transformers import OPTForCausalLM

    model = _adapted(scheme="int8")
    logits = _logits(model)
    dequantize_base(model)
    assert "save_pretrained" not in vars(model) and "save_pretrained" not in vars(model.model)
    merged = unload_vera(model, merge=True)
    assert not list(vera_layers(merged))
    merged.save_pretrained(tmp_path / "out")
    reloaded = OPTForCausalLM.from_pretrained(tmp_path / "out").eval()
    got = _logits(reloaded)
    assert (got - logits).abs().max() <= 1e-4 * logits.abs().max()


def test_nn_modules_without_save_pretrained_are_left_alone():
    net = quantize_base(nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)), "int8")
    assert not any("save_pretrained" in vars(m) for m in net.modules())
    state = net.state_dict()
    fresh = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    quantize_base(fresh, "int8").load_state_dict(state)  # the same quantization loads as it is
    assert all(torch.equal(dequantize_weight(fresh[i].weight), dequantize_weight(net[i].weight)) for i in (0, 2))
