"""Tiny models built from configs (never downloaded) and PEFT-oracle helpers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn


def tiny_opt(hidden: int = 32):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=96, hidden_size=hidden, num_hidden_layers=2, ffn_dim=2 * hidden, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_gpt2(hidden: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=96, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(hidden: int = 32, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=96, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class MLP(nn.Module):
    """Layers of different shapes, so the projections are sized by max in and max out separately."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 40)
        self.fc2 = nn.Linear(40, 24)
        self.fc3 = nn.Linear(24, 5, bias=False)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_mlp():
    return MLP().eval()


TINY_MODELS = {
    "opt": (tiny_opt, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),
    "bert": (tiny_bert, ["query", "value"]),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
    "mlp": (tiny_mlp, ["fc1", "fc2", "fc3"]),
}


def model_inputs(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(3, 12, generator=g)}
    ids = torch.randint(0, 96, (2, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model, kind: str, inputs=None):
    inputs = inputs if inputs is not None else model_inputs(kind)
    if kind == "mlp":
        return model(inputs["x"])
    return model(**inputs).logits


def peft_vera(model, **fields):
    """The oracle: PEFT's VeRA on ``model`` (modified in place, as get_peft_model does)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.VeraConfig(**fields))


def peft_layer(peft_model, name: str):
    return peft_model.base_model.model.get_submodule(name)


def randomize_lambdas_(ours, peft_model, seed: int = 1) -> None:
    """Give our layers random λ's and copy the same values into PEFT's layers."""
    from vera_lightning.inject import vera_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in vera_layers(ours):
            for pname in ("vera_lambda_b", "vera_lambda_d"):
                ours_p = getattr(layer, pname)
                ours_p.copy_(torch.randn(ours_p.shape, generator=g).to(ours_p.dtype))
                getattr(peft_layer(peft_model, name), pname)["default"].copy_(ours_p)


@pytest.fixture
def twin():
    """``twin(kind)`` -> (base, copy) of the same tiny model."""

    def make(kind: str):
        torch.manual_seed(0)
        base = TINY_MODELS[kind][0]()
        return base, copy.deepcopy(base)

    return make
