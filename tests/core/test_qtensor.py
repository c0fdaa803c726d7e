"""Quantized weight tensors (core/qtensor.py) and the exact deepcopy of layers holding them (core/qlinear.py).

NF4 of any weight holding a multiple of 64 values (the scale group adapts to the block count), and copies
that keep the packed tensors bit for bit (torchao's own ``clone`` re-quantizes).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from vera_lightning import VeraConfig, apply_vera, quantize_base
from vera_lightning.core.qlinear import QuantizedLinear
from vera_lightning.core.qtensor import copy_quantized, nf4_scale_group, quantize_weight, tensor_bytes
from vera_lightning.ops.quantize import quantized_layers

#: QLoRA's NF4 code book (the 16 quantiles of N(0, 1) scaled to [-1, 1]), as printed in the paper's appendix.
NF4_CODES = torch.tensor([
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1848449, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


def _inner(weight) -> dict[str, torch.Tensor]:
    names, _ = weight.__tensor_flatten__()
    return {name: getattr(weight, name) for name in names}


@pytest.mark.parametrize(("shape", "group"), [
    ((128, 128), 256),   # 256 blocks: QLoRA's group
    ((576, 576), 216),   # SmolLM2's q/o projections: 5,184 blocks = 24 x 216
    ((192, 576), 216),   # its k/v projections (GQA): 1,728 blocks = 8 x 216
    ((1536, 576), 256),  # its MLP: 13,824 blocks = 54 x 256
    ((257, 64), 1),     # a prime number of blocks (257): each scale on its own
])
def test_nf4_scale_group_is_the_largest_divisor_up_to_256(shape, group):
    numel = shape[0] * shape[1]
    assert nf4_scale_group(numel) == group
    assert (numel // 64) % group == 0


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (257, 64)])
def test_nf4_of_any_multiple_of_64_values_rounds_each_block_to_its_nearest_codes(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    nf4 = quantize_weight(weight, "nf4", "w")
    assert nf4.scaler_block_size == nf4_scale_group(weight.numel())
    back = nf4.get_original_weight().float()
    # reference: per block of 64, nearest NF4 code x the block's absmax (the stored scales are themselves
    # quantized, so the reference gets the decoded scale of each block: back's largest magnitude in it)
    blocks, got = weight.reshape(-1, 64), back.reshape(-1, 64)
    scale = got.abs().amax(dim=1, keepdim=True)
    codes = (blocks / blocks.abs().amax(dim=1, keepdim=True)).unsqueeze(-1).sub(NF4_CODES).abs().argmin(-1)
    expected = NF4_CODES[codes] * scale
    agree = torch.isclose(got, expected, rtol=1e-2, atol=1e-6).float().mean().item()
    assert agree > 0.99, agree  # the rest sit next to a midpoint between two codes
    assert (got - blocks).abs().max() <= 0.16 * blocks.abs().amax() + 1e-6  # half the widest code gap
    # 4 bits a value, plus one int8 scale a block and a float32 factor per group (little more than 4.1 bits)
    assert tensor_bytes(nf4) * 8 / weight.numel() < 4.7


def test_nf4_refuses_a_weight_not_a_multiple_of_64_values():
    with pytest.raises(ValueError, match=r"w: \(3, 10\) has 30 values, not a multiple of 64.*scheme='int8'"):
        quantize_weight(torch.randn(3, 10), "nf4", "w")


@pytest.mark.parametrize(("scheme", "shape"), [("nf4", (192, 576)), ("nf4", (128, 128)), ("int8", (96, 40))])
def test_copy_quantized_is_bit_exact_and_independent(scheme, shape):
    torch.manual_seed(0)
    weight = quantize_weight(torch.randn(shape), scheme, "w")
    copied = copy_quantized(weight)
    assert type(copied) is type(weight) and copied.shape == weight.shape
    for name, tensor in _inner(weight).items():
        assert torch.equal(_inner(copied)[name], tensor), name
        assert _inner(copied)[name].data_ptr() != tensor.data_ptr(), name
    if scheme == "nf4":
        assert copied.scaler_block_size == weight.scaler_block_size


def _llama(hidden: int = 192) -> LlamaForCausalLM:
    """A 2-layer llama with SmolLM2's proportions (3 query heads per KV head, MLP 8/3 x hidden)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_deepcopy_of_a_quantized_adapted_model_keeps_every_packed_tensor_and_the_outputs(scheme):
    model = _llama()
    apply_vera(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every linear but the tied head quantizes: nothing left out
        quantize_base(model, scheme)
    assert len(quantized_layers(model)) == 14
    tokens = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        expected = model(tokens).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(tokens).logits, expected)
    weights = {n: p for n, p in model.named_parameters() if "proj" in n and "vera" not in n}
    twins = dict(twin.named_parameters())
    for name, weight in weights.items():
        for part, tensor in _inner(weight).items():
            assert torch.equal(_inner(twins[name])[part], tensor), (name, part)
            assert _inner(twins[name])[part].data_ptr() != tensor.data_ptr(), (name, part)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # ties survive the copy
    assert isinstance(twin.model.layers[0].mlp.up_proj, QuantizedLinear)
    # the copy trains on its own: the original's λ's stay where they were
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    twin(tokens, labels=tokens).loss.backward()
    with torch.no_grad():
        for p in twin.parameters():
            if p.grad is not None:
                p.add_(p.grad)
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(after[n], v) for n, v in before.items())


def test_quantized_linear_deepcopy_keeps_its_bias_and_scheme():
    layer = QuantizedLinear.from_linear(nn.Linear(576, 192), "nf4", "layer")
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 576)
    assert twin.scheme == "nf4" and torch.equal(twin(x), layer(x))
    assert twin.bias is not layer.bias and torch.equal(twin.bias, layer.bias)
