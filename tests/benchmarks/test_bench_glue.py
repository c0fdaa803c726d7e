"""The GLUE benchmark's entry point, CI-sized: a few real rows of two tasks, 2 steps per run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_glue_report import END, START, table

ROOT = Path(__file__).resolve().parents[2]
GLUE = (ROOT / ".." / "shared" / "data" / "glue").resolve()
SCRIPT = str(ROOT / "benchmarks" / "bench_glue.py")
VERA = 6 * 2 * (384 + 256)  # λ_d + λ_b on query/value of 6 layers, r=256
LORA = 6 * 2 * 8 * (384 + 384)  # A and B on query/value of 6 layers, r=8


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE / "stsb" / "dev.tsv").is_file(), reason=f"GLUE data not found at {GLUE}")
def test_ci_sized_run_writes_table_plot_and_docs_and_completes_across_sittings(tmp_path):
    docs = tmp_path / "glue_doc.md"
    docs.write_text(f"# intro\n\n{START}\nold\n{END}\n\nkept after\n")
    args = [sys.executable, SCRIPT, "--out", str(tmp_path / "out"), "--tasks", "rte", "stsb", "--methods",
            "vera_r256", "lora_r8", "--seeds", "0", "--train-rows", "8", "--dev-rows", "12", "--max-steps", "2",
            "--jobs", "2", "--docs", str(docs), "--override", "data.batch_size=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VERA_GLUE_DIR": str(GLUE)}
    first = subprocess.run([*args[:2], "--limit", "3", *args[2:]], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (first.stdout.count("queued") == 3
            and "Not yet measured (1 runs): STS-B lora_r8 seeds [0]" in docs.read_text())
    assert "--limit" not in docs.read_text().split("Complete the table")[1]  # the command runs everything missing
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("queued") == 1  # the 3 recorded runs are reused

    runs = [json.loads(x) for x in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    params = {(r["task"], r["method"]): r["trainable_params"] for r in runs}
    assert len(runs) == 4 and params == {("rte", "vera_r256"): VERA + 770, ("stsb", "vera_r256"): VERA + 385,
                                         ("rte", "lora_r8"): LORA + 770, ("stsb", "lora_r8"): LORA + 385}
    assert all(r["steps"] == 2 and r["signature"]["rows"] == 8 for r in runs)
    assert {r["metric_name"] for r in runs if r["task"] == "stsb"} == {"val/pearson"}

    text = docs.read_text()
    assert text.startswith("# intro") and text.endswith("kept after\n") and "old" not in text
    assert "| method | trainable params | RTE acc | STS-B Pearson | average |" in text
    assert "| vera_r256 | 8,065–8,450 |" in text and "Every planned cell is measured" in text
    rows = list(csv.DictReader((tmp_path / "out" / "glue.csv").open()))
    assert len(rows) == 4 and {r["metric"] for r in rows} == {"val/acc", "val/pearson"}
    assert (tmp_path / "out" / "glue.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_means_stds_average_and_gap_from_records():
    def rec(task, method, seed, value, params):
        return {"task": task, "method": method, "seed": seed, "metric": value, "metric_name": "m",
                "trainable_params": params, "saved_bytes": 1, "wall_s": 1.0}

    tasks = ["rte", "mrpc", "stsb", "cola", "sst2"]
    records = [rec(t, "vera_r256", s, 0.5 + 0.1 * i + 0.01 * s, 8450) for i, t in enumerate(tasks) for s in (0, 1, 2)]
    records += [rec(t, "lora_r8", 0, 0.52 + 0.1 * i, 74498) for i, t in enumerate(tasks)]
    text = table(records)
    # VeRA on RTE: 50, 51, 52 -> 51.0 ± 1.0; average of the task means 51, 61, 71, 81, 91 -> 71.0
    assert "| vera_r256 | 8,450 | 51.0 ± 1.0 | 61.0 ± 1.0 | 71.0 ± 1.0 | 81.0 ± 1.0 | 91.0 ± 1.0 | 71.0 |" in text
    assert "| lora_r8 | 74,498 | 52.0 ± 0.0 (1 seed) |" in text and "| 72.0 |" in text
    assert "RTE -1.0" in text and "average -1.0 over 5 task(s)" in text and "LoRA trains 8.8× VeRA's" in text


def test_docs_without_markers_is_refused_before_any_run(tmp_path):
    docs = tmp_path / "plain.md"
    docs.write_text("no markers\n")
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "out"), "--docs", str(docs)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "holding the <!-- bench_glue:start -->" in done.stderr
    assert not (tmp_path / "out").exists()
