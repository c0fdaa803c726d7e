"""benchmarks/bench_e2e.py: its runs.jsonl, when corrupt or another benchmark's, is refused in one message naming the
file (no traceback) and left byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import bench_e2e
import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORD = {"method": "zero_shot", "seed": 0, "metrics": {"val/bleu": 1.0}, "trainable_params": 0, "model_bytes": 10,
          "tokens": 0, "fit_s": None, "tokens_per_s": None, "steps": 0, "wall_s": 2.5, "peak_rss_bytes": 100,
          "threads": 2, "signature": {"rows": 16}}


def test_its_own_records_are_read():
    path = ROOT / "benchmarks" / "e2e" / "runs.jsonl"
    records = bench_e2e.load_runs(path)
    assert records and {r["method"] for r in records} <= set(bench_e2e.METHODS)


@pytest.mark.parametrize("content, why", [
    (json.dumps(RECORD) + "\n" + json.dumps(RECORD)[:40] + "\n", "line 2 is not JSON"),
    ('{"kind": "bench_peers", "format": 1, "method": "ours"}\n', "line 1 is not a bench_e2e record (missing or wrong: "
                                                                  "seed, signature, metrics"),
    ("[1, 2]\n", "line 1 is not a bench_e2e record (missing or wrong: list)"),
])
def test_a_corrupt_or_foreign_runs_file_is_one_message_and_left_as_it_was(tmp_path, content, why):
    runs = tmp_path / "runs.jsonl"
    runs.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit, match=re.escape(f"bench_e2e: {runs}: {why}")):
        bench_e2e.load_runs(runs)
    before = hashlib.sha256(runs.read_bytes()).hexdigest()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"bench_e2e: {runs}: {why}") and "move it away or pass another --out" in \
        done.stderr
    assert "Traceback" not in done.stderr
    assert hashlib.sha256(runs.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.jsonl"]
