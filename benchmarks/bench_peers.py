"""The whole E2E fine-tune timed against TRL's ``SFTTrainer`` + PEFT (issue 32, item 5).

Methods, each at float32 and at its best bf16 setting:

* ``ours``: the app (``vera_lightning.app.train(cfg)``, ``experiment=e2e_smollm2``: VeRA r=256 on q,v);
  float32 is ``model.compute_dtype=fp32``, bf16 is ``--ours-bf16`` (default ``model.compute_dtype=bf16``;
  any override passes through, e.g. ``model.compute_dtype=auto``).
* ``trl_vera``: TRL ``SFTTrainer`` + PEFT VeRA r=256 on the same targets, ``d_initial`` and learning rate;
  bf16 is the base loaded in bf16 + ``bf16=True`` + ``padding_free=True`` (``--no-padding-free`` drops it).
* ``trl_lora``: TRL ``SFTTrainer`` + PEFT LoRA r=8 (alpha 16) at ``--lora-lr``; bf16 as above, padded batches.

Same model, rows, order, batches, schedule, prompt and completion-only loss, and the same greedy decoding for
BLEU: see ``bench_peers_run.py``. Each run is its own process (its peak RSS is its own) and appends one record
to ``<out>/runs.jsonl`` (the file rewritten beside itself and renamed into place); rerunning the same command
runs only what is missing, and a file that is not this benchmark's records is refused. The table of the
requested runs (mean over seeds, ratios ours ÷ TRL at the same precision) is printed and written to
``<out>/peers.md``.

    nice -n 0 python benchmarks/bench_peers.py                       # 30 steps, 3 methods x {float32, bf16}
    python benchmarks/bench_peers.py --steps 250 --bleu --seeds 42 0 1   # the whole recipe, with BLEU

Needs the ``bench`` extra for the TRL methods: ``pip install -e ".[bench]"`` (trl, datasets, accelerate).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KIND, FORMAT = "bench_peers", 1
METHODS = {"ours": "ours (app, VeRA r=256 q,v)", "trl_vera": "TRL + PEFT VeRA r=256 (q,v)",
           "trl_lora": "TRL + PEFT LoRA r=8 (q,v)"}
PRECISIONS = ("float32", "bf16")
FP32_OURS = "model.compute_dtype=fp32"


class RecordsError(ValueError):
    """The results file cannot be this benchmark's (the message names the file and the fix)."""


def load_records(path: Path) -> list[dict[str, Any]]:
    """This benchmark's records in ``path`` ([] when it does not exist).

    Raises:
        RecordsError: Naming the file and its first bad line when a line is not a ``bench_peers`` record.
    """
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordsError(f"{path}: line {number} is not JSON ({err.msg}); the file is corrupt or not this "
                               "benchmark's: move it away or pass another --out") from None
        if not isinstance(record, dict) or record.get("kind") != KIND or record.get("format") != FORMAT:
            found = record.get("kind") if isinstance(record, dict) else type(record).__name__
            raise RecordsError(f"{path}: line {number} is not a {KIND} record (format {FORMAT}; found {found!r}); "
                               "move the file away or pass another --out")
        records.append(record)
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Add one line to ``path``: the whole file is written beside it, then renamed into place."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(old + json.dumps(record) + "\n", encoding="utf-8")
    os.replace(partial, path)


def signature(args, method: str, precision: str) -> dict[str, Any]:
    """The settings that define a run's result besides method, precision and seed."""
    sig = {"steps": args.steps, "threads": args.threads, "data_dir": str(args.data_dir), "overrides": args.override}
    if method == "ours":
        sig["precision_override"] = args.ours_bf16 if precision == "bf16" else FP32_OURS
    else:
        sig["padding_free"] = bool(method == "trl_vera" and precision == "bf16" and args.padding_free)
    if method == "trl_lora":
        sig["lora_lr"] = args.lora_lr
    return sig


def plan(args) -> list[dict[str, Any]]:
    specs = []
    for precision in args.precisions:
        for seed in args.seeds:
            for method in args.methods:
                sig = signature(args, method, precision)
                specs.append({"method": method, "precision": precision, "seed": seed, "signature": sig,
                              "steps": args.steps, "threads": args.threads, "data_dir": str(args.data_dir),
                              "overrides": list(args.override), "bleu": args.bleu, "lora_lr": args.lora_lr,
                              "padding_free": sig.get("padding_free", False),
                              "precision_override": sig.get("precision_override")})
    return specs


