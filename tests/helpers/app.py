"""Helpers for the app's tests: composing conf/, running the entry points, test-only callbacks, W&B files."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from vera_lightning.app import register_configs

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
SCRIPTS = ROOT / "scripts"
#: quick causal-LM training: tiny random OPT, 16 lines, 4 steps per epoch
SMOKE = ["experiment=smoke", "trainer.enable_progress_bar=false"]


def compose_app(config: str, output_dir: Path, *overrides: str):
    """The real ``conf/<config>.yaml`` composed with ``overrides``, writing under ``output_dir``."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=[f"paths.output_dir={output_dir}", *overrides])


def env() -> dict[str, str]:
    """Environment of an entry-point subprocess: this checkout first on the path, never the Hub."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_script(script: str, *args: str, cwd: Path, extra_env: dict[str, str] | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>.py args`` and return the finished process (text output)."""
    return subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), *args], cwd=cwd,
                          env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)


def start_script(script: str, *args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``scripts/<script>.py args`` in the background (output to ``cwd/<script>.log``)."""
    log = open(cwd / f"{script}.log", "w")
    return subprocess.Popen([sys.executable, str(SCRIPTS / f"{script}.py"), *args], cwd=cwd,
                            env={**env(), **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, timeout: float = 240.0, what: str = "condition", proc: subprocess.Popen | None = None) -> None:
    """Poll ``condition()`` every 50 ms; fail after ``timeout`` s or if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited (rc={proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SlowDown(Callback):
    """Sleep after every training batch, so a test can interrupt a run mid-training."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        time.sleep(self.seconds)


class StopAfterEpoch(Callback):
    """Stop training gracefully at the end of epoch ``epoch`` (an interrupted run, minus the kill)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


# ------------------------------------------------------------------ W&B offline run files
def wandb_records(run_file: Path) -> Iterator[Any]:
    """The protobuf records of an offline ``run-<id>.wandb`` file, parsed with wandb's own schema.

    wandb (0.31) has no Python reader for these files (its Go core writes and syncs them), so
    this undoes only the framing: a 7-byte ``:W&B`` header, then LevelDB-log records
    (4-byte CRC, 2-byte length, 1-byte type: full/first/middle/last) in 32 KiB blocks. Each
    payload is a ``wandb.proto.wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        elif kind in (2, 3):
            pending += payload
