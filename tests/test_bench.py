"""Smoke test of the benchmark harness (scripts/bench.py --quick) on a tiny OPT."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def _bench_main():
    spec = importlib.util.spec_from_file_location("vera_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_quick_bench_writes_every_number(tmp_path, capsys):
    out = tmp_path / "bench.json"
    _bench_main()(["--quick", "--ranks", "8", "--targets", "qv", "--repeats", "1",
                   "--variants", "floor", "peft", "ours", "ours-plain", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {"machine", "args", "shape", "cases", "wall_s"} <= set(data)
    assert data["shape"]["hidden"] == 64 and data["args"]["threads"] == 2
    (case,) = data["cases"]
    assert (case["r"], case["targets"]) == (8, "qv")
    rows = case["variants"]
    assert set(rows) == {"floor", "peft", "ours", "ours-plain"}
    for row in rows.values():
        assert {"median_s", "p25_s", "p75_s", "ratio_to_floor", "overhead_s", "saved_bytes", "saved_over_floor"} <= set(row)
        assert row["median_s"] > 0
    assert rows["floor"]["saved_over_floor"] == 0 and rows["floor"]["ratio_to_floor"] == 1.0
    assert rows["peft"]["saved_over_floor"] > 0
    assert rows["ours-plain"]["saved_over_floor"] == rows["peft"]["saved_over_floor"]  # same graph as PEFT
    assert 0 < rows["ours"]["saved_over_floor"] < rows["peft"]["saved_over_floor"]
    assert {"overhead_vs_peft", "saved_extra_vs_peft"} <= set(rows["ours"])
    assert case["merged_forward"]["ratio"] > 0
    assert "r=8  targets=qv" in capsys.readouterr().out
