"""benchmarks/bench_data_scale.py: the data it makes, resuming from its records, and the report (no training run)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import bench_data_scale as bench


def _source(tmp_path):
    source = tmp_path / "e2e"
    source.mkdir()
    (source / "train.csv").write_text('mr,ref\n"name[A], area[x]","A, by x."\nname[B],B is here.\n', encoding="utf-8")
    (source / "val.csv").write_text("mr,ref\nname[C],C.\n", encoding="utf-8")
    return source


def test_rows_repeat_the_source_and_cases_resume(tmp_path):
    source, out, calls = _source(tmp_path), tmp_path / "r.jsonl", []

    def runner(argv, log):  # a run fills its cache folder, so a warm case needs no filling run
        calls.append(argv)
        next(Path(a.split("=", 1)[1]) for a in argv if a.startswith("data.cache_dir=")).mkdir(exist_ok=True)
        return {"wall_s": 1.0 + len(calls), "peak_rss_gib": 1.0, "rc": 0}

    records = bench.run_cases([5, 7], out, tmp_path / "scratch", source, runner=runner)
    assert [(r["rows"], r["run"]) for r in records] == [(5, "cold"), (5, "warm"), (7, "cold"), (7, "warm")]
    with (tmp_path / "scratch" / "data-5" / "train.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["mr", "ref"] and len(rows) == 6 and rows[1] == rows[3] == ["name[A], area[x]", "A, by x."]
    assert "data.max_train_samples=null" in calls[0] and any(a.startswith("data.cache_dir=") for a in calls[0])
    assert bench.run_cases([5, 7], out, tmp_path / "scratch", source, runner=runner) == [] and len(calls) == 4
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["cpu_flags"] is not None
    assert "second run 7 / 5" in bench.report(out)
