"""benchmarks/bench_data_scale.py: the data it makes, resuming from its records, and the report (no training run)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import bench_data_scale as bench
import pytest


def _source(tmp_path):
    source = tmp_path / "e2e"
    source.mkdir()
    (source / "train.csv").write_text('mr,ref\n"name[A], area[x]","A, by x."\nname[B],B is here.\n', encoding="utf-8")
    (source / "val.csv").write_text("mr,ref\nname[C],C.\n", encoding="utf-8")
    return source


def _cache(argv):
    """The cache folder a command names: ours' ``data.cache_dir=`` or TRL's ``--cache-dir``."""
    if "--cache-dir" in argv:
        return Path(argv[argv.index("--cache-dir") + 1])
    return next(Path(a.split("=", 1)[1]) for a in argv if a.startswith("data.cache_dir="))


def _runner(calls, rc=0):
    """A fake ``timed``: records the call and whether its cache folder was there, fills the folder, writes a log
    as TRL's script and ``/usr/bin/time -v`` would."""

    def runner(argv, log):
        cache = _cache(argv)
        calls.append({"argv": argv, "cache_was_there": cache.is_dir(), "log": log})
        cache.mkdir(parents=True, exist_ok=True)
        log.write_text('noise\n{"first_step_s": 3.5, "steps": 2}\n\tMaximum resident set size (kbytes): 1\n')
        return {"wall_s": 1.0 + len(calls), "peak_rss_gib": 1.0, "rc": rc}

    return runner


def _record(rows, run, wall, tool=None):
    return {"rows": rows, "run": run, "wall_s": wall, "peak_rss_gib": 2.0, "rc": 0, "load_before": [0.5],
            **({"tool": tool} if tool else {})}


def test_rows_repeat_the_source_and_cases_resume(tmp_path):
    source, out, calls = _source(tmp_path), tmp_path / "r.jsonl", []

    def runner(argv, log):  # a run fills its cache folder, so a warm case needs no filling run
        calls.append(argv)
        next(Path(a.split("=", 1)[1]) for a in argv if a.startswith("data.cache_dir=")).mkdir(exist_ok=True)
        return {"wall_s": 1.0 + len(calls), "peak_rss_gib": 1.0, "rc": 0}

    records = bench.run_cases([5, 7], out, tmp_path / "scratch", source, runner=runner, tools=["ours"])
    assert [(r["rows"], r["run"]) for r in records] == [(5, "cold"), (5, "warm"), (7, "cold"), (7, "warm")]
    with (tmp_path / "scratch" / "data-5" / "train.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["mr", "ref"] and len(rows) == 6 and rows[1] == rows[3] == ["name[A], area[x]", "A, by x."]
    assert "data.max_train_samples=null" in calls[0] and any(a.startswith("data.cache_dir=") for a in calls[0])
    assert bench.run_cases([5, 7], out, tmp_path / "scratch", source, runner=runner, tools=["ours"]) == []
    assert len(calls) == 4
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["cpu_flags"] is not None
    assert "second run 7 / 5" in bench.report(out)


def test_trl_cases_follow_ours_on_the_same_file_with_a_cache_of_their_own(tmp_path):
    source, out, scratch, calls = _source(tmp_path), tmp_path / "r.jsonl", tmp_path / "scratch", []
    (scratch / "trl-cache-5").mkdir(parents=True)  # an earlier invocation's cache: the cold case must not see it
    (scratch / "trl-cache-5" / "stale.arrow").write_text("x")
    records = bench.run_cases([5], out, scratch, source, runner=_runner(calls))
    assert [(r["rows"], r["tool"], r["run"]) for r in records] == [
        (5, "ours", "cold"), (5, "ours", "warm"), (5, "trl", "cold"), (5, "trl", "warm")]
    trl_cold, trl_warm = calls[2], calls[3]
    argv = trl_cold["argv"]
    assert argv[1].endswith("benchmarks/bench_data_scale_trl.py") and argv[argv.index("--steps") + 1] == "2"
    assert f"data.data_dir={argv[argv.index('--data-dir') + 1]}" in calls[0]["argv"]  # the same file as ours
    assert argv[argv.index("--data-dir") + 1] == str(scratch / "data-5")
    assert _cache(argv) == scratch / "trl-cache-5" != _cache(calls[0]["argv"])
    assert not trl_cold["cache_was_there"] and trl_warm["cache_was_there"]
    assert trl_cold["log"] == scratch / "run-5-trl-cold.log" and calls[0]["log"] == scratch / "run-5-cold.log"
    assert records[2]["first_step_s"] == 3.5 and records[2]["steps"] == 2 and "first_step_s" not in records[0]
    assert records[2]["command"].startswith(str(bench.ROOT / "benchmarks" / "bench_data_scale_trl.py"))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["tool"], r["run"]) for r in lines] == [("ours", "cold"), ("ours", "warm"), ("trl", "cold"),
                                                      ("trl", "warm")]
    assert bench.run_cases([5], out, scratch, source, runner=_runner(calls), tools=["trl"]) == [] and len(calls) == 4


