"""Tied input/output embeddings (SmolLM2, GPT-2, OPT: ``lm_head.weight is embed_tokens.weight``).

On a tiny LLaMA built with ``tie_word_embeddings=True``: training, ``merge_vera``, ``unmerge_vera``,
``unload_vera(merge=True)``, ``save_adapter``/``load_adapter`` and ``export_lora`` keep the head and the input
embedding one tensor with its original values, and the outputs equal PEFT's VeRA (same seed) where PEFT has the
operation. Then what happens when ``lm_head`` itself is targeted or listed in ``modules_to_save``, and
``quantize_base`` on a tied model.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers.peft_oracle import peft_layer, peft_vera
from safetensors.torch import load_file

from vera_lightning import (
    VeraConfig,
    VeraLinear,
    apply_vera,
    export_lora,
    is_quantized,
    load_adapter,
    merge_vera,
    quantize_base,
    save_adapter,
    unload_vera,
    unmerge_vera,
    vera_layers,
)

pytestmark = pytest.mark.numerics

QV = {"r": 16, "target_modules": ["q_proj", "v_proj"]}


def tied_llama(hidden: int = 64, kv_heads: int = 2, intermediate: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def train_steps(model, steps: int = 3) -> None:
    """AdamW on the trainable tensors with the causal-LM loss (a few real optimizer steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def copy_lambdas(ours, theirs) -> None:
    with torch.no_grad():
        for name, layer in vera_layers(ours):
            for attr in ("vera_lambda_b", "vera_lambda_d"):
                getattr(peft_layer(theirs, name), attr)["default"].copy_(getattr(layer, attr))


@pytest.fixture
def trained():
    """(pristine tied llama, the same adapted on q,v and trained, its embedding before training)."""
    pristine = tied_llama()
    model = copy.deepcopy(pristine)
    assert is_tied(model) and model.config.tie_word_embeddings
    apply_vera(model, VeraConfig(**QV))
    train_steps(model)
    return pristine, model


def assert_tie_and_embedding_kept(model, pristine) -> None:
    assert is_tied(model), "lm_head and the input embedding are no longer one tensor"
    assert torch.equal(model.get_input_embeddings().weight, pristine.get_input_embeddings().weight)


def test_training_merge_unmerge_and_unload_keep_the_tie_and_match_peft(trained):
    pristine, ours = trained
    assert any(not torch.equal(layer.vera_lambda_b, torch.zeros_like(layer.vera_lambda_b))
               for _, layer in vera_layers(ours)), "training did not move the λ's"
    assert not ours.get_input_embeddings().weight.requires_grad
    assert_tie_and_embedding_kept(ours, pristine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_vera(copy.deepcopy(pristine), **QV)
    copy_lambdas(ours, theirs)
    expected = logits(theirs)
    assert rel(logits(ours), expected) <= 1e-5

    merge_vera(ours)
    assert_tie_and_embedding_kept(ours, pristine)
    assert rel(logits(ours), expected) <= 1e-5
    unmerge_vera(ours)
    assert_tie_and_embedding_kept(ours, pristine)
    assert rel(logits(ours), expected) <= 1e-5

    unloaded = unload_vera(ours, merge=True)
    peft_merged = theirs.merge_and_unload()
    assert_tie_and_embedding_kept(unloaded, pristine)
    assert_tie_and_embedding_kept(peft_merged, pristine)
    assert unloaded.config.tie_word_embeddings
    assert rel(logits(unloaded), logits(peft_merged)) <= 1e-5


def test_a_merged_export_reloads_tied(trained, tmp_path):
    from transformers import LlamaForCausalLM

    pristine, ours = trained
    expected = logits(ours)
    unload_vera(ours, merge=True).save_pretrained(tmp_path / "merged")
    assert "lm_head.weight" not in load_file(tmp_path / "merged" / "model.safetensors")  # written once
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert is_tied(reloaded)
    assert torch.equal(reloaded.get_input_embeddings().weight, pristine.get_input_embeddings().weight)
    assert rel(logits(reloaded), expected) <= 1e-5


def test_save_and_load_adapter_keep_the_tie_and_peft_reads_it(trained, tmp_path):
    import peft

    pristine, ours = trained
    save_adapter(ours, tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert not [k for k in keys if "lm_head" in k or "embed_tokens" in k]
    fresh = load_adapter(apply_vera(copy.deepcopy(pristine), VeraConfig(**QV)), tmp_path / "adapter")
    assert_tie_and_embedding_kept(fresh, pristine)
    assert torch.equal(logits(fresh), logits(ours))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "adapter"))
    assert_tie_and_embedding_kept(theirs.base_model.model, pristine)
    assert rel(logits(ours), logits(theirs)) <= 1e-5


def test_export_lora_keeps_the_tie_and_peft_lora_reproduces_it(trained, tmp_path):
    import peft

    pristine, ours = trained
    export_lora(ours, tmp_path / "lora")
    assert_tie_and_embedding_kept(ours, pristine)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["modules_to_save"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "lora"))
    assert_tie_and_embedding_kept(lora.base_model.model, pristine)
    assert rel(logits(lora), logits(ours)) <= 1e-5


