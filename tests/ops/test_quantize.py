"""VeRA over a quantized frozen base (quantize.py, qlinear.py): training, gradients, storage, adapters, errors."""

from __future__ import annotations

import pytest
import torch
from helpers.models import model_inputs, tiny_bert, tiny_gpt2, tiny_opt
from torch import nn

from vera_lightning import (
    VeraConfig,
    apply_vera,
    dequantize_base,
    is_quantized,
    load_adapter,
    merge_vera,
    model_bytes,
    quantize_base,
    record_paths,
    save_adapter,
    set_vera_path,
    unload_vera,
)
from vera_lightning.core.lookup import vera_layers
from vera_lightning.core.qlinear import QuantizedLinear
from vera_lightning.core.qtensor import dequantize_weight, tensor_bytes, weight_scheme
from vera_lightning.ops.quantize import quantized_layers

SCHEMES = ["nf4", "int8"]
TARGETS = ["q_proj", "v_proj"]


def _cfg(**fields) -> VeraConfig:
    return VeraConfig(**{"r": 16, "target_modules": TARGETS, "init_weights": False, **fields})


HIDDEN = 128  # NF4 needs multiples of 64 values per weight


def _opt(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_opt(HIDDEN)


def _model(scheme: str | None, order: str = "after", seed: int = 0, **fields):
    """A tiny OPT (same weights for the same seed) with VeRA, quantized after (or before) apply_vera."""
    model = _opt(seed)
    if scheme and order == "before":
        quantize_base(model, scheme)
    apply_vera(model, _cfg(**fields))
    if scheme and order == "after":
        quantize_base(model, scheme)
    return model


def _loss(model, inputs):
    return model(**inputs, labels=inputs["input_ids"]).loss


def _train(model, steps: int = 10, lr: float = 5e-2) -> list[float]:
    inputs = model_inputs("opt")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = _loss(model, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _storage(weight) -> list[torch.Tensor]:
    names, _ = weight.__tensor_flatten__()
    return [getattr(weight, n).clone() for n in names]


def _lambda_grads(model) -> torch.Tensor:
    return torch.cat([torch.cat([l.vera_lambda_b.grad, l.vera_lambda_d.grad]) for _, l in vera_layers(model)])


# ---------------------------------------------------------------- training over a quantized base
@pytest.mark.parametrize(("scheme", "order"), [("nf4", "after"), ("int8", "after"), ("nf4", "before")])
def test_lambdas_train_and_the_base_stays_quantized_and_frozen(scheme, order):
    model = _model(scheme, order)
    layers = quantized_layers(model)
    # every linear but the (tied) output head: 2 layers x (q, k, v, out, fc1, fc2)
    assert len(layers) == 12 and set(layers.values()) == {scheme} and "lm_head" not in layers
    storage = {n: _storage(model.get_submodule(n).weight) for n in layers}
    bytes_before = model_bytes(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad and weight_scheme(p) is None}
    lambdas_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    losses = _train(model)

    assert losses[-1] < losses[0] - 0.05, losses  # random init: the λ's alone bring the loss down
    assert all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in lambdas_before)
    assert all(not torch.equal(p, lambdas_before[n]) for n, p in model.named_parameters() if p.requires_grad)
    # the quantized storage is untouched, frozen, still quantized: no silent upcast
    for name in layers:
        weight = model.get_submodule(name).weight
        assert weight_scheme(weight) == scheme and not weight.requires_grad and weight.grad is None
        assert all(torch.equal(a, b) for a, b in zip(_storage(weight), storage[name]))
    assert model_bytes(model) == bytes_before
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_bytes_against_float(scheme):
    float_model = _model(None)
    model = _model(scheme)
    layers = quantized_layers(model)
    float_bytes = sum(float_model.get_submodule(n).weight.numel() * 4 for n in layers)
    quant_bytes = sum(tensor_bytes(model.get_submodule(n).weight) for n in layers)
    assert model_bytes(model)["quantized"] == quant_bytes
    assert model_bytes(model)["total"] == model_bytes(float_model)["total"] - float_bytes + quant_bytes
    # packed values (1/2 or 1 byte per value) plus scales (nf4: 1 byte per 64 values and a few groups;
    # int8: 5 bytes per output row, i.e. 5/128 of a byte per value here)
    assert quant_bytes / float_bytes < {"nf4": 0.14, "int8": 0.27}[scheme]
    assert not is_quantized(float_model) and is_quantized(model)


# ---------------------------------------------------------------- gradients
@pytest.mark.numerics
@pytest.mark.parametrize("path", ["plain", "lean", "save_h"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_lambda_grads_match_the_dequantized_float32_model(scheme, path):
    """The quantized model and a float32 copy holding dequant(Q(W)) compute the same function.

    Both use the same weight values, so their λ-gradients differ only by float32 rounding in
    a different order (the backend multiplies by the scales after the matmul for int8, NF4
    dequantizes first): each matmul's relative error is a few float32 epsilons (1.2e-7) times
    sqrt(depth); through 2 decoder layers and a 96-way softmax that stays far below 1e-4, while a
    wrong backward (grad x not flowing through W, a transposed or missing weight) is off by O(1).
    """
    model = _model(scheme)
    reference = dequantize_base(_model(scheme), torch.float32)
    assert not is_quantized(reference)
    set_vera_path(model, path)
    set_vera_path(reference, path)
    inputs = model_inputs("opt")
    for m in (model, reference):
        m.train()
        _loss(m, inputs).backward()
    ours, ref = _lambda_grads(model), _lambda_grads(reference)
    assert ref.abs().max() > 0
    assert (ours - ref).norm() <= 1e-4 * ref.norm()
    # the first layer's λ's get their gradient through the quantized layers above them
    first = next(iter(vera_layers(model)))[1]
    assert first.vera_lambda_b.grad.abs().max() > 0


@pytest.mark.numerics
@pytest.mark.parametrize("scheme", SCHEMES)
def test_grad_x_through_a_quantized_linear(scheme):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(128, 256), scheme)
    dense = dequantize_weight(layer.weight, torch.float32)
    x = torch.randn(5, 128, requires_grad=True)
    g = torch.randn(5, 256)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    # no float copy of the weight is kept for backward (torchao's int8 linear under autograd keeps one)
    assert not [t for t in saved if type(t) in (torch.Tensor, nn.Parameter) and t.numel() >= dense.numel()]
    out.backward(g)
    expected = g @ dense
    assert (x.grad - expected).norm() <= 1e-5 * expected.norm()
    assert layer.weight.grad is None and layer.bias.grad is not None  # the bias is a plain (trainable) tensor


@pytest.mark.numerics
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_quantized_error_against_float32_is_that_of_bf16(scheme):
    """bf16 compute over quantized weights: its λ-gradient error against the float32 model holding the same
    weight values is no larger than a plain bf16 model's (with those values) against the same reference."""
    def quantized_bf16():
        return quantize_base(_opt().to(torch.bfloat16), scheme)

    quantized = quantized_bf16()
    plain_bf16 = dequantize_base(quantized_bf16(), torch.bfloat16)
    reference = dequantize_base(quantized_bf16(), torch.float32).to(torch.float32)
    inputs = model_inputs("opt")
    grads = []
    for m in (quantized, plain_bf16, reference):
        apply_vera(m, _cfg())
        m.train()
        _loss(m, inputs).backward()
        grads.append(_lambda_grads(m).float())
    ours, bf16, ref = grads
    err_ours, err_bf16 = (ours - ref).norm(), (bf16 - ref).norm()
    assert err_ours <= 1.5 * err_bf16 + 1e-3 * ref.norm(), (err_ours, err_bf16, ref.norm())


def test_every_path_gives_the_same_output_and_no_merged_form():
    model = _model("nf4")
    inputs = model_inputs("opt")
    outs = {}
    for path in ["plain", "lean", "save_h"]:
        set_vera_path(model, path)
        model.zero_grad()
        outs[path] = model(**inputs).logits
        outs[path].sum().backward()
        outs[path] = (outs[path].detach(), _lambda_grads(model))
    for path in ["lean", "save_h"]:
        assert torch.allclose(outs[path][0], outs["plain"][0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(outs[path][1], outs["plain"][1], rtol=1e-4, atol=1e-6)
    assert all(layer.base_is_quantized for _, layer in vera_layers(model))


# ---------------------------------------------------------------- adapters across storage
@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapter_saved_from_a_quantized_run_loads_into_quantized_and_float_bases(scheme, tmp_path):
    model = _model(scheme)  # init_weights=False: random, non-trivial λ's
    model.eval()
    inputs = model_inputs("opt", seed=3)
    with torch.no_grad():
        expected = model(**inputs).logits
    save_adapter(model, tmp_path / "adapter")

    # a fresh quantized model of the same base, either order
    fresh = quantize_base(_opt(), scheme)
    load_adapter(fresh, tmp_path / "adapter")
    fresh_after = load_adapter(_opt(), tmp_path / "adapter")
    quantize_base(fresh_after, scheme)
    # the float base: the same λ's, and quantizing it afterwards gives the quantized run's model exactly
    float_model = load_adapter(_opt(), tmp_path / "adapter")
    assert not is_quantized(float_model)
    lambdas = {n: p for n, p in model.named_parameters() if "vera_lambda" in n}
    assert all(torch.equal(p, lambdas[n]) for n, p in float_model.named_parameters() if "vera_lambda" in n)
    with torch.no_grad():
        float_out = float_model(**inputs).logits
        quantize_base(float_model, scheme)
        for other in (fresh, fresh_after, float_model):
            assert torch.equal(other(**inputs).logits, expected)
    # the float base differs from the quantized one only by the quantization error, not by the adapter
    assert (float_out - expected).abs().max() < 0.5 * expected.abs().max()


def test_adapter_from_a_float_run_loads_into_a_quantized_base(tmp_path):
    model = _model(None)
    save_adapter(model, tmp_path / "adapter")
    quantized = load_adapter(quantize_base(_opt(), "nf4"), tmp_path / "adapter")
    lambdas = dict(model.named_parameters())
    assert all(torch.equal(p, lambdas[n]) for n, p in quantized.named_parameters() if "vera_lambda" in n)
    assert all(layer.base_is_quantized for _, layer in vera_layers(quantized))


# ---------------------------------------------------------------- merging and export
@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_is_refused_and_dequantize_then_unload_exports_the_trained_model(scheme):
    model = _model(scheme)
    model.eval()
    inputs = model_inputs("opt", seed=4)
    with torch.no_grad():
        expected = model(**inputs).logits
    storage = {n: _storage(model.get_submodule(n).weight) for n in quantized_layers(model)}
    for call in (lambda: merge_vera(model), lambda: unload_vera(model, merge=True),
                 lambda: next(iter(vera_layers(model)))[1].merge()):
        with pytest.raises(ValueError, match=rf"cannot merge VeRA into a quantized \({scheme}\) base.*dequantize_base"):
            call()
    # nothing changed
    assert all(not layer.merged for _, layer in vera_layers(model))
    assert all(all(torch.equal(a, b) for a, b in zip(_storage(model.get_submodule(n).weight), s))
               for n, s in storage.items())
    # unload without merging keeps the quantized base layers
    unmerged = _model(scheme)
    unload_vera(unmerged, merge=False)
    assert isinstance(unmerged.model.decoder.layers[0].self_attn.q_proj, QuantizedLinear)
    assert weight_scheme(unmerged.model.decoder.layers[0].self_attn.q_proj.weight) == scheme

    exported = unload_vera(dequantize_base(model, torch.float32), merge=True)
    assert not is_quantized(exported) and not list(vera_layers(exported))
    assert type(exported.model.decoder.layers[0].self_attn.q_proj) is nn.Linear
    assert type(exported.model.decoder.layers[0].fc1) is nn.Linear
    with torch.no_grad():
        got = exported(**inputs).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()

    bf16 = dequantize_base(_model(scheme), torch.bfloat16)
    q_proj = bf16.model.decoder.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.bfloat16 and q_proj.bias.dtype == torch.bfloat16


# ---------------------------------------------------------------- what is (not) quantized
def test_default_selection_and_idempotence():
    torch.manual_seed(0)
    model = apply_vera(tiny_bert(HIDDEN),
                       VeraConfig(r=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    embeddings = model.bert.embeddings.word_embeddings.weight
    quantize_base(model, "nf4")
    layers = quantized_layers(model)
    assert not any("classifier" in n for n in layers)  # modules_to_save train in full precision
    assert "bert.pooler.dense" in layers and "bert.encoder.layer.0.attention.self.query" in layers
    assert model.bert.embeddings.word_embeddings.weight is embeddings and weight_scheme(embeddings) is None
    assert model.classifier.weight.requires_grad
    before = model_bytes(model)
    quantize_base(model, "nf4")  # no-op
    assert model_bytes(model) == before

    opt = quantize_base(_opt(), "int8")
    assert opt.lm_head.weight is opt.model.decoder.embed_tokens.weight  # the tied head is left alone
    assert weight_scheme(opt.lm_head.weight) is None

    only = quantize_base(_opt(), "nf4", modules=["fc1"])
    assert sorted(quantized_layers(only)) == ["model.decoder.layers.0.fc1", "model.decoder.layers.1.fc1"]


# ---------------------------------------------------------------- errors
def test_clear_errors_before_anything_changes():
    model = _opt()
    with pytest.raises(ValueError, match=r"scheme='int4'.*\('nf4', 'int8'\)"):
        quantize_base(model, "int4")
    with pytest.raises(ValueError, match=r"backend='hqq'"):
        quantize_base(model, "nf4", backend="hqq")
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding.*not linear layers"):
        quantize_base(model, "nf4", modules=["model.decoder.embed_tokens"])
    with pytest.raises(ValueError, match=r"\['nope'\] match no linear layer.*candidates"):
        quantize_base(model, "nf4", modules=["nope"])
    with pytest.raises(TypeError, match="lists of layer names"):
        quantize_base(model, "nf4", skip="lm_head")
    odd = nn.Sequential(nn.Linear(10, 3), nn.Linear(128, 128))  # 30 and 16384 values
    with pytest.raises(ValueError, match=r"0: \(3, 10\) has 30 values, not a multiple of 64.*scheme='int8'"):
        quantize_base(odd, "nf4", modules=["0"])
    with pytest.warns(UserWarning, match="leaves these layers in full precision"):
        quantize_base(odd, "nf4")
    assert quantized_layers(odd) == {"1": "nf4"}
    with pytest.raises(ValueError, match=r"1: already quantized as nf4; call dequantize_base"):
        quantize_base(odd, "int8", modules=["1"])
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="meta device"):
        quantize_base(meta, "int8")
    assert not is_quantized(model)

    merged = merge_vera(apply_vera(_opt(), _cfg()))
    with pytest.raises(ValueError,
                       match=r"(?s)nothing was changed.*merged into the weight; unmerge_vera\(model\) first"):
        quantize_base(merged, "nf4")
    assert not is_quantized(merged)

    gpt2 = tiny_gpt2()
    with pytest.warns(UserWarning, match="Conv1D"), pytest.raises(ValueError, match="no layer of GPT2LMHeadModel"):
        quantize_base(gpt2, "nf4")

    head_quantized = quantize_base(tiny_bert(), "int8")
    with pytest.raises(ValueError, match=r"modules_to_save=\['classifier'\] trains \['classifier'\].*skip="):
        apply_vera(head_quantized, VeraConfig(r=8, target_modules=["query"], modules_to_save=["classifier"]))
    assert not list(vera_layers(head_quantized))


def test_bitsandbytes_backend_needs_bitsandbytes():
    from vera_lightning.core.qtensor import bnb_available

    if bnb_available():
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ValueError, match=r"backend='bitsandbytes'\) needs bitsandbytes.*backend='torchao'"):
        quantize_base(_opt(), "nf4", backend="bitsandbytes")


def test_unsupported_device_is_named():
    from vera_lightning.core.qtensor import quantize_weight

    weight = torch.randn(64, 64)
    with pytest.raises(ValueError, match="device 'meta'.*'cpu' or 'cuda'"):
        quantize_weight(weight.to("meta"), "int8", "layer")


# ---------------------------------------------------------------- bitsandbytes (PEFT's quantized layers)
def _bitsandbytes_interop(device: str, scheme: str) -> None:
    """Ours over bitsandbytes layers against PEFT's VeRA over the same layers, with the same λ's."""
    from helpers.peft_oracle import peft_vera, randomize_lambdas_

    def quantized():
        # train mode (tiny_opt has no dropout): bitsandbytes repacks 4-bit CPU weights for inference at the
        # first eval-mode forward, after which that layer cannot train
        return quantize_base(_opt().to(device).train(), scheme, backend="bitsandbytes")

    ours = apply_vera(quantized(), _cfg())
    theirs = peft_vera(quantized(), r=16, target_modules=TARGETS, init_weights=False)
    randomize_lambdas_(ours, theirs)
    assert all(type(layer._foreign_base[0]).__module__.startswith("bitsandbytes") for _, layer in vera_layers(ours))
    inputs = {k: v.to(device) for k, v in model_inputs("opt").items()}
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours(**inputs).logits
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    assert model_bytes(ours)["quantized"] > 0 and set(quantized_layers(ours).values()) == {scheme}
    losses = _train(ours, steps=5)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="dequantize_base"):
        merge_vera(ours)
    exported = unload_vera(dequantize_base(ours, torch.float32), merge=True)
    assert not is_quantized(exported)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bitsandbytes_layers_match_peft_on_cuda(scheme):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    _bitsandbytes_interop("cuda", scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bitsandbytes_layers_match_peft_on_cpu(scheme):
    """Runs where a bitsandbytes build with CPU support is installed (not a dependency: skipped in CI)."""
    pytest.importorskip("bitsandbytes")
    _bitsandbytes_interop("cpu", scheme)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merged_path_is_refused_and_auto_skips_it_over_a_quantized_base(scheme):
    """The merged form needs a dequantized W0: forcing it is refused, ``auto`` never picks it."""
    ids = torch.randint(0, 96, (64, 32), generator=torch.Generator().manual_seed(0))  # 2048 tokens
    float_model = _model(None)
    for _ in range(2):  # the first step learns the sibling groups
        with record_paths() as seen:
            _loss(float_model, {"input_ids": ids}).backward()
    assert "merged" in set(seen.values())  # at this size auto merges a float base
    model = _model(scheme)
    with pytest.raises(ValueError, match=r"set_vera_path\(path='merged'\).*quantized base.*path='auto'"):
        set_vera_path(model, "merged")
    assert {layer.vera_path for _, layer in vera_layers(model)} == {"auto"}  # nothing changed
    for _ in range(2):
        with record_paths() as seen:
            _loss(model, {"input_ids": ids}).backward()
    assert seen and "merged" not in set(seen.values())
    assert all(layer.vera_lambda_d.grad is not None for _, layer in vera_layers(model))
