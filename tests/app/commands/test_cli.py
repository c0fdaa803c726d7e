"""The entry points' error boundary: a user error prints one message (no traceback) and exits non-zero.

Each test starts ``scripts/<entry>.py`` in a subprocess, as a user would.
"""

from __future__ import annotations

import errno
import os

import pytest
from helpers.app import run_script
from helpers.models import tiny_opt

from vera_lightning import VeraConfig, apply_vera, save_adapter
from vera_lightning.app.commands.cli import UserError, user_errors

SMOKE = ["experiment=smoke", "trainer.enable_progress_bar=false"]


def _fails_cleanly(proc, *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_bad_adapter_path(tmp_path):
    proc = run_script("eval", *SMOKE, f"adapter={tmp_path / 'nowhere'}", cwd=tmp_path)
    _fails_cleanly(proc, f"Error: adapter='{tmp_path / 'nowhere'}': no such file or directory. adapter= takes")
    assert not list(tmp_path.rglob("metrics.json"))


def test_mismatched_adapter(tmp_path):
    model = apply_vera(tiny_opt(hidden=48), VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="some/other-model")
    proc = run_script("eval", *SMOKE, f"adapter={tmp_path / 'adapter'}", cwd=tmp_path)
    stderr = _fails_cleanly(proc, f"Error: adapter='{tmp_path / 'adapter'}' cannot be used with model=tiny_opt",
                            "adapter (48,), model (32,)", "The adapter was trained on 'some/other-model'")
    assert stderr.count("Error:") == 1


def test_bad_option_value_and_bad_trainer_key(tmp_path):
    proc = run_script("train", *SMOKE, "optim.lr=-1", cwd=tmp_path)
    # checked at startup
    _fails_cleanly(proc, "Error: Invalid configuration:", "optim.lr=-1: must be a finite number > 0")
    proc = run_script("train", *SMOKE, "+trainer.max_step=1", cwd=tmp_path)  # refused by the plan, before any work
    _fails_cleanly(proc, "Error: Invalid configuration:", "trainer.max_step (did you mean max_steps?): not a Lightning "
                   "Trainer argument")


@pytest.mark.slow  # a subprocess each (about 10 s of imports)
def test_composition_error_is_hydras_compact_message(tmp_path):
    proc = run_script("predict", *SMOKE, "vera.r=abc", "input=x.txt", cwd=tmp_path)
    _fails_cleanly(proc, "Value 'abc' of type 'str' could not be converted to Integer")


def test_model_unavailable_offline_prints_only_its_message(tmp_path):
    proc = run_script("train", "model=opt125m", "model.name_or_path=vera-lightning-tests/no-such-model", cwd=tmp_path)
    stderr = _fails_cleanly(proc, "Error: Could not load the tokenizer for "
                                  "model.name_or_path='vera-lightning-tests/no-such-model'", "`model=tiny_opt`")
    assert "File \"" not in stderr  # not even a partial stack


@pytest.mark.slow  # a subprocess each (about 10 s of imports)
def test_missing_predict_input(tmp_path):
    proc = run_script("predict", *SMOKE, f"input={tmp_path / 'prompts.txt'}", cwd=tmp_path)
    _fails_cleanly(proc, f"Error: input='{tmp_path / 'prompts.txt'}': no such file")


@pytest.mark.slow  # a subprocess each (about 10 s of imports)
def test_hydra_full_error_shows_the_traceback(tmp_path):
    proc = run_script("eval", *SMOKE, f"adapter={tmp_path / 'nowhere'}", cwd=tmp_path,
                      extra_env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "FileNotFoundError: adapter=" in proc.stderr


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_or_read_only_disk_is_the_users_message_not_a_traceback(tmp_path, monkeypatch, code):
    """A save that the machine refuses (disk full, read-only, forbidden) prints save_adapter's message alone."""
    import vera_lightning.io.adapter_files as adapter_files

    def fail(tensors, filename, metadata=None):
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(adapter_files, "write_safetensors", fail)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    model = apply_vera(tiny_opt(hidden=48), VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(UserError, match=rf"^Error: \[Errno {code}\] save_adapter could not write '{tmp_path}/adapter': "
                                        rf"{os.strerror(code)}\. Nothing was changed: .* was not created"):
        user_errors(lambda: save_adapter(model, tmp_path / "adapter"))()
    assert not (tmp_path / "adapter").exists()


def test_a_held_save_lock_is_a_user_error_and_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def raises(err):
        def task():
            raise err
        return user_errors(task)

    with pytest.raises(UserError, match=r"^Error: another process has been saving"):
        raises(TimeoutError("another process has been saving into '/x' for more than 120 s"))()
    with pytest.raises(OSError) as info:  # a bad file descriptor is the program's fault: unchanged
        raises(OSError(errno.EBADF, "Bad file descriptor"))()
    assert not isinstance(info.value, UserError) and info.value.errno == errno.EBADF
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(OSError) as info:  # HYDRA_FULL_ERROR=1: nothing is converted
        raises(OSError(errno.ENOSPC, "No space left on device"))()
    assert info.value.errno == errno.ENOSPC
