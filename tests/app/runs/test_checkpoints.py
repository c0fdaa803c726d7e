"""vera_lightning/app/runs/checkpoints.py (RunCheckpoint): best.ckpt is the best of the run that owns the directory
(after overwrite=true, after resuming a moved or copied run directory), and a full disk while a checkpoint is saved
leaves the previous file intact, no partial file, and a message naming the file."""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from helpers.app import SMOKE, compose_app

from vera_lightning.app.commands.cli import is_user_error
from vera_lightning.app.commands.train import train

# 16 lines in batches of 4: 4 steps per epoch, best.ckpt and last.ckpt after every epoch
LONG = [*SMOKE, "callbacks=default", "trainer.enable_checkpointing=true", "trainer.max_steps=-1",
        "data.max_train_samples=16", "eval_before=false"]


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = _ckpt(a)["state_dict"], _ckpt(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_overwrite_true_makes_best_ckpt_the_new_runs(tmp_path):
    run = tmp_path / "run"
    train(compose_app("train", run, *LONG, "trainer.max_epochs=1"))
    old_best = _digest(run / "checkpoints" / "best.ckpt")
    train(compose_app("train", run, *LONG, "trainer.max_epochs=1", "seed=5", "overwrite=true"))
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # no best-v1.ckpt
    assert _digest(checkpoints / "best.ckpt") != old_best
    assert _same_weights(checkpoints / "best.ckpt", checkpoints / "last.ckpt")  # one epoch: its end is the best


@pytest.mark.parametrize("mode, best_step", [("min", 8), ("max", 4)])
def test_a_moved_run_directory_resumes_with_its_best_score_and_replaces_its_own_best_ckpt(tmp_path, mode, best_step):
    # val/loss falls: with mode=min epoch 2 is the new best; with mode=max epoch 1 stays best (its score was kept)
    options = [*LONG, f"callbacks.model_checkpoint.mode={mode}"]
    train(compose_app("train", tmp_path / "first", *options, "trainer.max_epochs=1"))
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "first", moved)
    train(compose_app("train", moved, *options, "trainer.max_epochs=2", "ckpt_path=last"))
    checkpoints = moved / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert _ckpt(checkpoints / "best.ckpt")["global_step"] == best_step
    assert _ckpt(checkpoints / "last.ckpt")["global_step"] == 8
    assert _ckpt(tmp_path / "first" / "checkpoints" / "last.ckpt")["global_step"] == 4  # the original untouched


def test_a_full_disk_while_saving_last_ckpt_keeps_the_previous_one_and_names_the_file(tmp_path, monkeypatch):
    from lightning.fabric.plugins.io import torch_io

    real_save = torch_io._atomic_save

    def full_disk(checkpoint, path):
        if checkpoint["global_step"] == 8 and "last" in Path(path).name:
            with open(path, "wb") as f:  # what a copy over the target does before the disk fills
                f.write(b"\x80\x02half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(OSError) as raised:
        train(compose_app("train", run, *LONG, "trainer.max_epochs=2"))
    last = run / "checkpoints" / "last.ckpt"
    assert raised.value.errno == errno.ENOSPC and is_user_error(raised.value)
    assert str(raised.value) == (
        f"[Errno 28] cannot save the checkpoint {last} (No space left on device); the previous last.ckpt is intact "
        "and no partial file was left. Free space there (or point hydra.run.dir elsewhere) and resume with "
        "ckpt_path=last")
    assert _ckpt(last)["global_step"] == 4  # the previous checkpoint, whole
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
