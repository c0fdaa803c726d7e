"""Reading and checking prompt/response and chat rows (data.format=sft): CSV/TSV/JSONL, a BOM, bad rows named by
file, row and option, a short CSV row told it is short (issue 36 U7), config errors before any work.
"""

from __future__ import annotations

import json

import pytest
from helpers.llm import sft_cfg
from test_sft import write_csv

from vera_lightning.app.data import sft_rows
from vera_lightning.app.data.datamodules import TextDataModule

ROWS = [["name[A], food[French]", "A serves French food."], ["name[B]", "B is a pub."],
        ["name[A], food[French]", "French food at A."]]


def test_read_rows_csv_tsv_jsonl_and_bom(tmp_path):
    write_csv(tmp_path / "a.csv", ROWS, bom=True)
    (tmp_path / "a.tsv").write_text("mr\tref\textra\n" + "".join(f"{m}\t{r}\tx\n" for m, r in ROWS), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"mr": m, "ref": r}) + "\n\n" for m, r in ROWS))
    cfg = sft_cfg(tmp_path)
    expected = [{"mr": m, "ref": r} for m, r in ROWS]
    assert sft_rows.read_rows(tmp_path / "a.csv", cfg) == expected  # the BOM is not part of the first column's name
    assert sft_rows.read_rows(tmp_path / "a.tsv", cfg) == [{**row, "extra": "x"} for row in expected]
    assert sft_rows.read_rows(tmp_path / "a.jsonl", cfg) == expected
    (tmp_path / "c.csv").write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}, '
                                    '{""role"": ""assistant"", ""content"": ""yo""}]"\n')
    chat = sft_cfg(tmp_path, prompt_field=None, response_field=None, messages_field="messages", chat_template=True)
    assert sft_rows.read_rows(tmp_path / "c.csv", chat)[0]["messages"][1] == {"role": "assistant", "content": "yo"}


