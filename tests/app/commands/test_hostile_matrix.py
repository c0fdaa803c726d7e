"""The hostile matrix (issue 36 item 6): refusals and accepted commands of train, eval, predict and export, as
invariants over the whole temporary tree.

Every test works in a tree of its own (``tmp_path``, also the cwd, so Hydra's default ``outputs/`` would land in it):
a copy of one trained smoke run at ``runs/RUN`` (``train.py experiment=smoke callbacks=default
trainer.enable_checkpointing=true seed=7``, built once per module), the user's ``runs/notes.txt`` beside it, an empty
folder ``work/``, and a few files of the user's (a prompts file, an earlier predictions file, ...).

* A **refused** command exits with status 1 (or raises a user error in-process), names the option in its message,
  shows no traceback, and leaves the whole tree byte for byte as it was: every name, mode and byte
  (:func:`helpers.tree.snapshot`), directories included.
* An **accepted** command changes only its declared outputs (the set of added, removed or modified paths lies inside
  them).

The real entry points run in a subprocess where Hydra's own writes matter (``hydra.run.dir``, the cwd, a command's
record folder); the other refusals are called in-process (``train(cfg)``, ``evaluate(cfg)``, ...), which checks the
same plan and preflight without paying for an interpreter start each.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.app import SMOKE, compose_app, run_script
from helpers.tree import changed, describe, snapshot
from hydra.errors import CompactHydraException

from vera_lightning.app.commands.cli import is_user_error
from vera_lightning.app.commands.evaluate import evaluate
from vera_lightning.app.commands.export import export
from vera_lightning.app.commands.export_plan import register_export_schema
from vera_lightning.app.commands.planning import declared_outputs
from vera_lightning.app.commands.predict import predict
from vera_lightning.app.commands.train import train

#: RUN of the issue's hostile findings
RUN_ARGS = [*SMOKE, "callbacks=default", "trainer.enable_checkpointing=true", "seed=7"]
EVAL = [*SMOKE, "seed=7", "adapter={RUN}/adapter"]
PREDICT = [*SMOKE, "seed=7", "adapter={RUN}/adapter", "input={T}/prompts.txt", "generate.max_new_tokens=2",
           "progress=false"]
LORA = ["adapter={RUN}/adapter", "format=lora"]
#: three '\n' lines, with a BOM, a U+2028 LINE SEPARATOR and a form feed inside them (W3, S11)
PROMPT_LINES = ["first prompt", "second\u2028half", "third\x0cform"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The issue's RUN, trained once by ``scripts/train.py`` (its .hydra record written by the real entry point)."""
    home = tmp_path_factory.mktemp("hostile")
    done = run_script("train", *RUN_ARGS, f"hydra.run.dir={home / 'RUN'}", cwd=home)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (home / "RUN" / "checkpoints" / "last.ckpt").is_file() and (home / "RUN" / "plan.json").is_file()
    return home / "RUN"