def test_a_targeted_tied_head_trains_exactly_and_refuses_to_merge():
    pristine = tied_llama()
    fields = {"r": 16, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    ours = apply_vera(copy.deepcopy(pristine), VeraConfig(**fields))
    assert is_tied(ours)  # the VeraLinear holds the shared weight itself, frozen
    train_steps(ours)
    assert_tie_and_embedding_kept(ours, pristine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_vera(copy.deepcopy(pristine), **fields)
    copy_lambdas(ours, theirs)
    expected = logits(ours)
    assert rel(expected, logits(theirs)) <= 1e-5  # unmerged: the update is added to the head's output only
    for operation in (merge_vera, lambda m: unload_vera(m, merge=True)):
        with pytest.raises(ValueError, match=r"refused, no layer was changed: lm_head\.weight is tied to "
                           r"\['model\.embed_tokens\.weight'\].*untie first"):
            operation(ours)
        assert_tie_and_embedding_kept(ours, pristine)
        assert torch.equal(logits(ours), expected)
    unload_vera(ours, merge=False)
    assert_tie_and_embedding_kept(ours, pristine)
    assert torch.equal(logits(ours), logits(pristine))


def test_modules_to_save_on_a_tied_head_is_refused_and_the_untie_fix_trains_like_peft(tmp_path):
    import peft

    pristine = tied_llama()
    fields = {**QV, "modules_to_save": ["lm_head"]}
    model = copy.deepcopy(pristine)
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\] refused, the model was not changed: "
                       r"lm_head\.weight is tied to \['model\.embed_tokens\.weight'\].*Untie first"):
        apply_vera(model, VeraConfig(**fields))
    assert is_tied(model) and not hasattr(model, "vera_projections")
    assert all(type(m) is not VeraLinear for m in model.modules())
    # the fix the message names: the head gets its own copy, then it trains without touching the input embedding
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    ours = apply_vera(model, VeraConfig(**fields))
    train_steps(ours)
    assert torch.equal(ours.get_input_embeddings().weight, pristine.get_input_embeddings().weight)
    assert not torch.equal(ours.lm_head.weight, pristine.lm_head.weight)  # the head trained
    save_adapter(ours, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT trains a copy of the head of the tied pristine model: same outputs
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "adapter"))
    assert rel(logits(ours), logits(theirs)) <= 1e-5


def test_quantize_base_keeps_the_tied_head_in_full_precision():
    # NF4 needs layers of a multiple of 64 values: hidden 128 with 4 KV heads and MLP 128 (all 128 x 128)
    pristine = tied_llama(hidden=128, kv_heads=4, intermediate=128)
    model = quantize_base(copy.deepcopy(pristine), "nf4")
    assert_tie_and_embedding_kept(model, pristine)
    assert type(model.lm_head) is torch.nn.Linear and not is_quantized(model.lm_head)
    quantized = {name.split(".")[-1] for name, module in model.named_modules()
                 if not any(module.children()) and is_quantized(module)}
    assert quantized == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    apply_vera(model, VeraConfig(**QV))
    train_steps(model)
    assert_tie_and_embedding_kept(model, pristine)