def matches(record: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether ``record`` answers ``spec`` (a record with BLEU also answers a run that does not ask for it)."""
    same = all(record.get(k) == spec[k] for k in ("method", "precision", "seed", "signature"))
    return same and (not spec["bleu"] or record.get("scores") is not None)


def missing_bench_packages() -> list[str]:
    """The packages of the ``bench`` extra (TRL's methods need them) that are not installed."""
    return [p for p in ("trl", "datasets", "accelerate") if importlib.util.find_spec(p) is None]


def preflight(args) -> list[dict[str, Any]]:
    """Every check before any run or write: the records file, the data, TRL when asked for."""
    problems = []
    if any(m != "ours" for m in args.methods):
        missing = missing_bench_packages()
        if missing:
            problems.append(f"--methods {' '.join(args.methods)} needs {missing}: pip install -e '.[bench]'")
    if not (Path(args.data_dir) / "train.csv").is_file():
        problems.append(f"--data-dir {args.data_dir}: no train.csv there (the E2E folder, e.g. ../shared/data/e2e)")
    if args.steps < 1:
        problems.append(f"--steps {args.steps}: must be >= 1")
    if problems:
        raise SystemExit("bench_peers: cannot start:\n  - " + "\n  - ".join(problems))
    try:
        return load_records(Path(args.out) / "runs.jsonl")
    except RecordsError as err:
        raise SystemExit(f"bench_peers: {err}") from None


def orchestrate(args, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = Path(args.out)
    runs_file = out / "runs.jsonl"
    invocation = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    wanted = []
    for spec in plan(args):
        found = next((r for r in reversed(done) if matches(r, spec)), None)
        label = f"{spec['method']} {spec['precision']} seed {spec['seed']}"
        if found is not None:
            print(f"recorded: {label}", flush=True)
            wanted.append(found)
            continue
        print(f"running: {label} ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-6000:])
            raise SystemExit(f"bench_peers: run {label} failed (exit {proc.returncode}); the runs before it are "
                             f"kept in {runs_file}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        record = {"kind": KIND, "format": FORMAT, "invocation": invocation, "command": " ".join(sys.argv),
                  **{k: spec[k] for k in ("method", "precision", "seed", "signature")}, **measured}
        out.mkdir(parents=True, exist_ok=True)
        append_record(runs_file, record)
        done.append(record)
        wanted.append(record)
        print(f"  trained in {record['train_s']} s ({record['tokens_per_s']} tokens/s), peak RSS "
              f"{record['peak_rss_bytes'] / 2**30:.2f} GiB, load {record['loadavg_before']} -> "
              f"{record['loadavg_after']}" + (f", BLEU {record['scores']['bleu']}" if record.get("scores") else ""),
              flush=True)
    return wanted


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def render(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per method and precision (means over seeds), ratios ours ÷ that row."""
    rows = ["| method | precision | seeds | train s | tokens/s | peak RSS | BLEU | ours ÷ this (time) |",
            "|---|---|---|---|---|---|---|---|"]
    means: dict[tuple[str, str], float] = {}
    for precision in PRECISIONS:
        for method in METHODS:
            mine = [r for r in records if r["method"] == method and r["precision"] == precision]
            if mine:
                means[(method, precision)] = _mean([r["train_s"] for r in mine])
    for (method, precision), train_s in means.items():
        mine = [r for r in records if r["method"] == method and r["precision"] == precision]
        bleu = _mean([r["scores"]["bleu"] for r in mine if r.get("scores")])
        ours = means.get(("ours", precision))
        ratio = "-" if method == "ours" or ours is None else f"{ours / train_s:.2f}"
        extra = " (padding_free)" if mine[0]["signature"].get("padding_free") else ""
        rows.append(f"| {METHODS[method]}{extra} | {precision} | {len(mine)} | {train_s:.1f} | "
                    f"{_mean([r['tokens_per_s'] for r in mine]):.0f} | "
                    f"{max(r['peak_rss_bytes'] for r in mine) / 2**30:.2f} GiB | "
                    f"{'-' if bleu is None else f'{bleu:.1f}'} | {ratio} |")
    speedups = [f"{METHODS[m]} {means[(m, 'bf16')] / means[(m, 'float32')]:.2f}" for m in METHODS
                if (m, "float32") in means and (m, "bf16") in means]
    if speedups:
        rows += ["", "bf16 ÷ float32 (time): " + "; ".join(speedups)]
    invocations = sorted({r["invocation"] for r in records})
    flags = sorted({",".join(r["cpu_flags"]) or "none" for r in records})
    threads = sorted({r["torch_threads"] for r in records})
    loads = ", ".join(f"{r['method']}/{r['precision']}/{r['seed']}: {r['loadavg_before']} -> {r['loadavg_after']}"
                      for r in records)
    rows += ["", f"CPU bf16 flags: {' | '.join(flags)}; torch threads: {threads}; "
                 f"invocations: {len(invocations)} ({', '.join(invocations)})"
                 + ("" if len(invocations) == 1 else ": ratios mix runs measured at different times"),
             f"load average (1/5/15 min) before -> after each run: {loads}"]
    return "\n".join(rows) + "\n"


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of 8 rows (250: the whole recipe)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--bleu", action=argparse.BooleanOptionalAction, default=False,
                        help="greedy generation on every val.csv prompt after training, scored (meaningful at 250)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "peers"), help="folder of runs.jsonl, peers.md")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "e2e"), help="the E2E folder")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's learning rate (bench_e2e's)")
    parser.add_argument("--ours-bf16", default="model.compute_dtype=bf16",
                        help="the Hydra override of ours' bf16 runs (passed through, e.g. model.compute_dtype=auto)")
    parser.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=True,
                        help="TRL VeRA in bf16 with padding_free=True")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides of every run")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.one:
        from bench_peers_run import run_spec

        print(json.dumps(run_spec(json.loads(args.one))), flush=True)
        return
    done = preflight(args)
    from bench_peers_run import machine_facts

    facts = machine_facts()
    print(f"CPU bf16 flags: {facts['cpu_flags'] or 'none'}; torch threads per run: {args.threads}; "
          f"load average: {facts['loadavg']}", flush=True)
    records = orchestrate(args, done)
    table = render(records)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "peers.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
