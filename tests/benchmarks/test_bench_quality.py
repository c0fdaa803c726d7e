"""The quality benchmark's entry point on a few dozen real SST-2 rows (2 steps per method)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
VERA = 6 * 2 * (384 + 256)  # λ_d + λ_b on query/value of 6 layers, r=256
LORA = 6 * 2 * 8 * (384 + 384)  # A and B on query/value of 6 layers, r=8


@pytest.mark.slow
@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason="needs ../shared/data/sst2")
def test_bench_quality_writes_table_csv_and_plot(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--data-dir", str(SST2), "--out",
           str(tmp_path), "--train-rows", "40", "--dev-rows", "24", "--max-steps", "2", "--seeds", "0", "1",
           "--methods", "head", "vera_r256", "--jobs", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "quality.md").read_text()
    assert "| head |" in table and "| vera_r256 |" in table and "| 2 | 770 |" in table
    rows = list(csv.DictReader((tmp_path / "quality.csv").open()))
    assert [r["method"] for r in rows] == ["head", "vera_r256"]
    assert int(rows[1]["trainable_params"]) == VERA + 770  # λ's + classifier
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 4
    # a second call reuses the recorded runs instead of training again
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "started" not in again.stdout
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 4
    # LoRA (bench_app.train_lora) and full fine-tuning (finetune=full) join the table: only they run
    more = subprocess.run([*cmd[: cmd.index("--seeds")], "--seeds", "0", "--methods", "head", "vera_r256", "lora_r8",
                           "full", "--jobs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert more.returncode == 0, more.stderr[-3000:]
    assert sorted(x for x in more.stdout.splitlines() if "started" in x) == [
        "[bench_quality] started full seed=0", "[bench_quality] started lora_r8 seed=0"]
    records = {(r["method"], r["seed"]): r for r in map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())}
    assert len(records) == 6 and all(r["steps"] == 2 for r in records.values())
    lora, full, vera = records["lora_r8", 0], records["full", 0], records["vera_r256", 0]
    assert (lora["trainable_params"], lora["lr"], lora["head_lr"]) == (LORA + 770, 5e-4, 4e-3)
    # the same model under each method; PEFT keeps the original classifier beside the copy it trains
    base = records["head", 0]["total_params"]
    assert (lora["total_params"], vera["total_params"]) == (base + LORA + 770, base + VERA)
    assert full["trainable_params"] == full["total_params"] == base
    assert (full["lr"], full["head_lr"]) == (5e-5, 5e-5)  # every weight, the classifier included
    assert (vera["lr"], vera["head_lr"], records["head", 0]["lr"]) == (2e-2, 4e-3, None)
    assert all(0 < r["train_s"] and r["model_bytes"] > 4 * r["total_params"] * 0.99 for r in records.values())
    assert "| lora_r8 |" in (tmp_path / "quality.md").read_text()


def test_bench_quality_rejects_a_missing_data_dir(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--data-dir",
                           str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"--data-dir={str(tmp_path)!r} holds no train.tsv" in done.stderr
    assert not (tmp_path / "out").exists()