@pytest.fixture
def tree(tmp_path, smoke_run, monkeypatch) -> Path:
    """A tree of this test's own, also the cwd: a copy of RUN at ``runs/RUN`` plus the user's files."""
    shutil.copytree(smoke_run, tmp_path / "runs" / "RUN", symlinks=True)
    (tmp_path / "runs" / "notes.txt").write_text("the user's notes beside their runs\n")
    (tmp_path / "work").mkdir()  # an empty folder: a hydra.run.dir that exists, so Hydra creates nothing
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a folder of the user's\n")
    (tmp_path / "old.jsonl").write_text('{"prompt": "an earlier prediction"}\n')
    (tmp_path / "old.gguf").write_bytes(b"GGUF an earlier export")
    (tmp_path / "latin1.txt").write_bytes("a prompt\nun café\n".encode("latin-1"))
    (tmp_path / "prompts.txt").write_text("\ufeff" + "\n".join(PROMPT_LINES) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_snapshot_sees_every_name_mode_and_byte(tmp_path):
    """The invariant's instrument: a test that cannot fail would pass these refusals whatever they wrote."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    before = snapshot(tmp_path)
    assert before == snapshot(tmp_path) and {".", "d", "d/f"} <= set(before)
    for change, name in [(lambda: (tmp_path / "d" / "f").write_bytes(b"abd"), "d/f"),
                         (lambda: (tmp_path / "d" / "f").chmod(0o600), "d/f"),
                         (lambda: (tmp_path / "d").chmod(0o700), "d"),
                         (lambda: (tmp_path / "e").mkdir(), "e"),
                         (lambda: (tmp_path / "l").symlink_to("d"), "l")]:
        change()
        after = snapshot(tmp_path)
        assert name in changed(before, after), name
        before = after


def _fill(args: list[str], root: Path) -> list[str]:
    return [a.format(T=root, RUN=root / "runs" / "RUN") for a in args]


def _in_process(command: str, out_dir: Path, args: list[str]) -> Any:
    """``command``'s in-process API on the real ``conf/<command>.yaml`` composed with ``args``."""
    config = {"train": "train", "eval": "eval", "predict": "predict", "export": "export"}[command]
    if command == "export":
        register_export_schema()
    cfg = compose_app(config, out_dir, *args)
    return {"train": train, "eval": evaluate, "predict": predict, "export": export}[command](cfg)


def _names(message: str, names: list[str]) -> None:
    for name in names:
        assert name in message, f"the message does not name {name!r}:\n{message}"


# ---------------------------------------------------------------------------------------------- refusals, in-process
# (command, arguments, what the message must name[, run dir: {T}/out by default]); {T}: the tree, {RUN}: its run
IN_PROCESS = {
    # train: unknown keys of every group (S5), types, the run's own options, checks before any write
    "train +data.max_lenght": ("train", [*SMOKE, "+data.max_lenght=5"], ["data.max_lenght"]),
    "train +optim.momentum": ("train", [*SMOKE, "+optim.momentum=0.9"], ["optim.momentum"]),
    "train +generate.foo": ("train", [*SMOKE, "+generate.foo=1"], ["generate.foo"]),
    "train +trainer.max_step": ("train", [*SMOKE, "+trainer.max_step=3"], ["trainer.max_step"]),
    "train overwrite=no": ("train", [*SMOKE, "overwrite=no"], ["overwrite"]),
    "train finetune=head": ("train", [*SMOKE, "finetune=head"], ["finetune=head", "modules_to_save"]),
    "train finetune=head export=merged": ("train", [*SMOKE, "finetune=head", "export=merged"], ["finetune=head"]),
    "train export=gguf-lora on OPT": ("train", [*SMOKE, "export=gguf-lora"], ["export=gguf-lora"]),
    "train trainer.accelerator=gpu": ("train", [*SMOKE, "trainer.accelerator=gpu"], ["trainer.accelerator"]),
    "train model.compute_dtype=fp16": ("train", [*SMOKE, "model.compute_dtype=fp16"], ["model.compute_dtype"]),
    # eval
    "eval adapter=/nonexistent": ("eval", [*SMOKE, "seed=7", "adapter=/nonexistent"], ["adapter="]),
    "eval +generate.foo": ("eval", [*EVAL, "+generate.foo=1"], ["generate.foo"]),
    "eval into RUN": ("eval", EVAL, ["hydra.run.dir"], "{RUN}"),
    # predict: outputs inside a run, over the input, over an earlier file, a wrong suffix, an untyped overwrite
    "predict output inside RUN": ("predict", [*PREDICT, "output={RUN}/preds.jsonl"], ["output="]),
    "predict output=the input": ("predict", [*PREDICT, "output={T}/prompts.txt"], ["output="]),
    "predict existing output": ("predict", [*PREDICT, "output={T}/old.jsonl"], ["overwrite=true"]),
    "predict overwrite=no": ("predict", [*PREDICT, "output={T}/new.jsonl", "overwrite=no"], ["overwrite"]),
    "predict output .tsv for a causal LM": ("predict", [*PREDICT, "output={T}/preds.tsv"], ["output=", ".jsonl"]),
    "predict into RUN": ("predict", PREDICT, ["hydra.run.dir"], "{RUN}"),
    "predict a non-UTF-8 input": ("predict", [*PREDICT, "input={T}/latin1.txt", "output={T}/p.jsonl"],
                                  ["latin1.txt:2:"]),  # U8: the file and the line
    # export: outputs that are, hold or lie inside an input (L1), an untyped overwrite (L2), all problems at once (U2)
    "export output=RUN": ("export", [*LORA, "output={RUN}", "overwrite=true"], ["output="]),
    "export output=parent of RUN": ("export", [*LORA, "output={T}/runs", "overwrite=true"], ["output="]),
    "export output=the ckpt's folder": ("export", ["adapter={RUN}/checkpoints/last.ckpt", "format=merged",
                                                   "output={RUN}/checkpoints", "overwrite=true"], ["output="]),
    "export output=the adapter": ("export", [*LORA, "output={RUN}/adapter", "overwrite=true"], ["output="]),
    "export output inside the adapter": ("export", [*LORA, "output={RUN}/adapter/lora"], ["output="]),
    "export seed= other than the run's": ("export", [*LORA, "output={T}/l", "seed=8"], ["seed="]),
    "export overwrite=no": ("export", [*LORA, "output={T}/mine", "overwrite=no"], ["overwrite"]),
    "export overwrite=off": ("export", [*LORA, "output={T}/mine", "overwrite=off"], ["overwrite"]),
    "export overwrite='false'": ("export", [*LORA, "output={T}/mine", "overwrite='false'"], ["overwrite"]),
    "export overwrite=true over the user's folder": ("export", [*LORA, "output={T}/mine", "overwrite=true"],
                                                     ["output="]),
    "export gguf-lora on OPT over an existing file": ("export", ["adapter={RUN}/adapter", "format=gguf-lora",
                                                                 "output={T}/old.gguf"],
                                                      ["format=gguf-lora", "'opt'", "output="]),  # U2: both
}


@pytest.mark.parametrize("case", list(IN_PROCESS))
def test_a_refused_command_changes_nothing(tree, case):
    command, args, names, out = (*IN_PROCESS[case], "{T}/out")[:4]
    if case == "train trainer.accelerator=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: trainer.accelerator=gpu is accepted")
    before = snapshot(tree)
    with pytest.raises(Exception) as caught:
        _in_process(command, Path(_fill([out], tree)[0]), _fill(args, tree))
    assert is_user_error(caught.value) or isinstance(caught.value, CompactHydraException), repr(caught.value)
    _names(str(caught.value), _fill(names, tree))
    after = snapshot(tree)
    assert after == before, describe(before, after)


