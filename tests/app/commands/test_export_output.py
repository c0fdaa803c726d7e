"""An export's output (vera_lightning/app/commands/export_output.py): never an input, its run or the cwd; replaced only
when it is an earlier export of the same format; a read-only folder refused before the model loads; a second export
to the same output refused under the lock; leftovers of killed exports cleaned; files with the umask's modes.

Refusals are invariants: the whole temporary tree is byte for byte the same afterwards (names, modes, bytes). An
accepted export changes only its output.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from test_export import changed, fake_run, refused, save_tokenizer, snapshot
from test_export_plan import forbid_loading

from vera_lightning.app.commands import export as export_module
from vera_lightning.app.commands.export import export_run
from vera_lightning.app.commands.export_output import clean_export_leftovers, output_kind
from vera_lightning.io import locks

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def run(tmp_path, tokenizer_dir):
    """A training run with adapter/, .hydra/, a csv/ and checkpoints/last.ckpt, inside a project folder."""
    path, _ = fake_run(tmp_path / "project", "llama", tokenizer_dir)
    (path / "csv").mkdir()
    (path / "csv" / "metrics.csv").write_text("step,loss\n")
    (path / "checkpoints").mkdir()
    shutil.copy(FIXTURES / "slim_v0.1.0_epoch0_step4.ckpt", path / "checkpoints" / "last.ckpt")
    (path.parent / "notes.txt").write_text("the user's notes")
    return path


@pytest.mark.parametrize("fmt", ["lora", "merged"])
@pytest.mark.parametrize("where, why", [
    ("{run}", "is the training run's directory"),
    ("{run}/..", "contains the training run's directory"),
    ("{run}/adapter", "is the adapter"),
    ("{run}/adapter/x", "lies inside the adapter"),
    ("{run}/.hydra", "is the training run's .hydra"),
    ("{run}/checkpoints", "is the training run's checkpoints"),
    ("{run}/csv/x", "lies inside the training run's csv"),
    (".", "is the current directory"),
    ("/", "contains the current directory"),
])
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(tmp_path, run, monkeypatch, fmt, where, why):
    monkeypatch.chdir(run.parent)
    forbid_loading(monkeypatch)
    output = where.format(run=run)
    message = refused(tmp_path, why, run / "adapter", fmt, output, overwrite=True)
    assert f"output={output!r}" in message


def test_a_checkpoints_own_folder_is_refused(tmp_path, run, monkeypatch):
    forbid_loading(monkeypatch)
    ckpt = run / "checkpoints" / "last.ckpt"
    refused(tmp_path, r"is the checkpoint's folder|is the training run's checkpoints", ckpt, "merged",
            run / "checkpoints", overwrite=True)
    refused(tmp_path, "is the checkpoint being exported", run / "checkpoints" / "last.ckpt", "gguf-lora",
            run / "checkpoints" / "last.ckpt", overwrite=True)


def test_the_base_models_folder_is_an_input(tmp_path, run, monkeypatch):
    export_run(run / "adapter", "merged", tmp_path / "base")  # a model folder, used as a base below
    shutil.copytree(run / "adapter", tmp_path / "moved" / "adapter")  # an adapter away from its run
    forbid_loading(monkeypatch)
    base = {"model": {"name": "llama", "task": "causal_lm", "name_or_path": str(tmp_path / "base"), "tokenizer": None,
                      "from_config": None}}
    refused(tmp_path, r"is the base model's folder \(name_or_path=", tmp_path / "moved" / "adapter", "merged",
            tmp_path / "base", overwrite=True, base=base)


def test_the_default_output_goes_beside_the_adapter_and_changes_nothing_else(tmp_path, run):
    before = snapshot(tmp_path)
    result = export_run(run / "adapter", "lora")
    assert result.output == run / "lora"
    lora = "project/run-llama/lora"
    assert changed(before, snapshot(tmp_path)) == {lora, f"{lora}/adapter_config.json",
                                                   f"{lora}/adapter_model.safetensors"}


@pytest.mark.parametrize("fmt", ["merged", "lora", "gguf-lora"])
def test_overwrite_replaces_only_an_earlier_export_of_its_own_format(tmp_path, run, fmt):
    mine = tmp_path / ("mine.gguf" if fmt == "gguf-lora" else "mine")
    earlier = {"dtype": "bf16"} if fmt == "merged" else {"rank": 2}  # an earlier export with other contents
    export_run(run / "adapter", fmt, mine, **earlier)
    before = snapshot(tmp_path)
    export_run(run / "adapter", fmt, mine, overwrite=True)
    replaced = changed(before, snapshot(tmp_path))
    assert replaced and all(name.startswith(mine.name) for name in replaced)
    for other in [f for f in ("merged", "lora", "gguf-lora") if f != fmt]:
        target = tmp_path / (f"{other}.gguf" if "gguf-lora" in (fmt, other) else other)
        export_run(run / "adapter", other, target)
        refused(tmp_path, rf"holds a {other} export .*not a {fmt} one; overwrite=true replaces only an earlier {fmt}",
                run / "adapter", fmt, target, overwrite=True)
    foreign = tmp_path / ("notes.gguf" if fmt == "gguf-lora" else "notes")
    if fmt == "gguf-lora":
        foreign.write_text("my notes")
    else:
        foreign.mkdir()
        (foreign / "config.json").write_text("{}")  # a model folder with the user's notes beside it
        (foreign / "model.safetensors").write_bytes(b"x")
        (foreign / "notes.txt").write_text("my notes")
    refused(tmp_path, "not even with overwrite=true", run / "adapter", fmt, foreign, overwrite=True)


def test_a_read_only_folder_is_refused_before_the_model_loads(tmp_path, run, monkeypatch):
    forbid_loading(monkeypatch)
    locked = tmp_path / "ro"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    message = refused(tmp_path, r"output='.*ro/m': its folder '.*ro' is (on a read-only file system|not writable)",
                      run / "adapter", "merged", locked / "m")
    assert "Choose output= in a folder you can write" in message and ".export-" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_refused(tmp_path, run, monkeypatch):  # pragma: no cover - not root
    forbid_loading(monkeypatch)
    (tmp_path / "ro").mkdir(mode=0o555)
    refused(tmp_path, "is not writable by this user", run / "adapter", "merged", tmp_path / "ro" / "m")


def test_a_second_export_to_the_same_output_is_refused_under_the_lock(tmp_path, run, monkeypatch):
    export_run(run / "adapter", "lora", tmp_path / "first")  # what the faster export writes
    target = tmp_path / "out"
    planned = threading.Event()
    real_load = export_module._load

    def load(plan):
        planned.set()  # this export passed its plan: the output did not exist then
        return real_load(plan)

    monkeypatch.setattr(export_module, "_load", load)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            export_run(run / "adapter", "lora", target, rank=2)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    with locks.locked(str(target)):  # the first export is publishing
        thread = threading.Thread(target=second)
        thread.start()
        assert planned.wait(60)
        shutil.copytree(tmp_path / "first", target)
    thread.join(60)
    assert [type(e) for e in errors] == [FileExistsError]
    assert "already holds an earlier lora export" in str(errors[0]) and "while this export ran" in str(errors[0])
    assert snapshot(target) == snapshot(tmp_path / "first")  # the first export's output, untouched
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".")) == []


def test_leftovers_of_killed_exports_are_cleaned_and_foreign_ones_kept(tmp_path, run):
    out = tmp_path / "out"
    (tmp_path / ".out.export-k3j2x9" / "model").mkdir(parents=True)  # an older version's staging folder
    (tmp_path / ".out.export-k3j2x9" / "model" / "config.json").write_text("{}")
    (tmp_path / ".out.vera-tmp" / "new").mkdir(parents=True)  # this version's staging area, killed mid-write
    (tmp_path / ".out.vera-tmp" / "new" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.1234.partial").write_bytes(b"GGUF half")
    (tmp_path / ".out.export-notes").mkdir()  # not an export's: kept
    (tmp_path / ".out.export-notes" / "notes.txt").write_text("mine")
    export_run(run / "adapter", "merged", out)
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".out")) == [".out.export-notes"]
    (tmp_path / ".out.export-old-77").mkdir()  # an earlier output parked by a killed replace, the output gone
    for f in out.iterdir():
        shutil.copy(f, tmp_path / ".out.export-old-77" / f.name)
    shutil.rmtree(out)
    assert clean_export_leftovers(out) == [".out.export-old-77"] and output_kind(out)[0] == "merged"


def test_outputs_follow_the_umask(tmp_path, run):
    previous = os.umask(0o022)
    try:
        for fmt, out in (("merged", tmp_path / "m"), ("lora", tmp_path / "l"), ("gguf-lora", tmp_path / "g.gguf")):
            export_run(run / "adapter", fmt, out)
            for path in [out, *out.rglob("*")]:
                assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    finally:
        os.umask(previous)
