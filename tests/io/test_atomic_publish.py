"""vera_lightning/io/atomic.py's publish (one command output: a folder or one file, under its save lock) and file
modes that follow the umask (0644 under 022, never mkstemp's or safetensors' 0600): replace_file, replace_directory,
save_adapter, export_gguf_lora (vera_lightning/io/gguf_lora.py) and the autotune cache
(vera_lightning/forward/tune_cache.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers.files import filled_adapter
from helpers.models import random_lambdas_, tiny_llama
from safetensors.torch import save_file

from vera_lightning import VeraConfig, apply_vera, export_gguf_lora, replace_file, save_adapter
from vera_lightning.forward.tune_cache import TuneFile
from vera_lightning.io import atomic, locks


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask for the test; the previous one is restored."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_umask_mode_is_what_open_gives(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert (atomic.umask_mode(), atomic.umask_mode(directory=True)) == (file_mode, dir_mode)
    (tmp_path / "plain").write_text("x")
    assert (tmp_path / "plain").stat().st_mode & 0o777 == file_mode


def test_every_writer_follows_the_umask(tmp_path, umask):
    umask(0o022)
    with replace_file(tmp_path / "out.jsonl") as handle:
        handle.write("{}\n")
    save_adapter(filled_adapter(0.5), tmp_path / "adapter")  # safetensors itself writes 0600
    model = apply_vera(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    random_lambdas_(model)
    export_gguf_lora(model, tmp_path / "a.gguf")
    TuneFile(tmp_path / "autotune.json").store("machine", "key", {"path": "lean", "ms": {"lean": 1.0}})
    modes = _modes(tmp_path)
    assert modes == {"out.jsonl": 0o644, "adapter": 0o755, "adapter/adapter_config.json": 0o644,
                     "adapter/adapter_model.safetensors": 0o644, "a.gguf": 0o644, "autotune.json": 0o644,
                     ".autotune.json.lock": 0o644}
    umask(0o077)  # a stricter umask is followed too
    save_adapter(filled_adapter(0.25), tmp_path / "adapter")
    assert _modes(tmp_path / "adapter") == {"adapter_config.json": 0o600, "adapter_model.safetensors": 0o600}


def test_publish_writes_a_folder_or_one_file_with_the_umasks_modes(tmp_path, umask):
    umask(0o022)

    def fill(path: str) -> None:
        save_file({"w": torch.ones(2)}, os.path.join(path, "model.safetensors"))
        os.mkdir(os.path.join(path, "sub"))

    atomic.publish(tmp_path / "out", fill)
    atomic.publish(tmp_path / "one.bin", lambda p: Path(p).write_bytes(b"GGUF1"), file=True)
    atomic.publish(tmp_path / "one.bin", lambda p: Path(p).write_bytes(b"GGUF2"), file=True)
    assert (tmp_path / "one.bin").read_bytes() == b"GGUF2"
    assert _modes(tmp_path) == {"one.bin": 0o644, "out": 0o755, "out/model.safetensors": 0o644, "out/sub": 0o755}


def test_a_failed_fill_or_check_changes_nothing(tmp_path):
    atomic.publish(tmp_path / "out", lambda p: Path(p, "a.txt").write_text("first"))

    def broken(path: str) -> None:
        Path(path, "a.txt").write_text("second")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic.publish(tmp_path / "out", broken)

    def refuse() -> None:
        raise FileExistsError("taken")

    with pytest.raises(FileExistsError, match="taken"):
        atomic.publish(tmp_path / "out", lambda p: Path(p, "a.txt").write_text("third"), check=refuse)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "first"


def test_a_second_writer_waits_then_its_check_sees_the_first_ones_output(tmp_path):
    started, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def slow_fill(path: str) -> None:
        started.set()
        release.wait(30)
        Path(path, "who").write_text("first")

    def check() -> None:
        seen.append(os.path.exists(tmp_path / "out"))
        if seen[-1]:
            raise FileExistsError("output appeared meanwhile")

    first = threading.Thread(target=atomic.publish, args=(tmp_path / "out", slow_fill), kwargs={"check": check})
    first.start()
    assert started.wait(30)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            atomic.publish(tmp_path / "out", lambda p: Path(p, "who").write_text("second"), check=check)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    other = threading.Thread(target=second)
    other.start()
    time.sleep(0.3)
    assert other.is_alive()  # waiting for the lock, not writing
    release.set()
    first.join(30)
    other.join(30)
    assert seen == [False, True] and [type(e) for e in errors] == [FileExistsError]
    assert (tmp_path / "out" / "who").read_text() == "first"


_KILLED = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from vera_lightning.io import atomic
    def fill(path):
        Path(path, "part").write_text("half")
        print("filling", flush=True)
        time.sleep(60)
    atomic.publish(sys.argv[1], fill)
""")


def test_staging_left_by_a_killed_publish_is_cleaned_by_the_next_one(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "filling"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert sorted(os.listdir(tmp_path)) == [".out.vera-tmp"]
    atomic.publish(tmp_path / "out", lambda p: Path(p, "done").write_text("ok"))
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["done"]


def test_publish_gives_up_after_the_timeout_writing_nothing(tmp_path):
    with locks.locked(str(tmp_path / "out")):
        with pytest.raises(TimeoutError, match="nothing was written"):
            atomic.publish(tmp_path / "out", lambda p: Path(p, "x").write_text("x"), timeout=0.2)
    assert os.listdir(tmp_path) == []
