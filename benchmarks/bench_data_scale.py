"""Data at scale: wall time and peak RSS of a 2-step E2E run on N rows, first run (cold data cache) and second (warm).

For each N, ``train.csv`` repeats the rows of the E2E training file (``../shared/data/e2e/train.csv``, or ``--source``)
to N rows in a scratch folder (never in the source's), beside a copy of ``val.csv``; then, as a user would::

    python scripts/train.py experiment=e2e_smollm2 data.data_dir=<dir> data.max_train_samples=null \\
        trainer.max_steps=2 eval_before=false trainer.limit_val_batches=0 data.cache_dir=<scratch>/cache-<N> \\
        hydra.run.dir=<scratch>/run-...

(``trainer.limit_val_batches=0``: the run ends after step 2, without the validation loss and the 60 prompts'
generation, which cost the same at every N and would only dilute the ratios.)

runs under ``/usr/bin/time -v`` (its "Maximum resident set size" is the peak RSS), once with an empty cache folder
(``cold``) and once more (``warm``).

Then, for the same N, TRL's ``SFTTrainer`` (``--tools``; default both), as a TRL user would run it on the same file::

    python benchmarks/bench_data_scale_trl.py --data-dir <dir> --cache-dir <scratch>/trl-cache-<N> --output-dir ...

(``datasets.load_dataset("csv")`` on the same ``train.csv`` with its cache in that folder, the same rows as
prompt/completion conversations in the same prompt template and chat template, PEFT's VeRA with the same r=256 on
q_proj/v_proj, the same batch size 8 and max length 192, the same base model built by the app's loader, 2 steps), under
the same ``/usr/bin/time -v``: ``trl-cold`` with its cache folder deleted first, ``trl-warm`` reusing it (TRL's
tokenised rows, cached by ``Dataset.map``'s fingerprint). The question is issue 37's: does our first run on N rows cost
a user more than TRL's does (``first run, ours / TRL``, target <= 1.0)?

One JSON record per finished case is appended to ``--out`` (``tool`` ``ours`` or ``trl``, ``run`` ``cold`` or ``warm``,
with the load average and the CPU's flags; a record without ``tool`` is ours), and cases already there are skipped, so
an interrupted benchmark resumes where it stopped.

    python benchmarks/bench_data_scale.py --rows 4000 200000 --out benchmarks/results/data_scale.jsonl --tools ours trl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "e2e"
RUNS = ("cold", "warm")
TOOLS = ("ours", "trl")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def make_data(source: Path, rows: int, folder: Path, join: int = 1) -> Path:
    """``folder`` with ``train.csv`` (``source``'s training rows repeated to ``rows`` rows) and ``val.csv``.

    ``join`` > 1: the synthetic long SFT set: each row's response is ``join`` consecutive references joined by
    spaces (``join=9``: about 300 tokens a row with the chat template, against about 80 for E2E's own rows).
    """
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "train.csv"
    if not (folder / "done").is_file():
        with (source / "train.csv").open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header, body = next(reader), list(reader)
        with train.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            ref = header.index("ref")
            for i in range(rows):
                row = list(body[i % len(body)])
                if join > 1:
                    row[ref] = " ".join(body[(i + k) % len(body)][ref] for k in range(join))
                writer.writerow(row)
        shutil.copyfile(source / "val.csv", folder / "val.csv")
        (folder / "done").write_text(str(rows))
    return folder


def command(data_dir: Path, cache_dir: Path, run_dir: Path, max_length: int = 192) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=e2e_smollm2", f"data.data_dir={data_dir}",
            f"data.max_length={max_length}",
            "data.max_train_samples=null", "trainer.max_steps=2", "eval_before=false", "trainer.limit_val_batches=0",
            f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]


def trl_command(data_dir: Path, cache_dir: Path, run_dir: Path, max_length: int = 192) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "bench_data_scale_trl.py"), "--data-dir", str(data_dir),
            "--cache-dir", str(cache_dir), "--output-dir", str(run_dir), "--steps", "2",
            "--max-length", str(max_length)]


COMMANDS = {"ours": command, "trl": trl_command}
CACHES = {"ours": "cache", "trl": "trl-cache"}  # <scratch>/<this>-<N>


def timed(argv: list[str], log: Path) -> dict:
    """Run ``argv`` under ``/usr/bin/time -v``: ``{"wall_s", "peak_rss_gib", "rc"}``."""
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(["/usr/bin/time", "-v", *argv], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - start
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text(errors="replace"))
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(int(found.group(1)) / 2**20, 3) if found else None,
            "rc": rc}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    return [flag for flag in FLAGS if flag in flags]


def read_records(out: Path) -> list[dict]:
    """``out``'s records, each with its ``tool`` (a record written before TRL was measured is ours)."""
    if not out.is_file():
        return []
    return [{"tool": "ours", **json.loads(line)} for line in out.read_text().splitlines() if line.strip()]


def done_cases(out: Path) -> set[tuple[int, str, str]]:
    """``(rows, tool, run)`` of the cases ``out`` holds a successful record of."""
    return {(r["rows"], r["tool"], r["run"]) for r in read_records(out) if r.get("rc") == 0}


def trl_result(log: Path) -> dict:
    """The JSON line ``bench_data_scale_trl.py`` printed last (``first_step_s``, ``steps``), if ``log`` holds one."""
    found = re.findall(r'^(\{"first_step_s".*\})$', log.read_text(errors="replace"), re.M) if log.is_file() else []
    return json.loads(found[-1]) if found else {}


def run_cases(rows: list[int], out: Path, scratch: Path, source: Path = SOURCE,
              runner: Callable[[list[str], Path], dict] = timed, tools: Sequence[str] = TOOLS,
              join: int = 1) -> list[dict]:
    """Run every (rows, tool, cold|warm) case not yet in ``out``; append a record per finished case; the new records.

    For each N: ours' ``cold`` and ``warm``, then TRL's (``trl-cold``, ``trl-warm``), each tool with a cache folder
    of its own, emptied before its cold case.
    """
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"tools={list(tools)!r}: {unknown} unknown; use some of {list(TOOLS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = []
    for n in rows:
        data_dir = make_data(source, n, scratch / f"data-{n}", join)
        max_length = 192 if join == 1 else 512  # the long rows (~300 tokens) are kept whole
        for tool in (t for t in TOOLS if t in tools):
            make, cache, prefix = COMMANDS[tool], scratch / f"{CACHES[tool]}-{n}", "" if tool == "ours" else "trl-"
            for run in RUNS:
                if (n, tool, run) in done_cases(out):
                    continue
                name = f"run-{n}-{prefix}{run}"
                if run == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                elif not cache.is_dir():  # a resumed warm case whose cold run's cache is gone: fill it, unrecorded
                    fill = scratch / f"run-{n}-{prefix}fill"
                    shutil.rmtree(fill, ignore_errors=True)
                    runner(make(data_dir, cache, fill, max_length), fill.with_name(fill.name + ".log"))
                shutil.rmtree(scratch / name, ignore_errors=True)  # a scratch run of an earlier invocation
                argv, log = make(data_dir, cache, scratch / name, max_length), scratch / f"{name}.log"
                load = os.getloadavg()
                result = runner(argv, log)
                record = {"rows": n, "tool": tool, "run": run, **result, **(trl_result(log) if tool == "trl" else {}),
                          "load_before": [round(x, 2) for x in load],
                          "load_after": [round(x, 2) for x in os.getloadavg()], "cpu_flags": cpu_flags(),
                          "cpus": os.cpu_count(), "command": " ".join(argv[1:]),
                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}
                with out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                new.append(record)
                print(json.dumps(record), flush=True)
    return new


def data_path(n: int, scratch: Path) -> dict:
    """The data path alone, in this process, on case ``n``'s warm cache: seconds to build the DataModule, set it up,
    make the first training batch and the validation prompts, and the process's peak RSS (no model)."""
    import resource

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vera_lightning.app.commands.configs import register_configs
    from vera_lightning.app.data.datamodules import build_datamodule
    from vera_lightning.app.models.load import build_tokenizer

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=e2e_smollm2", f"data.data_dir={scratch / f'data-{n}'}",
                                          "data.max_train_samples=null", f"data.cache_dir={scratch / f'cache-{n}'}"])
    tokenizer, times = build_tokenizer(cfg.model), {}
    start = time.perf_counter()
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True), tokenizer)
    times["build_s"] = time.perf_counter() - start
    datamodule.setup("fit")
    times["setup_s"] = time.perf_counter() - start
    next(iter(datamodule.train_dataloader()))
    times["first_batch_s"] = time.perf_counter() - start
    datamodule.generation_examples("val")
    times["val_prompts_s"] = time.perf_counter() - start
    return {"rows": n, **{k: round(v, 3) for k, v in times.items()}, "load": os.getloadavg()[0],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def report(out: Path) -> str:
    """A Markdown table of ``out``'s records, ours and TRL's side by side, with the issue's ratios: ours against the
    smallest N, and our first run against TRL's at each N."""
    records = {(r["rows"], r["tool"], r["run"]): r for r in read_records(out) if r.get("rc") == 0}
    sizes = sorted({n for n, _, _ in records})

    def cell(r: Optional[dict], key: str, unit: str) -> str:
        return f"{r[key]} {unit}" if r and r.get(key) is not None else "–"

    head = " | ".join(f"{who} first run (cold cache) | {who} second run (warm) | {who} peak RSS cold / warm"
                      for who in ("ours", "TRL"))
    lines = [f"| rows | {head} | load (1 min) |", "|---" * 8 + "|"]
    for n in sizes:
        cells = []
        for tool in TOOLS:
            cold, warm = records.get((n, tool, "cold")), records.get((n, tool, "warm"))
            cells += [cell(cold, "wall_s", "s"), cell(warm, "wall_s", "s"),
                      f"{cell(cold, 'peak_rss_gib', 'GiB')} / {cell(warm, 'peak_rss_gib', 'GiB')}"]
        first = next((records[k] for k in ((n, t, r) for t in TOOLS for r in RUNS) if k in records), {})
        lines.append(f"| {n:,} | {' | '.join(cells)} | {first.get('load_before', ['?'])[0]} |")
    if len(sizes) > 1 and all((n, "ours", "warm") in records for n in (sizes[0], sizes[-1])):
        small, large = records[(sizes[0], "ours", "warm")], records[(sizes[-1], "ours", "warm")]
        peak = max(records[(sizes[-1], "ours", r)]["peak_rss_gib"] for r in RUNS if (sizes[-1], "ours", r) in records)
        lines.append(f"\nsecond run {sizes[-1]:,} / {sizes[0]:,}: {large['wall_s'] / small['wall_s']:.2f}x (target "
                     f"<= 1.25x); peak RSS {sizes[-1]:,} / {sizes[0]:,} (warm): "
                     f"{large['peak_rss_gib'] / small['peak_rss_gib']:.2f}x, worst of both runs "
                     f"{peak / small['peak_rss_gib']:.2f}x (target <= 1.15x)")
    ratios = [f"{n:,}: {records[(n, 'ours', 'cold')]['wall_s'] / records[(n, 'trl', 'cold')]['wall_s']:.2f}x"
              for n in sizes if (n, "ours", "cold") in records and (n, "trl", "cold") in records]
    if ratios:
        lines.append(f"\nfirst run, ours / TRL: {', '.join(ratios)} (target <= 1.0)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4000, 200000])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_scale.jsonl")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/vera-data-scale"))
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS),
                        help="whose 2-step runs to time: ours (scripts/train.py), TRL's SFTTrainer, or both")
    parser.add_argument("--join", type=int, default=1, help="the synthetic long set: this many references a response "
                        "(9: ~300 tokens a row); use its own --scratch and --out")
    parser.add_argument("--data-path", type=int, help="only time the data path of this N's warm cache (no model)")
    args = parser.parse_args(argv)
    if args.data_path:
        print(json.dumps(data_path(args.data_path, args.scratch)))
        return
    run_cases(args.rows, args.out, args.scratch, args.source, tools=args.tools, join=args.join)
    print(report(args.out))


if __name__ == "__main__":
    main()
