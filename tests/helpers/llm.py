"""Tiny causal-LM pieces shared by the LLM tests: byte-level tokenizers trained on a few E2E-like lines,
a ChatML template, tiny llama/OPT models from configs, and a ``data=sft`` config builder."""

from __future__ import annotations

import torch

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["name[The Eagle], food[French], area[riverside]", "The Eagle is a French restaurant by the riverside.",
          "Describe the restaurant:", "Hello there, how are you? I am fine."]


def byte_bpe_tokenizer(chat: bool = True):
    """A GPT-2-style byte-level BPE trained in memory. ``chat``: ChatML template, EOS ``<|im_end|>``, no BOS;
    else no template, EOS ``</s>`` and a BOS ``<s>`` added in front of every text (as LLaMA's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if chat:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tokenizer.chat_template = CHATML
        return tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<|endoftext|>")



def sft_cfg(data_dir, **overrides):
    cfg = {"name": "t", "task": "causal_lm", "format": "sft", "data_dir": str(data_dir), "train_file": "train.csv",
           "val_file": "val.csv", "prompt_field": "mr", "response_field": "ref", "messages_field": None,
           "prompt_template": None, "chat_template": False, "system_prompt": None, "train_on_prompt": False,
           "truncation": "left", "max_length": 64, "batch_size": 2, "seed": 0}
    return {**cfg, **overrides}



GEN_CORPUS = ["name[The Eagle], food[French], area[riverside]",
              "The Eagle is a French restaurant by the riverside.\nYes.",
          "Hello there, how are you? I am fine."]
PROMPTS = ["name[The Eagle]", "Hello there, how are you? I am fine. The Eagle is", "a",
           "food[French], area[riverside] and a longer prompt", "The Eagle"]


def byte_tokenizer():
    """A GPT-2-style byte-level BPE trained in memory (newlines are tokens), EOS ``</s>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(GEN_CORPUS * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")



def tiny_lm(kind: str, vocab: int, positions: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    ids = {"eos_token_id": 1, "pad_token_id": 0, "bos_token_id": None}
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                            max_position_embeddings=positions, **ids)).eval()
    return OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=positions, word_embed_proj_dim=32,
                                    dropout=0.0, **ids)).eval()


