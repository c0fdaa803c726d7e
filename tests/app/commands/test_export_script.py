"""scripts/export.py under Hydra (conf/export.yaml, RunDirCheck in vera_lightning/app/runs/run_dirs.py): a refused
export writes nothing anywhere, not a .hydra/ record into hydra.run.dir (a training run's record stays intact), not an
outputs/export/... folder in the cwd, not a job log; an accepted one writes only its output; bad run dirs and outputs
end in one message, never a traceback.

Each case snapshots the whole temporary tree (every file's name, mode and bytes) around the command.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.app import run_script
from omegaconf import OmegaConf
from test_export import changed, fake_run, save_tokenizer, snapshot

from vera_lightning.app.runs.run_dirs import RunDirCheck


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_the_callback_removes_only_the_empty_folders_it_saw_missing(tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "keep.txt").write_text("x")
    config = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "outputs" / "export" / "day" / "time")}}})
    callback = RunDirCheck()
    callback.on_run_start(config)
    (tmp_path / "outputs" / "export" / "day" / "time").mkdir(parents=True)  # what Hydra does next
    callback.on_run_end(config)
    assert snapshot(tmp_path) == {"outputs": ("dir", (tmp_path / "outputs").lstat().st_mode),
                                  "outputs/keep.txt": ("file", (tmp_path / "outputs" / "keep.txt").lstat().st_mode,
                                                       b"x")}
    callback.on_run_start(config)
    (tmp_path / "outputs" / "export" / "day" / "time").mkdir(parents=True)
    (tmp_path / "outputs" / "export" / "day" / "time" / "export.log").write_text("written")
    callback.on_run_end(config)  # something was written there: the folder stays
    assert (tmp_path / "outputs" / "export" / "day" / "time" / "export.log").is_file()


@pytest.fixture
def setup(tmp_path, tokenizer_dir):
    """A training run under tmp/runs and a project folder tmp/work (the cwd) holding the user's files."""
    run, _ = fake_run(tmp_path / "runs", "llama", tokenizer_dir)
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "main.py").write_text("print('mine')\n")
    return run, work


def _refused(tmp_path: Path, work: Path, *args: str) -> str:
    before = snapshot(tmp_path)
    done = run_script("export", *args, cwd=work)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before  # nothing written: not the run's .hydra, not outputs/ in the cwd, no log
    return done.stderr


def test_a_refused_export_into_a_training_runs_dir_changes_nothing(tmp_path, setup):
    run, work = setup
    message = _refused(tmp_path, work, f"adapter={run / 'adapter'}", "format=lora", f"output={tmp_path / 'no' / 'x'}",
                       f"hydra.run.dir={run}", "overwrite=no")
    assert "overwrite='no': must be true or false" in message and "does not exist" in message


@pytest.mark.slow  # a subprocess (about 10 s of imports)
def test_a_refused_export_creates_no_run_dir_in_the_cwd(tmp_path, setup):
    _, work = setup
    message = _refused(tmp_path, work, f"adapter={tmp_path / 'nonexistent'}", "format=lora")
    assert "no such file or directory" in message


@pytest.mark.slow  # two subprocesses (about 10 s of imports each)
def test_a_run_dir_inside_a_file_and_the_cwd_as_output_are_one_message_each(tmp_path, setup):
    run, work = setup
    message = _refused(tmp_path, work, f"adapter={run / 'adapter'}", "format=lora",
                       f"hydra.run.dir={work / 'main.py' / 'x'}")
    assert "is a file, not a directory" in message and message.count("\n") <= 2
    message = _refused(tmp_path, work, f"adapter={run / 'adapter'}", "format=lora", "output=.", "overwrite=true")
    assert "output='.' is the current directory" in message


def test_an_accepted_export_writes_only_its_output(tmp_path, setup):
    run, work = setup
    before = snapshot(tmp_path)
    done = run_script("export", f"adapter={run}", "format=merged", "output=m", cwd=work)
    assert done.returncode == 0, done.stderr
    assert f"is a training run: exporting its adapter ({run / 'adapter'})" in done.stdout
    assert "dtype             : float32" in done.stdout and "from its training run" in done.stdout
    assert {n for n in changed(before, snapshot(tmp_path)) if not n.startswith("work/m/")} == {"work/m"}
    assert (work / "m" / "model.safetensors").is_file() and not (work / "outputs").exists()
