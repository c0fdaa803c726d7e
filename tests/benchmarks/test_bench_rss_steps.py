"""benchmarks/bench_rss_steps.py: the growth it reports, and that a finished case is not run again."""

from __future__ import annotations

import json

import bench_rss_steps as bench
import pytest


def test_growth_is_measured_from_step_100_to_the_end():
    trace = [(s, 2.0 + (0.004 * (s - 100) if s > 100 else 0.0)) for s in range(1, 301)]  # flat, then +0.4 GiB/100
    out = bench.summarise(trace)
    assert out["growth_gib_per_100_steps"] == pytest.approx(0.4)
    assert out["rss_gib_at"] == {"10": 2.0, "50": 2.0, "100": 2.0, "200": 2.4, "300": 2.8}
    assert out["max_over_step_100"] == pytest.approx(1.4)


def test_a_short_run_measures_from_mid_run():
    out = bench.summarise([(s, 1.0 + s / 100) for s in range(1, 41)])
    assert out["growth_gib_per_100_steps"] == pytest.approx(1.0) and set(out["rss_gib_at"]) == {"10", "40"}


def test_finished_cases_are_skipped(tmp_path, monkeypatch):
    out = tmp_path / "rss.jsonl"
    out.write_text(json.dumps({"mode": "kernels", "variant": "pad1", "dtype": "fp32", "steps": 346}) + "\n")
    ran = []

    def fake_run(argv, **kwargs):
        ran.append(argv[argv.index("--child") + 1])

        class Done:
            returncode, stdout, stderr = 0, json.dumps({"rss_gib_at": {}, "growth_gib_per_100_steps": 0.0}), ""
        return Done()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    bench.main(["--mode", "kernels", "--variants", "pad1", "pad8", "--out", str(out), "--scratch", str(tmp_path)])
    assert ran == ["pad8"]
    assert [json.loads(line)["variant"] for line in out.read_text().splitlines()] == ["pad1", "pad8"]
    bench.main(["--mode", "kernels", "--variants", "pad1", "pad8", "--out", str(out), "--scratch", str(tmp_path)])
    assert ran == ["pad8"]