def test_bad_rows_name_the_file_row_and_option(tmp_path):
    write_csv(tmp_path / "a.csv", [["m1", "r1"], ["m2", " "]])
    with pytest.raises(ValueError, match=r"a.csv, row 2: empty response in column 'ref' \(data.response_field\)"):
        sft_rows.read_rows(tmp_path / "a.csv", sft_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"a.csv: column\(s\) \['text'\] not in the header \['mr', 'ref'\]; set "
                                         r"data.response_field \(now naming 'text'\)"):
        sft_rows.read_rows(tmp_path / "a.csv", sft_cfg(tmp_path, response_field="text"))
    with pytest.raises(ValueError, match=r"column\(s\) \['name'\] not in the header .*data.prompt_template"):
        sft_rows.read_rows(tmp_path / "a.csv", sft_cfg(tmp_path, prompt_template="Describe {name}:"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"mr": "m"}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl, row 1: no \['ref'\] \(the row has \['mr'\]\); set "
                                         r"data.response_field"):
        sft_rows.read_rows(tmp_path / "a.jsonl", sft_cfg(tmp_path))
    chat = sft_cfg(tmp_path, prompt_field=None, response_field=None, messages_field="m", chat_template=True)
    turns = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]
    (tmp_path / "c.jsonl").write_text("\n" + json.dumps({"m": turns}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl, row 2: turn 2 of data.messages_field='m' has role 'bot'; roles "
                                         r"must be one of \['system', 'user', 'assistant'\]"):
        sft_rows.read_rows(tmp_path / "c.jsonl", chat)
    (tmp_path / "c.jsonl").write_text(json.dumps({"m": turns[:1]}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl, row 1: the last turn .* is a 'user' turn"):
        sft_rows.read_rows(tmp_path / "c.jsonl", chat)
    prompts = sft_rows.read_rows(tmp_path / "c.jsonl", chat, responses=False)  # prompts to generate from
    assert prompts[0]["m"] == turns[:1]
    with pytest.raises(ValueError, match=r"a.txt: data.format=sft reads .csv, .tsv, .tab, .jsonl"):
        sft_rows.read_rows(tmp_path / "a.txt", sft_cfg(tmp_path))


def test_config_errors_before_any_work(tmp_path, chat_tok, bos_tok):
    with pytest.raises(ValueError, match=r"data.chat_template=true but the tokenizer .* has no chat template"):
        sft_rows.check_config(sft_cfg(tmp_path, chat_template=True), bos_tok)
    with pytest.raises(ValueError) as err:
        sft_rows.check_config(sft_cfg(tmp_path, messages_field="m", truncation="right", prompt_template="{0}"), bos_tok)
    message = str(err.value)
    assert "set either both prompt_field and response_field, or messages_field alone" in message
    assert "data.messages_field='m' needs the tokenizer's chat template" in message
    assert "data.truncation='right': must be one of ['left', 'drop']" in message
    assert "data.prompt_template='{0}': name the columns" in message
    with pytest.raises(ValueError, match=r"data.format='sft' is causal-LM data but data.task='classification'"):
        TextDataModule(sft_cfg(tmp_path, task="classification"), chat_tok)


@pytest.mark.parametrize("suffix, separator, fix", [(".csv", ",", "commas"), (".tsv", "\t", "tabs")])
def test_a_short_table_row_is_told_it_has_too_few_columns(tmp_path, suffix, separator, fix):
    """U7: a row ``foo`` in a prompt,response file lacks its response field because it is short, not because
    data.response_field names the wrong column."""
    path = tmp_path / f"a{suffix}"
    path.write_text(f"mr{separator}ref\nm1{separator}r1\nfoo\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        sft_rows.read_rows(path, sft_cfg(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{path}, row 2: the row has too few columns (1 of the header's 2: ['mr', 'ref']), "
                              "so it has no ['ref'] field; separate the fields with " + fix)
    assert message.endswith("or fix or drop that row")
    assert "data.response_field" not in message


def test_a_short_row_of_prompts_to_generate_from_is_told_it_is_short(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("mr,ref\nm1,r1\nm2\n", encoding="utf-8")
    prompts = sft_rows.read_rows(path, sft_cfg(tmp_path), responses=False)
    assert prompts[1] == {"mr": "m2", "ref": None}  # the row holds the prompt, and no response is needed
    path.write_text("id,mr\n1,m1\n2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.csv, row 2: the row has too few columns \(1 of the header's 2: "
                                         r"\['id', 'mr'\]\), so it has no \['mr'\] field"):
        sft_rows.read_rows(path, sft_cfg(tmp_path), responses=False)


def test_a_jsonl_row_is_one_newline_separated_line(tmp_path):
    """JSON allows U+2028 inside a string, and a CRLF file's \\r is not part of the row."""
    path = tmp_path / "a.jsonl"
    text = "".join(json.dumps({"mr": f"m{i}\u2028x\x0cy", "ref": "r"}, ensure_ascii=False) + "\r\n" for i in range(3))
    path.write_bytes("\ufeff".encode() + text.encode())
    rows = sft_rows.read_rows(path, sft_cfg(tmp_path))
    assert [row["mr"] for row in rows] == [f"m{i}\u2028x\x0cy" for i in range(3)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_bytes_that_are_not_utf8_are_named_by_file_line_and_offset(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    good = {".csv": b"mr,ref\nm1,r1\n", ".tsv": b"mr\tref\nm1\tr1\n", ".jsonl": b'{"mr": "m1", "ref": "r1"}\n'}[suffix]
    path.write_bytes(good + b"caf\xe9 au lait\n")
    with pytest.raises(ValueError) as err:
        sft_rows.read_rows(path, sft_cfg(tmp_path))
    line = good.count(b"\n") + 1
    assert str(err.value) == (f"{path}:{line}: not UTF-8 (byte 0xe9 at column 4), byte offset {len(good) + 3} of "
                              "the file; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)")
