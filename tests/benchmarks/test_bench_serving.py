"""Smoke test of the serving benchmark (benchmarks/bench_serving.py --smoke) on a tiny BERT."""

from __future__ import annotations

import json

import bench_serving


def test_smoke_run_measures_every_variant_and_checks_outputs(tmp_path, capsys):
    out = tmp_path / "serving.json"
    report = bench_serving.main(["--smoke", "--lora-build-max", "3", "--json", str(out)])
    assert json.loads(out.read_text())["args"]["smoke"] is True
    (case,) = report["throughput"]
    assert set(case["median_s"]) == {"mixed", "loop", "single", "peft-loop"}
    assert all(t > 0 for t in case["median_s"].values())
    assert case["check"]["mixed_vs_loop_max_abs"] <= 1e-5 and case["check"]["peft_loop_vs_loop_max_abs"] <= 1e-5
    assert case["loop_over_mixed"] == case["median_s"]["loop"] / case["median_s"]["mixed"]
    rows = {row["adapters"]: row for row in report["memory"]}
    assert sorted(rows) == [1, 3, 8]
    # tiny BERT, hidden 32, r=8 on query/value of 2 layers: λ's (32 + 8) x 4 per adapter, projections 2 x 8 x 32
    for n, row in rows.items():
        assert row["vera_bytes"] == 4 * (n * 40 * 4 + 2 * 8 * 32)
        assert row["lora_bytes"] == 4 * n * 4 * 8 * (32 + 32) and row["lora_built"] == min(n, 3)
    assert "VeRA/LoRA" in capsys.readouterr().out
