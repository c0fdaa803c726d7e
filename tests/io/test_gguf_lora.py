"""export_gguf_lora: llama.cpp's names, shapes and metadata; lora_b @ lora_a recovers ΔW in llama.cpp's row order
(checked with transformers' own GGUF reader as the oracle of that order); refusals before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.models import random_lambdas_, tiny_llama, tiny_opt

from vera_lightning import VeraConfig, apply_vera, export_gguf_lora, export_lora, find_adapter, gguf_lora_problems
from vera_lightning.core.lookup import vera_layers
from vera_lightning.io.gguf_lora import llama_rope_permute

gguf = pytest.importorskip("gguf", reason="the gguf package (the llm extra) writes and reads GGUF files")
pytestmark = pytest.mark.numerics

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
GGUF_KIND = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "gate_proj": "ffn_gate", "up_proj": "ffn_up"}


def _adapted_llama(r: int = 8, **fields):
    model = apply_vera(tiny_llama(), VeraConfig(r=r, target_modules=TARGETS, **fields))  # GQA: 4 heads, 2 KV heads
    random_lambdas_(model)
    return model


def _delta(layer) -> torch.Tensor:
    """``ΔW`` (out x in) in float64, formed explicitly (the reference)."""
    lam_b, lam_d = (getattr(layer, a).detach().double() for a in find_adapter(layer).lambda_names("default"))
    a_s, b_s = (t.double() for t in layer.sliced_projections())
    return (lam_b[:, None] * b_s) @ (lam_d[:, None] * a_s)


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _llama_cpp_to_hf(delta: np.ndarray, gguf_name: str, config) -> np.ndarray:
    """transformers' GGUF loader turns a llama.cpp LLaMA weight into Hugging Face's row order: the oracle."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    return processor.process(delta, gguf_name).weights


def test_exact_export_has_llama_cpp_names_shapes_metadata_and_delta(tmp_path):
    model = _adapted_llama(r=8)
    report = export_gguf_lora(model, tmp_path / "adapter.gguf")
    assert (report.rank, report.alpha, report.relative_error) == (8, 8.0, 0.0)
    fields, tensors = _read(tmp_path / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    expected = {f"blk.{i}.{GGUF_KIND[t]}.weight.lora_{ab}" for i in range(2) for t in TARGETS for ab in "ab"}
    assert set(tensors) == expected == set(report.tensors)
    config = model.config
    checked = 0
    for name, layer in vera_layers(model):
        index, kind = name.split(".")[2], GGUF_KIND[name.rsplit(".", 1)[-1]]
        stem = f"blk.{index}.{kind}.weight"
        a, b = tensors[stem + ".lora_a"], tensors[stem + ".lora_b"]
        # GGUF dims are ggml's ne (reversed): lora_a [in, r], lora_b [r, out], as llama.cpp checks against the base
        assert list(a.shape) == [layer.in_features, 8] and list(b.shape) == [8, layer.out_features]
        assert a.tensor_type == gguf.GGMLQuantizationType.F32 == b.tensor_type
        lora_a = np.asarray(a.data, dtype=np.float64).reshape(8, layer.in_features)
        lora_b = np.asarray(b.data, dtype=np.float64).reshape(layer.out_features, 8)
        in_llama_cpp_order = lora_b @ lora_a * (fields["adapter.lora.alpha"] / 8)
        reference = _delta(layer).numpy()
        got = _llama_cpp_to_hf(in_llama_cpp_order, stem, config)
        assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()
        if kind in ("attn_q", "attn_k"):  # rows really are reordered there (not the identity)
            assert np.abs(in_llama_cpp_order - reference).max() > 1e-3 * np.abs(reference).max()
        checked += 1
    assert checked == 10


def test_rank_k_matches_the_lora_export_and_its_error(tmp_path):
    model = _adapted_llama(r=8)
    report = export_gguf_lora(model, tmp_path / "k.gguf", rank=3)
    lora = export_lora(model, tmp_path / "lora", rank=3)
    assert report.rank == 3 and report.alpha == 3.0
    assert 0 < report.relative_error < 1 and report.relative_error == pytest.approx(lora.relative_error, rel=1e-9)
    fields, tensors = _read(tmp_path / "k.gguf")
    assert fields["adapter.lora.alpha"] == pytest.approx(3.0)
    assert list(tensors["blk.0.attn_v.weight.lora_a"].shape) == [64, 3]
    assert list(tensors["blk.0.attn_v.weight.lora_b"].shape) == [3, 32]  # v_proj: 2 KV heads of 16


def test_permutation_inverts_transformers_gguf_reader():
    rows = torch.arange(32 * 3, dtype=torch.float64).reshape(32, 3)
    config = type("C", (), {"num_attention_heads": 4, "num_key_value_heads": 2})
    back = _llama_cpp_to_hf(llama_rope_permute(rows, 2).numpy(), "blk.0.attn_k.weight", config)
    assert np.array_equal(back, rows.numpy())
    assert not torch.equal(llama_rope_permute(rows, 2), rows)
    with pytest.raises(ValueError, match="even size"):
        llama_rope_permute(torch.zeros(6, 2), 2)


@pytest.mark.parametrize("case, match", [
    ("opt", r"'opt' model \(OPTForCausalLM\).*llama"),
    ("bias", "biases"),
    ("saved", r"modules_to_save=\['lm_head'\]"),
    ("rank", r"rank=9 must be an integer with 1 <= rank <= r=8"),
    ("plain", "carries no VeRA adapter"),
])
def test_refusals_write_nothing(tmp_path, case, match):
    if case == "opt":
        model = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    elif case == "bias":
        model = _adapted_llama(bias="vera_only")
    elif case == "saved":
        model = _adapted_llama(modules_to_save=["lm_head"])
    elif case == "plain":
        model = tiny_llama()
    else:
        model = _adapted_llama()
    target = tmp_path / "adapter.gguf"
    with pytest.raises(ValueError, match=match):
        export_gguf_lora(model, target, rank=9 if case == "rank" else None)
    assert list(tmp_path.iterdir()) == []
    if case != "rank":
        assert gguf_lora_problems(model)


def test_an_untied_lm_head_maps_to_output(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=False))
    untied = apply_vera(base, VeraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert gguf_lora_problems(untied) == []
    report = export_gguf_lora(untied, tmp_path / "a.gguf")
    assert report.tensors["output.weight.lora_b"] == (96, 4) and report.tensors["output.weight.lora_a"] == (4, 32)
