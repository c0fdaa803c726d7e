"""Smoke test of the benchmark harness (benchmarks/bench.py --quick) on a tiny OPT."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


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
    assert (case["r"], case["targets"], case["tokens"]) == (8, "qv", 2 * 16)
    rows = case["variants"]
    assert set(rows) == {"floor", "peft", "ours", "ours-plain"}
    for row in rows.values():
        assert {"median_s", "p25_s", "p75_s", "ratio_to_floor", "overhead_s", "saved_bytes",
                "saved_over_floor"} <= set(row)
        assert row["median_s"] > 0
    assert rows["floor"]["saved_over_floor"] == 0 and rows["floor"]["ratio_to_floor"] == 1.0
    assert rows["peft"]["saved_over_floor"] > 0
    assert rows["ours-plain"]["saved_over_floor"] == rows["peft"]["saved_over_floor"]  # same graph as PEFT
    assert 0 < rows["ours"]["saved_over_floor"] < rows["peft"]["saved_over_floor"]
    assert {"overhead_vs_peft", "saved_extra_vs_peft"} <= set(rows["ours"])
    assert case["merged_forward"]["ratio"] > 0
    assert "r=8  targets=qv" in capsys.readouterr().out


def test_token_sweep_reports_the_path_auto_took(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    _bench_main()(["--quick", "--ranks", "16", "--targets", "qv", "--repeats", "1", "--batch", "1", "8",
                   "--seq-len", "4", "32", "--variants", "floor", "peft", "ours", "ours-merged", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [(c["batch"], c["seq_len"], c["tokens"]) for c in data["cases"]] == [(1, 4, 4), (1, 32, 32), (8, 4, 32),
                                                                              (8, 32, 256)]
    assert data["shape"]["seq_len"] == 32  # position embeddings sized for the longest case
    for case in data["cases"]:
        rows = case["variants"]
        assert sum(case["auto_paths"].values()) == 2 * 2  # 2 layers x (q_proj, v_proj)
        assert set(case["auto_paths"]) <= {"lean", "save_h", "merged", "plain"}
        assert rows["ours-merged"]["paths"] == {"merged": 4}
        x_bytes = 2 * case["tokens"] * 64 * 4  # the q/v input, once per block (2 blocks, hidden 64, float32)
        assert rows["ours-merged"]["saved_over_floor"] == x_bytes
        assert 0 < rows["ours"]["saved_over_floor"] <= x_bytes  # auto: x, or h = x·A_sᵀ when r·4 <= in·4
    printed = capsys.readouterr().out
    assert "N=256 (B=8, T=32)  auto took" in printed


def test_an_interrupted_run_resumes_and_another_commands_file_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    command = ["--quick", "--ranks", "8", "--targets", "qv", "--repeats", "1", "--batch", "1", "2",
               "--variants", "floor", "ours", "--merged-repeats", "0", "--json", str(out)]
    main = _bench_main()
    main(command)
    first = json.loads(out.read_text())
    assert [c["batch"] for c in first["cases"]] == [1, 2]
    # as if the run had been killed after its first case
    cut = dict(first, cases=first["cases"][:1])
    out.write_text(json.dumps(cut))
    resumed = main(command)
    assert "resuming" in capsys.readouterr().out
    assert resumed["cases"][0] == first["cases"][0]  # kept as measured, not measured again
    assert [c["batch"] for c in resumed["cases"]] == [1, 2]
    assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(resumed["cases"]))
    before = out.read_bytes()
    with pytest.raises(SystemExit, match=r"options differing: repeats\)\. Nothing was measured.*pass another --json"):
        main([*command[:-2], "--repeats", "2", "--json", str(out)])
    assert out.read_bytes() == before
