"""vera_lightning/app/data/sft_rows.py, tables.py, inputs.py: rows refused rather than read wrongly (issue 30's data
findings): extra fields, a repeated header name, non-string JSON responses, assistant turns out of place, a system
prompt without a chat template, special-token text in the data; sft_tokens.py: left truncation of chat prompts
reports how many rows it cut; a prompt_template's \\n written on the command line is a newline.

Modules: vera_lightning/app/data/inputs.py, vera_lightning/app/data/tables.py.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
from helpers.app import compose_app
from helpers.llm import CORPUS, byte_bpe_tokenizer, sft_cfg  # noqa: F401

from vera_lightning.app.data import sft, sft_rows, sft_tokens
from vera_lightning.app.data.datamodules import TextDataModule, build_datamodule
from vera_lightning.app.data.inputs import read_inputs, read_prompt_input
from vera_lightning.app.data.tables import read_table


@pytest.fixture(scope="module")
def chat_tok():
    return byte_bpe_tokenizer(chat=True)


def test_a_row_with_more_fields_than_the_header_is_refused_naming_file_row_and_count(tmp_path):
    (tmp_path / "a.csv").write_text("mr,ref\nname[A],A is here\nname[B],B is, here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.csv, row 2: the row has 3 fields but the header has 2 columns "
                                         r"\(\['mr', 'ref'\]\); the extra text starts at ' here'.*unquoted comma"):
        sft_rows.read_rows(tmp_path / "a.csv", sft_cfg(tmp_path))
    (tmp_path / "a.tsv").write_text('mr\tref\nname[A]\t"A\tis"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.tsv, row 1: the row has 3 fields .*a tab inside a field"):
        sft_rows.read_rows(tmp_path / "a.tsv", sft_cfg(tmp_path))
    (tmp_path / "c.tsv").write_text("sentence\tlabel\ngood\t1\textra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.tsv:2: the row has 3 fields but the header has 2 columns"):
        read_table(tmp_path / "c.tsv", {"text_field": "sentence", "label_field": "label"})
    with pytest.raises(ValueError, match=r"a.csv:3: the row has 3 fields"):
        read_inputs(tmp_path / "a.csv", "mr")


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("mr,ref,ref\nname[A],A is here,other\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.csv: the header names the column\(s\) \['ref'\] more than once"):
        sft_rows.read_rows(tmp_path / "a.csv", sft_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"more than once"):
        read_table(tmp_path / "a.csv", {"text_field": "mr"})


@pytest.mark.parametrize("response", [True, [1, 2], {"a": 1}, 3])
def test_a_json_response_that_is_not_a_string_is_refused(tmp_path, response):
    (tmp_path / "a.jsonl").write_text(json.dumps({"mr": "name[A]", "ref": response}) + "\n", encoding="utf-8")
    shown = re.escape(json.dumps(response))
    with pytest.raises(ValueError, match=rf"a.jsonl, row 1: the response in column 'ref' \(data.response_field\) is "
                                         rf"{shown}, not a string"):
        sft_rows.read_rows(tmp_path / "a.jsonl", sft_cfg(tmp_path))


@pytest.mark.parametrize("turns, responses, message", [
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     True, r"turn 1 of .* is an assistant turn before any user turn"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}],
     False, r"turn 2 of .* is an assistant turn before any user turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}, {"role": "user", "content": "q2"},
      {"role": "assistant", "content": "a"}], True, r"turn 2 of .* is an empty assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], False,
     r"the last turn of .* is an assistant turn; generation continues a conversation that ends with a user turn"),
])
def test_assistant_turns_out_of_place_are_refused_with_our_own_message(tmp_path, turns, responses, message):
    (tmp_path / "c.jsonl").write_text(json.dumps({"m": turns}) + "\n", encoding="utf-8")
    chat = sft_cfg(tmp_path, messages_field="m", prompt_field=None, response_field=None, chat_template=True)
    with pytest.raises(ValueError, match=r"c.jsonl, row 1: " + message):
        sft_rows.read_rows(tmp_path / "c.jsonl", chat, responses=responses)


def test_a_system_prompt_without_a_chat_template_is_refused(tmp_path, chat_tok):
    with pytest.raises(ValueError, match=r"data.system_prompt='Be brief.' is a system turn of the chat template, but "
                                         r"data.chat_template=false: set data.chat_template=true"):
        sft_rows.check_config(sft_cfg(tmp_path, system_prompt="Be brief."), chat_tok)


def test_eos_text_in_a_response_or_prompt_is_refused_naming_the_row(tmp_path, chat_tok):
    eos = chat_tok.eos_token
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text(f"mr,ref\nname[A],A is here.\nname[B],B is here.{eos} And more.\n",
                                     encoding="utf-8")
    with pytest.raises(ValueError, match=rf"data.train_file=.*train.csv, row 2: column 'ref' holds '{eos}'"):
        build_datamodule(sft_cfg(tmp_path), chat_tok)
    (tmp_path / "p.csv").write_text(f"mr\nname[{eos}]\n", encoding="utf-8")
    rows = read_prompt_input(tmp_path / "p.csv", sft_cfg(tmp_path)).rows
    with pytest.raises(ValueError, match=rf"input, row 1: column 'mr' holds '{eos}'"):
        sft_rows.check_special_text(rows, sft_cfg(tmp_path), chat_tok, "input")


def test_an_empty_prompt_to_generate_from_is_refused(tmp_path):
    (tmp_path / "p.csv").write_text('mr\nname[A]\n""\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.csv, row 2: empty prompt in column 'mr' \(data.prompt_field\)"):
        read_prompt_input(tmp_path / "p.csv", sft_cfg(tmp_path))


def test_truncation_drop_of_every_row_is_refused_at_setup_without_a_model(tmp_path, chat_tok):
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text("mr,ref\n" + f"name[A],{'A is here. ' * 30}\n", encoding="utf-8")
    datamodule = TextDataModule(sft_cfg(tmp_path, truncation="drop", max_length=16), chat_tok)
    with pytest.raises(ValueError, match=r"all 1 rows are longer than data.max_length=16 under data.truncation='drop'"):
        datamodule.setup("fit")  # the preflight calls this before any model is built


def test_left_truncation_of_chat_prompts_says_how_many_rows_it_cut(tmp_path, chat_tok, caplog):
    cfg = sft_cfg(tmp_path, prompt_field=None, response_field=None, messages_field="messages", chat_template=True)
    long = {"messages": [{"role": "user", "content": "Hello there, how are you? " * 12},
                         {"role": "assistant", "content": "Fine."}]}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine."}]}
    ids, _, start = sft_tokens.encode_row(cfg, chat_tok, long)
    max_length = len(ids) - start + 30  # the response and 30 prompt tokens
    assert len(sft_tokens.encode_row(cfg, chat_tok, short)[0]) <= max_length < len(ids)
    with caplog.at_level(logging.WARNING, logger="vera_lightning.app.data.sft_tokens"):
        items = sft_tokens.encode_rows([long, short, long], {**cfg, "max_length": max_length}, chat_tok, "c.jsonl")
    assert [len(i["input_ids"]) for i in items] == [max_length, len(items[1]["input_ids"]), max_length]
    assert items[0]["input_ids"] == ids[-max_length:]
    assert f"c.jsonl: cut the prompt of 2 of 3 rows from the left to fit data.max_length={max_length} " \
           "(data.truncation=left; their responses are whole)" in caplog.text
    assert "dropped" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vera_lightning.app.data.sft_tokens"):
        sft_tokens.encode_rows([short], {**cfg, "max_length": max_length}, chat_tok, "c.jsonl")
    assert caplog.text == ""  # nothing cut: nothing said


@pytest.mark.parametrize("override", ['data.prompt_template="Q: {mr}\\n"', "data.prompt_template='Q: {mr}\\n'"])
def test_a_newline_escape_in_a_prompt_template_override_is_a_newline(tmp_path, override):
    cfg = compose_app("train", tmp_path, "data=e2e", "data.chat_template=false", override)
    assert cfg.data.prompt_template == "Q: {mr}\\n"  # Hydra keeps the backslash
    assert sft.format_prompt(cfg.data, None, {"mr": "name[A]", "ref": "x"}) == "Q: name[A]\n"
    literal = {"prompt_template": "C:\\\\n{mr}\tend\\t"}  # \\ is one backslash; a real tab stays a tab
    assert sft.format_prompt(literal, None, {"mr": "a"}) == "C:\\na\tend\t"
