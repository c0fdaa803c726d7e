"""What predict reads from ``input=FILE`` (issue 36's input findings): one row per ``\\n``-separated line whatever
Unicode calls a line break (W3), no UTF-8 BOM in the first example (S11), and bytes that are not UTF-8 named by
file, line and byte offset with the fix (U8), in predict's inputs and in the training readers alike.

Modules: vera_lightning/app/data/inputs.py, vera_lightning/app/data/text_files.py, vera_lightning/app/data/tables.py.
"""

from __future__ import annotations

import json

import pytest
from helpers.llm import sft_cfg

from vera_lightning.app.data.datamodules import read_split
from vera_lightning.app.data.inputs import read_inputs, read_prompt_input
from vera_lightning.app.data.tables import check_columns, read_table
from vera_lightning.app.data.text_files import read_lines

#: Three lines; U+2028, U+2029, a form feed, \x1c and \x85 are line breaks to str.splitlines, not to a file.
LINES = ["first prompt", "second\u2028half\u2029end", "third\x0cform\x1cfield\x85next"]
TEXT = "\n".join(LINES) + "\n"
PLAIN = {"format": "text", "text_field": "text"}


def _write(path, text, bom=False):
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_read_lines_splits_on_newline_only_and_drops_a_crlf_return(tmp_path):
    assert read_lines(_write(tmp_path / "a.txt", TEXT)) == LINES
    assert read_lines(_write(tmp_path / "b.txt", "\r\n".join(LINES) + "\r\n")) == LINES
    assert read_lines(_write(tmp_path / "c.txt", "a\rb\n\nlast")) == ["a\rb", "", "last"]  # a lone \r is kept
    assert read_lines(_write(tmp_path / "d.txt", "")) == []


@pytest.mark.parametrize("bom", [False, True])
def test_classification_input_gives_one_example_per_line(tmp_path, bom):
    assert read_inputs(_write(tmp_path / "in.txt", TEXT, bom), "sentence") == LINES


@pytest.mark.parametrize("bom", [False, True])
def test_causal_lm_prompts_are_one_per_line_for_sft_and_plain_text_data(tmp_path, bom):
    path = _write(tmp_path / "in.txt", TEXT, bom)
    sft = read_prompt_input(path, sft_cfg(tmp_path))
    assert [row["mr"] for row in sft.rows] == LINES
    assert [row["prompt"] for row in sft.echo] == LINES  # the output echoes each line as it was, without the BOM
    chat = read_prompt_input(path, sft_cfg(tmp_path, prompt_field=None, response_field=None, messages_field="m",
                                           chat_template=True))
    assert [row["m"] for row in chat.rows] == [[{"role": "user", "content": line}] for line in LINES]
    plain = read_prompt_input(path, PLAIN)
    assert plain.prompts == LINES and [row["prompt"] for row in plain.echo] == LINES


def test_a_jsonl_input_is_one_row_per_line_and_keeps_json_line_separators(tmp_path):
    rows = [{"mr": line} for line in LINES]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows)  # a raw U+2028 is valid JSON
    path = _write(tmp_path / "in.jsonl", text, bom=True)
    assert read_prompt_input(path, sft_cfg(tmp_path)).rows == rows
    plain = read_prompt_input(_write(tmp_path / "t.jsonl", text.replace('"mr"', '"text"'), bom=True), PLAIN)
    assert plain.prompts == LINES


@pytest.mark.parametrize("suffix, separator", [(".tsv", "\t"), (".csv", ",")])
def test_a_bom_is_not_part_of_a_table_inputs_first_column(tmp_path, suffix, separator):
    path = _write(tmp_path / f"in{suffix}", f"sentence{separator}id\nfirst{separator}1\nsecond{separator}2\n", bom=True)
    assert read_inputs(path, "sentence") == ["first", "second"]


def _latin1(tmp_path, name, before=b"first prompt\n"):
    path = tmp_path / name
    path.write_bytes(before + b"caf\xe9 au lait\n")
    return path, before.count(b"\n") + 1, len(before) + 3


def _message(path, line, offset):
    return (f"{path}:{line}: not UTF-8 (byte 0xe9 at column 4), byte offset {offset} of the file; save the file as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)")


def test_a_non_utf8_text_input_names_file_line_offset_and_fix(tmp_path):
    path, line, offset = _latin1(tmp_path, "in.txt")
    for read in (lambda: read_inputs(path, "sentence"), lambda: read_prompt_input(path, sft_cfg(tmp_path)),
                 lambda: read_prompt_input(path, PLAIN)):
        with pytest.raises(ValueError) as err:
            read()
        assert str(err.value) == _message(path, line, offset)


@pytest.mark.parametrize("name, before", [("in.tsv", b"sentence\tlabel\nfirst\t1\n"),
                                          ("in.csv", b"sentence,label\nfirst,1\n"),
                                          ("in.jsonl", b'{"text": "first", "mr": "first"}\n')])
def test_a_non_utf8_table_input_names_file_line_offset_and_fix(tmp_path, name, before):
    path, line, offset = _latin1(tmp_path, name, before)
    reads = [lambda: read_prompt_input(path, PLAIN), lambda: read_prompt_input(path, sft_cfg(tmp_path))]
    if not name.endswith(".jsonl"):
        reads.append(lambda: read_inputs(path, "sentence"))
    for read in reads:
        with pytest.raises(ValueError) as err:
            read()
        assert str(err.value) == _message(path, line, offset)


def test_the_training_readers_name_file_line_and_offset_of_non_utf8_bytes(tmp_path):
    path, line, offset = _latin1(tmp_path, "train.tsv", b"sentence\tlabel\nfirst\t1\n")
    with pytest.raises(ValueError) as err:
        read_table(path, {"text_field": "sentence", "label_field": "label"})
    assert str(err.value) == _message(path, line, offset)
    cfg = {"format": "table", "task": "classification", "data_dir": str(tmp_path), "train_file": "train.tsv",
           "val_file": "val.tsv", "text_field": "sentence", "label_field": "label"}
    with pytest.raises(ValueError) as err:  # the header check reads ahead of the header: it must not fail bare
        check_columns(cfg, tmp_path)
    assert str(err.value) == _message(path, line, offset)
    path, line, offset = _latin1(tmp_path, "train.txt")
    with pytest.raises(ValueError) as err:
        read_split({"format": "text", "task": "causal_lm", "data_dir": str(tmp_path), "train_file": "train.txt"},
                   "train")
    assert str(err.value) == _message(path, line, offset)


def test_a_short_row_in_a_plain_text_table_input_is_told_it_is_short(tmp_path):
    path = _write(tmp_path / "in.csv", "id,text\n1,a prompt\n2\n")
    with pytest.raises(ValueError, match=r"in.csv, row 2: the row has too few columns \(1 of the header's 2: "
                                         r"\['id', 'text'\]\), so it has no \['text'\] field; separate the fields "
                                         r"with commas"):
        read_prompt_input(path, PLAIN)