def test_a_resumed_invocation_skips_done_trl_cases_and_reads_old_records_as_ours(tmp_path):
    source, out, scratch, calls = _source(tmp_path), tmp_path / "r.jsonl", tmp_path / "scratch", []
    failed = {**_record(5, "warm", 9.0, tool="trl"), "rc": 1}
    out.write_text("".join(json.dumps(r) + "\n" for r in [
        _record(5, "cold", 4.0), _record(5, "warm", 3.0), _record(5, "cold", 8.0, tool="trl"), failed]))
    assert bench.done_cases(out) == {(5, "ours", "cold"), (5, "ours", "warm"), (5, "trl", "cold")}
    records = bench.run_cases([5], out, scratch, source, runner=_runner(calls))
    # only TRL's warm case runs; its cold run's cache is gone, so an unrecorded run fills it first
    assert [(r["tool"], r["run"]) for r in records] == [("trl", "warm")]
    assert [c["log"].name for c in calls] == ["run-5-trl-fill.log", "run-5-trl-warm.log"]
    assert all(c["argv"][1].endswith("bench_data_scale_trl.py") for c in calls) and calls[1]["cache_was_there"]
    assert bench.run_cases([5], out, scratch, source, runner=_runner(calls)) == [] and len(calls) == 2


def test_unknown_tools_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"\['peft'\] unknown; use some of \['ours', 'trl'\]"):
        bench.run_cases([5], tmp_path / "r.jsonl", tmp_path / "scratch", _source(tmp_path), runner=_runner([]),
                        tools=["ours", "peft"])
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "scratch").exists()


def test_report_has_both_tools_and_the_first_run_ratio_ours_over_trl(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [
        _record(5, "cold", 4.0), _record(5, "warm", 3.0), _record(5, "cold", 8.0, tool="trl"),
        _record(5, "warm", 6.0, tool="trl"), _record(7, "cold", 5.0, tool="ours"), _record(7, "warm", 3.3, tool="ours"),
        {**_record(7, "cold", 1.0, tool="trl"), "rc": 1}]))
    text = bench.report(out)
    header, rule, row5, row7 = text.splitlines()[:4]
    assert header.count("|") == rule.count("|") == row5.count("|") == 9 and "TRL first run" in header
    assert row5 == "| 5 | 4.0 s | 3.0 s | 2.0 GiB / 2.0 GiB | 8.0 s | 6.0 s | 2.0 GiB / 2.0 GiB | 0.5 |"
    assert row7 == "| 7 | 5.0 s | 3.3 s | 2.0 GiB / 2.0 GiB | – | – | – / – | 0.5 |"
    assert "second run 7 / 5: 1.10x" in text
    assert "first run, ours / TRL: 5: 0.50x (target <= 1.0)" in text  # 7 has no successful TRL cold run


def test_the_long_set_joins_references_and_both_tools_keep_its_rows_whole(tmp_path):
    source, calls = _source(tmp_path), []
    bench.run_cases([3], tmp_path / "r.jsonl", tmp_path / "scratch", source, runner=_runner(calls), join=2)
    with (tmp_path / "scratch" / "data-3" / "train.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[1:] == [["name[A], area[x]", "A, by x. B is here."], ["name[B]", "B is here. A, by x."],
                        ["name[A], area[x]", "A, by x. B is here."]]
    ours, trl = calls[0]["argv"], calls[2]["argv"]
    assert "data.max_length=512" in ours and trl[trl.index("--max-length") + 1] == "512"
