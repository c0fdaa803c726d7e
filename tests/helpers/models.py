"""Tiny models built from configs (never downloaded), and how to feed them."""

from __future__ import annotations

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


def random_lambdas_(model, seed: int = 3) -> None:
    """Give every λ of ``model`` random values (so an adapter is not the identity)."""
    from vera_lightning import vera_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in vera_layers(model):
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=g))