# ------------------------------------------------------------------------------------------- refusals, entry points
# (script, arguments, what stderr must name); run with cwd={T}
SCRIPTS = {
    # train: into a training run without ckpt_path/overwrite; into a file; checks that come before any write (U1, U9)
    "train hydra.run.dir=RUN": ("train", [*RUN_ARGS, "hydra.run.dir={RUN}"], ["hydra.run.dir", "ckpt_path=last"]),
    "train hydra.run.dir=a file": ("train", [*SMOKE, "hydra.run.dir={T}/a-file"], ["hydra.run.dir"]),
    "train export=gguf-lora on OPT": ("train", [*SMOKE, "export=gguf-lora", "hydra.run.dir={T}/work"],
                                      ["export=gguf-lora"]),  # refused once the model is built: no train.log
    "train finetune=head": ("train", [*SMOKE, "finetune=head", "hydra.run.dir={T}/work"], ["finetune=head"]),
    # eval: never into a training run or its adapter (S7)
    "eval into RUN/adapter": ("eval", [*EVAL, "hydra.run.dir={RUN}/adapter"], ["hydra.run.dir"]),
    "eval into RUN/sub": ("eval", [*EVAL, "hydra.run.dir={RUN}/sub"], ["hydra.run.dir"]),  # no empty RUN/sub left
    # export: the cwd as output (L1, U4), a refused export into a run's hydra.run.dir (L3), a clean cwd (S10)
    "export output=$PWD": ("export", [*LORA, "output={T}", "overwrite=true"], ["output="]),
    "export output=.": ("export", [*LORA, "output=.", "overwrite=true"], ["output="]),
    "export hydra.run.dir=RUN": ("export", [*LORA, "output={T}/missing/x", "hydra.run.dir={RUN}"], ["output="]),
    "export adapter=/nonexistent": ("export", ["adapter=/nonexistent", "format=lora"], ["adapter="]),
    "export hydra.run.dir=a file": ("export", [*LORA, "output={T}/l", "hydra.run.dir={T}/a-file"],
                                    ["hydra.run.dir"]),
}


