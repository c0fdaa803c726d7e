"""predict (vera_lightning.app.commands.predict): every prompt checked before the output is opened, the output
written beside its target and renamed into place, Ctrl-C keeping the finished rows, a full disk leaving nothing.

The base tiny OPT (``experiment=smoke``, no adapter) is enough: these tests are about files, not about the model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest
from helpers.app import SMOKE, compose_app

import vera_lightning.app.generation.generate as generation
from vera_lightning.app.commands.cli import is_user_error
from vera_lightning.app.commands.predict import predict

PROMPTS = ["the film was", "a quiet story about a lighthouse keeper and his dog", "i did not expect", "music",
           "one more prompt of a middling length", "x", "the last but one", "the end"]
SFT = [*SMOKE, "data=sft", "data.data_dir=DATA", "data.train_file=train.csv", "data.val_file=val.csv",
       "data.prompt_field=mr", "data.response_field=ref", "data.max_length=64", "generate.max_new_tokens=4"]


def _tree(directory):
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _prompts(tmp_path, prompts=PROMPTS):
    path = tmp_path / "in" / "prompts.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def _cfg(tmp_path, *overrides):
    return compose_app("predict", tmp_path / "run", *SMOKE, "generate.max_new_tokens=3", "generate.batch_size=2",
                       "progress=false", *overrides)


@pytest.fixture
def out_dir(tmp_path):
    """A folder holding an earlier output and its earlier partial file (both must survive a refused run)."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "preds.jsonl").write_text('{"prompt": "old", "generation": "old"}\n', encoding="utf-8")
    (folder / "preds.jsonl.partial").write_text("old partial\n", encoding="utf-8")
    return folder


def test_a_prompt_too_long_for_max_new_tokens_leaves_the_old_output_byte_identical(tmp_path, out_dir):
    before = _tree(out_dir)
    with pytest.raises(ValueError, match=r"generate.max_new_tokens=500: \d+ positions"):
        predict(_cfg(tmp_path, f"input={_prompts(tmp_path)}", f"output={out_dir / 'preds.jsonl'}", "overwrite=true",
                     "generate.max_new_tokens=500"))
    assert _tree(out_dir) == before  # not truncated, no temporary or new file


def test_overwrite_replaces_the_old_file_only_once_every_row_is_written(tmp_path, out_dir, monkeypatch):
    output = out_dir / "preds.jsonl"
    old = output.read_bytes()
    seen = []
    real = generation._generate_batch

    def watched(*args, **kwargs):
        hidden = [name for name in os.listdir(out_dir) if name.startswith(".preds.jsonl.")]
        seen.append(output.read_bytes() == old and len(hidden) == 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "_generate_batch", watched)
    predict(_cfg(tmp_path, f"input={_prompts(tmp_path)}", f"output={output}", "overwrite=true"))
    assert seen and all(seen)  # while generating: the old file as it was, the new rows in a hidden temporary file
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == PROMPTS
    assert sorted(os.listdir(out_dir)) == ["preds.jsonl", "preds.jsonl.partial"]  # no temporary file left


def test_max_new_tokens_cut_is_marked_finished_false(tmp_path):
    out = predict(_cfg(tmp_path, f"input={_prompts(tmp_path, PROMPTS[:3])}", "generate.max_new_tokens=2"))
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["finished"] for row in rows] == [False, False, False]  # 2 random tokens never include the EOS


def test_ctrl_c_keeps_the_finished_rows_in_input_order_in_a_partial_file(tmp_path, out_dir, monkeypatch, capsys):
    full = predict(_cfg(tmp_path, f"input={_prompts(tmp_path)}", f"output={tmp_path / 'full.jsonl'}"))
    reference = [json.loads(line) for line in full.read_text(encoding="utf-8").splitlines()]
    calls, real = [], generation._generate_batch

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # longest first: after 2 batches of 2, prompts 1, 4, 6, 0 or so are done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "_generate_batch", interrupted)
    before = _tree(out_dir)
    with pytest.raises(KeyboardInterrupt):
        predict(_cfg(tmp_path, f"input={_prompts(tmp_path)}", f"output={out_dir / 'preds.jsonl'}", "overwrite=true"))
    after = _tree(out_dir)
    kept = out_dir / "preds.jsonl.partial.1"  # preds.jsonl.partial was taken: never replaced
    assert {k: v for k, v in after.items() if k != kept.name} == before
    rows = [json.loads(line) for line in kept.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and [row["index"] for row in rows] == sorted(row["index"] for row in rows)
    assert rows == [{**reference[row["index"]], "index": row["index"]} for row in rows]
    message = capsys.readouterr().out
    assert f"the 4 of {len(PROMPTS)} rows finished so far are in {kept}" in message and "was not written" in message


def test_a_full_disk_leaves_no_file_and_one_message_naming_it(tmp_path, monkeypatch):
    output = tmp_path / "out" / "preds.jsonl"
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError) as caught:
        predict(_cfg(tmp_path, f"input={_prompts(tmp_path)}", f"output={output}"))
    assert caught.value.errno == errno.ENOSPC and is_user_error(caught.value)
    assert str(output) in str(caught.value) and "Nothing was written" in str(caught.value)
    assert list(output.parent.iterdir()) == []


