"""vera_lightning/app/runs/run_dirs.py (check_command_dir, RunDirCheck), records.py (command_record_name): eval.py and
predict.py never write into a training run's directory, and write their own record once their checks passed."""

from __future__ import annotations

import hashlib

from helpers.app import run_script

SMOKE = ["experiment=smoke", "trainer.enable_progress_bar=false", "generate.progress=false"]


def _tree(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _training_run(directory):
    """What scripts/train.py leaves in its run directory (its record, CSV history, summary, train.log)."""
    (directory / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (directory / ".hydra" / name).write_text(f"# the training run's {name}\n- data=e2e\n", encoding="utf-8")
    (directory / "csv").mkdir()
    (directory / "csv" / "metrics.csv").write_text("step,val/loss\n1,2.0\n", encoding="utf-8")
    (directory / "summary.json").write_text('{"metric": 1.0}\n', encoding="utf-8")
    (directory / "train.log").write_text("training\n", encoding="utf-8")
    return directory


def test_eval_and_predict_into_a_training_run_are_refused_leaving_it_byte_identical(tmp_path):
    run = _training_run(tmp_path / "run")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the film was\n", encoding="utf-8")
    before = _tree(run)
    for script, extra in (("eval", []), ("predict", [f"input={prompts}", f"output={tmp_path / 'p.jsonl'}"])):
        done = run_script(script, *SMOKE, f"hydra.run.dir={run}", *extra, cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        assert f"hydra.run.dir='{run}' holds a training run (.hydra, summary.json, csv); {script}.py never writes " \
               "into a training run's directory" in done.stderr
        assert "Traceback" not in done.stderr
        assert _tree(run) == before  # .hydra/config.yaml, hydra.yaml, overrides.yaml, csv/, the log: as they were
    assert not (tmp_path / "p.jsonl").exists()


def test_eval_writes_its_own_record_in_its_own_directory(tmp_path):
    done = run_script("eval", *SMOKE, f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = sorted(p.name for p in (tmp_path / "ev").iterdir() if p.name.startswith(".hydra"))
    assert len(records) == 1 and records[0].startswith(".hydra-eval-")  # never a .hydra/ a training run could own
    assert sorted(p.name for p in (tmp_path / "ev" / records[0]).iterdir()) == ["config.yaml", "hydra.yaml",
                                                                                 "overrides.yaml", "plan.json"]
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_a_run_dir_that_is_a_file_is_one_message_without_traceback(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine\n", encoding="utf-8")
    for target in (afile, afile / "sub"):
        done = run_script("eval", *SMOKE, f"hydra.run.dir={target}", cwd=tmp_path)
        assert done.returncode == 1
        assert done.stderr.strip() == (f"Error: hydra.run.dir='{target}': {afile} is a file, not a directory; nothing "
                                       "was written. Give a directory path, or leave hydra.run.dir unset")
    assert afile.read_text(encoding="utf-8") == "mine\n"


def test_train_into_a_run_dir_that_is_a_file_is_one_message_without_traceback(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine\n", encoding="utf-8")
    for target in (afile, afile / "sub"):
        done = run_script("train", "experiment=smoke", "trainer.enable_progress_bar=false",
                          f"hydra.run.dir={target}", cwd=tmp_path)
        assert done.returncode == 1
        assert done.stderr.strip() == (f"Error: hydra.run.dir='{target}': {afile} is a file, not a directory; nothing "
                                       "was written. Give a directory path, or leave hydra.run.dir unset")
    assert afile.read_text(encoding="utf-8") == "mine\n"