@pytest.mark.slow  # subprocesses (about 7 s of imports each)
@pytest.mark.parametrize("case", list(SCRIPTS))
def test_a_refused_entry_point_changes_nothing_and_shows_no_traceback(tree, case):
    script, args, names = SCRIPTS[case]
    before = snapshot(tree)
    done = run_script(script, *_fill(args, tree), cwd=tree)
    assert done.returncode == 1, f"rc={done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr[-3000:]
    _names(done.stderr, _fill(names, tree))
    after = snapshot(tree)
    assert after == before, describe(before, after)
    assert not (tree / "outputs").exists()


@pytest.mark.slow  # subprocesses (about 7 s of imports each)
@pytest.mark.parametrize("script, args", [
    ("train", [*SMOKE, "+data.max_lenght=5"]),
    ("eval", [*SMOKE, "adapter=/nonexistent"]),
    ("predict", [*SMOKE, "adapter=/nonexistent", "input=prompts.txt"]),
], ids=["train", "eval", "predict"])
def test_a_refused_command_from_a_clean_cwd_leaves_no_run_directory(tmp_path, script, args):
    """Hydra creates outputs/<date>/<time>/ before the task runs; a refused command removes it again."""
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    before = snapshot(tmp_path)
    done = run_script(script, *args, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    after = snapshot(tmp_path)
    assert after == before, describe(before, after)


# ---------------------------------------------------------------------------------------------- accepted commands
def _inside(name: str, allowed: list[str]) -> bool:
    """Whether tree path ``name`` is one of ``allowed`` (glob patterns), lies inside one, or is a folder above one."""
    for pattern in allowed:
        if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(name, pattern + "/*"):
            return True
        if pattern.startswith(name + "/"):  # a folder created to hold an output
            return True
    return False


def _only(before: dict, after: dict, allowed: list[str]) -> set[str]:
    """The changed paths, asserted to lie inside ``allowed`` (relative glob patterns)."""
    diff = changed(before, after)
    stray = sorted(n for n in diff if not _inside(n, allowed))
    assert not stray, f"changed outside the declared outputs {allowed}: {stray}\n{describe(before, after)}"
    return diff


def _declared(command: str, root: Path, run_dir: Path, options: dict[str, Any]) -> list[str]:
    """The plan's declared outputs of ``command``, relative to the tree."""
    return [str(Path(p).relative_to(root)) for p in declared_outputs(command, run_dir, options)]


@pytest.mark.slow  # subprocesses (about 7 s of imports each)
def test_an_accepted_export_writes_only_its_output_and_overwrite_replaces_only_it(tree):
    before = snapshot(tree)
    done = run_script("export", *_fill([*LORA, "output={T}/lora"], tree), cwd=tree)
    assert done.returncode == 0, done.stderr[-3000:]
    first = snapshot(tree)
    assert {"lora", "lora/adapter_config.json", "lora/adapter_model.safetensors"} <= _only(before, first, ["lora"])
    weights = (tree / "lora" / "adapter_model.safetensors").read_bytes()

    done = run_script("export", *_fill([*LORA, "output={T}/lora", "overwrite=true"], tree), cwd=tree)
    assert done.returncode == 0, done.stderr[-3000:]
    _only(first, snapshot(tree), ["lora"])
    assert (tree / "lora" / "adapter_model.safetensors").read_bytes() == weights  # the same export: the same bytes


@pytest.mark.slow  # subprocesses (about 7 s of imports each)
def test_an_accepted_eval_writes_only_its_run_dir_and_records_its_precision(tree):
    run = tree / "runs" / "RUN"
    before = snapshot(tree)
    metrics = {}
    for name, autotune in (("ev", "1"), ("ev0", "0")):
        done = run_script("eval", *_fill(EVAL, tree), f"hydra.run.dir={tree / name}", cwd=tree,
                          extra_env={"VERA_LIGHTNING_AUTOTUNE": autotune, "VERA_LIGHTNING_AUTOTUNE_CACHE": "off"})
        assert done.returncode == 0, done.stderr[-3000:]
        metrics[name] = json.loads((tree / name / "metrics.json").read_text())
        assert "precision" in metrics[name], sorted(metrics[name])
    after = snapshot(tree)
    _only(before, after, [*_declared("eval", tree, tree / "ev", {}), *_declared("eval", tree, tree / "ev0", {})])
    assert {n: e for n, e in after.items() if n.startswith("runs/")} == \
        {n: e for n, e in before.items() if n.startswith("runs/")}  # RUN byte for byte as it was
    assert list((tree / "ev").glob(".hydra-eval-*/config.yaml"))
    # the same numbers whatever VERA_LIGHTNING_AUTOTUNE says
    assert metrics["ev"]["val/loss"] == metrics["ev0"]["val/loss"]
    assert metrics["ev"]["precision"] == metrics["ev0"]["precision"]
    summary = json.loads((run / "summary.json").read_text())
    assert metrics["ev"]["val/loss"] == summary["val/loss"]  # eval reproduces the run's final metric


@pytest.mark.slow  # subprocesses (about 7 s of imports each)
def test_an_accepted_predict_writes_only_its_output_and_record_and_rows_follow_newlines(tree):
    before = snapshot(tree)
    done = run_script("predict", *_fill([*PREDICT, "output={T}/preds.jsonl"], tree), f"hydra.run.dir={tree / 'pr'}",
                      cwd=tree)
    assert done.returncode == 0, done.stderr[-3000:]
    after = snapshot(tree)
    _only(before, after, ["preds.jsonl", *_declared("predict", tree, tree / "pr", {})])
    rows = [json.loads(line) for line in (tree / "preds.jsonl").read_text(encoding="utf-8").split("\n") if line]
    assert [row["prompt"] for row in rows] == PROMPT_LINES  # W3: '\n' only; S11: no BOM in the first prompt
    records = list((tree / "pr").glob(".hydra-predict-*/plan.json"))
    assert len(records) == 1
    plan = json.loads(records[0].read_text())
    assert plan["command"] == "predict" and plan["precision"]["dtype"] in ("fp32", "bf16")


def test_two_exports_into_one_output_the_second_is_refused(tree):
    """L4, one after the other: the second export (overwrite=false) finds the first one's output and is refused."""
    before = snapshot(tree)
    first = _in_process("export", tree / "out", _fill([*LORA, "output={T}/o"], tree))
    assert Path(first.output) == tree / "o"
    written = snapshot(tree)
    _only(before, written, ["o"])
    with pytest.raises(Exception) as caught:
        _in_process("export", tree / "out", _fill(["adapter={RUN}/checkpoints/last.ckpt", "format=lora",
                                                   "output={T}/o"], tree))
    assert is_user_error(caught.value), repr(caught.value)
    _names(str(caught.value), ["overwrite"])
    assert snapshot(tree) == written


def test_export_of_a_run_dir_uses_its_adapter_and_model_without_seed_uses_the_runs_seed(tree):
    """U6: adapter=<run dir> means <run dir>/adapter. W2: model=tiny_opt without seed= merges onto the run's own base
    (seed 7), not a base drawn with the default seed: the same bytes as the export that reads the run's record."""
    before = snapshot(tree)
    _in_process("export", tree / "out", _fill(["adapter={RUN}", "format=merged", "output={T}/m1"], tree))
    try:
        _in_process("export", tree / "out", _fill(["adapter={RUN}/adapter", "format=merged", "model=tiny_opt",
                                                   "output={T}/m2"], tree))
    except Exception as err:  # refused (asks for seed=): then it wrote nothing
        assert is_user_error(err) and "seed=" in str(err), repr(err)
        assert not (tree / "m2").exists()
    else:
        assert (tree / "m2" / "model.safetensors").read_bytes() == (tree / "m1" / "model.safetensors").read_bytes()
    _only(before, snapshot(tree), ["m1", "m2"])


def test_export_of_a_run_without_its_record_asks_for_model_and_seed(tree):
    """U5: no .hydra beside the adapter: the message asks for model= and seed=, not a hub error."""
    shutil.rmtree(tree / "runs" / "RUN" / ".hydra")
    (tree / "runs" / "RUN" / "plan.json").unlink()
    before = snapshot(tree)
    with pytest.raises(Exception) as caught:
        _in_process("export", tree / "out", _fill([*LORA, "output={T}/l"], tree))
    assert is_user_error(caught.value), repr(caught.value)
    _names(str(caught.value), ["model=", "seed="])
    assert snapshot(tree) == before


@pytest.mark.slow  # subprocesses (about 7 s of imports each)
def test_a_resume_changes_only_the_runs_own_files(tree):
    run = tree / "runs" / "RUN"
    history = (run / "csv" / "metrics.csv").read_bytes()
    before = snapshot(tree)
    done = run_script("train", *RUN_ARGS, "trainer.max_epochs=2", "trainer.max_steps=4", "ckpt_path=last",
                      f"hydra.run.dir={run}", cwd=tree)
    assert done.returncode == 0, done.stderr[-3000:]
    after = snapshot(tree)
    diff = _only(before, after, _declared("train", tree, run, {}))
    assert {"runs/RUN/checkpoints/last.ckpt", "runs/RUN/adapter/adapter_model.safetensors",
            "runs/RUN/.hydra/resume.1/config.yaml", "runs/RUN/plan.resume.1.json"} <= diff
    assert not {n for n in diff if n.startswith("runs/RUN/.hydra/") and "/resume." not in n}  # the run's record kept
    assert (run / "csv" / "metrics.1.csv").read_bytes() == history  # the first part's metrics kept
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_a_resume_declares_every_file_it_writes(tmp_path):
    assert _inside("plan.resume.1.json", _declared("train", tmp_path, tmp_path, {"ckpt_path": "last"}))


@pytest.mark.slow  # a subprocess
def test_resuming_a_finished_run_keeps_its_metrics_history(tree):
    run = tree / "runs" / "RUN"
    history = (run / "csv" / "metrics.csv").read_bytes()
    before = snapshot(tree)
    done = run_script("train", *RUN_ARGS, "ckpt_path=last", f"hydra.run.dir={run}", cwd=tree)
    # refused: nothing left to train, nothing changed (the history, summary.json, the adapter, the record)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "already reached its end" in done.stderr and "raise trainer.max_epochs" in done.stderr
    assert snapshot(tree) == before and (run / "csv" / "metrics.csv").read_bytes() == history