def test_a_causal_lm_output_not_named_jsonl_is_refused_before_the_model(tmp_path, monkeypatch):
    import vera_lightning.app.commands.predict as predict_module

    monkeypatch.setattr(predict_module, "build_components", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ValueError, match=r"output='.*preds.tsv': a causal LM writes JSON lines .* name the file "
                                         r"\.jsonl, e\.g\. output='.*preds.jsonl'"):
        predict(_cfg(tmp_path, f"input={_prompts(tmp_path)}", f"output={tmp_path / 'preds.tsv'}"))
    assert not (tmp_path / "preds.tsv").exists()


@pytest.mark.parametrize("rows, message", [
    ('mr,n\n"",1\n', r"row 1: empty prompt in column 'mr' \(data.prompt_field\)"),
])
def test_an_empty_prompt_is_refused_before_the_model_and_before_any_output(tmp_path, out_dir, monkeypatch, rows,
                                                                           message):
    import vera_lightning.app.commands.predict as predict_module

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "val.csv"):
        (data / name).write_text("mr,ref\nname[A],A is here.\n", encoding="utf-8")
    table = tmp_path / "in.csv"
    table.write_text(rows, encoding="utf-8")
    monkeypatch.setattr(predict_module, "build_components", lambda *a, **k: pytest.fail("built the model"))
    before = _tree(out_dir)
    overrides = [o.replace("DATA", str(data)) for o in SFT]
    with pytest.raises(ValueError, match=message):
        predict(compose_app("predict", tmp_path / "run", *overrides, f"input={table}",
                            f"output={out_dir / 'preds.jsonl'}", "overwrite=true"))
    assert _tree(out_dir) == before


def test_a_classification_output_not_named_tsv_is_refused_before_the_model(tmp_path, monkeypatch):
    import vera_lightning.app.commands.predict as predict_module

    monkeypatch.setattr(predict_module, "build_components", lambda *a, **k: pytest.fail("built the model"))
    cfg = compose_app("predict", tmp_path / "run", f"input={_prompts(tmp_path)}", f"output={tmp_path / 'p.jsonl'}")
    with pytest.raises(ValueError, match=r"output='.*p.jsonl': classification writes tab-separated lines with a "
                                         r"header row; name the file \.tsv, e\.g\. output='.*p.tsv'"):
        predict(cfg)
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "run").exists()


def test_one_row_per_input_line_whatever_unicode_calls_a_line_break_and_no_bom(tmp_path):
    """Issue 36 W3/S11: U+2028 and a form feed stay inside their row; a UTF-8 BOM never reaches the output."""
    lines = ["first prompt", "second\u2028half", "third\x0cform"]
    path = tmp_path / "lsep.txt"
    path.write_bytes("\ufeff".encode() + ("\n".join(lines) + "\n").encode())
    out = tmp_path / "preds.jsonl"
    predict(_cfg(tmp_path, f"input={path}", f"output={out}", "generate.max_new_tokens=1"))
    data = out.read_bytes()
    assert not data.startswith("\ufeff".encode()) and "\ufeff".encode() not in data
    rows = [json.loads(line) for line in data.decode("utf-8").split("\n") if line]
    assert [row["prompt"] for row in rows] == lines


def test_a_non_utf8_input_is_refused_before_the_model_naming_file_line_and_fix(tmp_path, monkeypatch):
    import vera_lightning.app.commands.predict as predict_module

    monkeypatch.setattr(predict_module, "build_components", lambda *a, **k: pytest.fail("built the model"))
    path = tmp_path / "in.txt"
    path.write_bytes(b"first prompt\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"in.txt:2: not UTF-8 \(byte 0xe9 at column 4\), byte offset 16 of the "
                                         r"file; save the file as UTF-8") as err:
        predict(_cfg(tmp_path, f"input={path}"))
    assert is_user_error(err.value)
    assert not (tmp_path / "run").exists()
