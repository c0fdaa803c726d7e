"""GLUE benchmark: head-only, VeRA r=256, LoRA r=8 (PEFT) and full fine-tuning on every task, same budget.

Every run is ``experiment=glue_minilm data=<task>`` (all-MiniLM-L6-v2 offline, the per-task budget and
recipe of that experiment): head, VeRA and full fine-tuning go through ``vera_lightning.app.commands.train(cfg)``
with ``finetune=head|vera|full``; LoRA (PEFT is a benchmark dependency, not the app's) is built from the
same app pieces by ``bench_app.train_lora`` (shared with ``bench_quality.py``), with its adapter at
``--lora-lr`` and the head at the experiment's ``head_lr``. Only what trains (and its learning rate)
differs between methods of a task.

Runs are cached in ``<out>/runs.jsonl`` per (task, method, seed) with the settings that define them
(a changed recipe or budget runs again), so the table can be completed across sittings; ``--jobs``
worker processes run side by side with ``cores / jobs`` threads each, each taking the next run from one
shared queue when it is free. Writes ``glue.md``, ``glue.csv``
and ``glue.png`` (per task: the metric vs trainable parameters) into ``--out`` and, with ``--docs``,
the table and the list of measured/missing cells between the markers of that Markdown file.

    python benchmarks/bench_glue.py --out benchmarks/glue --jobs 2 --docs docs/glue.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_app import QUIET, compose, train_lora
from bench_glue_report import END, START, TASKS, render, write_docs

ROOT = Path(__file__).resolve().parents[1]

#: method -> (finetune mode or "lora", extra Hydra overrides). The adapter rates: VeRA's λ's at the
#: experiment's per-task rate, LoRA at --lora-lr, full fine-tuning at 5e-5 for every weight.
METHODS = {
    "head": ("head", []),
    "vera_r256": ("vera", ["vera.r=256"]),
    "lora_r8": ("lora", []),
    "full": ("full", ["optim.head_lr=5e-5"]),
}
#: seeds of the full table (the issue's: 0-2 for the two adapters, one run for the baselines)
SEEDS = {"head": [0], "vera_r256": [0, 1, 2], "lora_r8": [0, 1, 2], "full": [0]}


def run_overrides(task: str, method: str, seed: int, budget: list[str], lora_lr: float) -> list[str]:
    kind, extra = METHODS[method]
    mode = [f"optim.lr={lora_lr}"] if kind == "lora" else [f"finetune={kind}"]  # LoRA: PEFT freezes the base
    return ["experiment=glue_minilm", f"data={task}", f"seed={seed}", *mode, *extra, *budget]


def signature(cfg, method: str) -> dict:
    """The settings that define a run's result (the cache key besides task, method and seed)."""
    return {"rows": cfg.data.max_train_samples, "dev_rows": cfg.data.max_val_samples, "batch": cfg.data.batch_size,
            "max_length": cfg.data.max_length, "epochs": cfg.trainer.max_epochs, "max_steps": cfg.trainer.max_steps,
            "lr": None if METHODS[method][0] in ("head", "full") else float(cfg.optim.lr),
            "head_lr": float(cfg.optim.head_lr), "r": cfg.vera.r if METHODS[method][0] == "vera" else None,
            "warmup": float(cfg.optim.warmup_ratio)}


def run_one(spec: dict) -> dict:
    """Train and evaluate one (task, method, seed) in this process; returns its record."""
    import torch

    from vera_lightning.app import train

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as work:
        cfg = compose([*spec["overrides"], f"paths.output_dir={work}", *QUIET])
        start, cpu = time.perf_counter(), time.process_time()
        if METHODS[spec["method"]][0] == "lora":
            result = train_lora(cfg, r=8)
        else:
            result = train(cfg)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    metrics = {k: v for k, v in result.items() if k.startswith("val/")}
    return {"task": spec["task"], "method": spec["method"], "seed": spec["seed"], "metric_name": cfg.optimized_metric,
            "metric": float(result["metric"]), "metrics": metrics, "trainable_params": int(result["trainable_params"]),
            "saved_bytes": int(result["adapter_bytes"]), "steps": int(result["steps"]), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "threads": spec["threads"],
            "signature": spec["signature"]}


def _worker(queue: list[dict], env: dict, runs_file: Path, lock: threading.Lock, done: list, errors: list) -> None:
    """One worker process that takes the next run from the shared queue until it is empty (imports paid once)."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines: list[str] = []
    drain = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
    drain.start()
    finished, failed = 0, False
    while True:
        with lock:
            if not queue:
                break
            spec = queue.pop(0)
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        record = next((json.loads(line) for line in proc.stdout if line.startswith("{")), None)
        if record is None:  # the process died during this run
            failed = True
            break
        with lock:
            with runs_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            done.append(record)
        finished += 1
        print(f"[bench_glue] {record['task']} {record['method']} seed={record['seed']}: {record['metric_name']}="
              f"{record['metric']:.4f} ({record['wall_s']} s)", flush=True)
    proc.stdin.close()
    proc.wait()
    drain.join()
    if proc.returncode != 0 or failed:  # a worker stopped by a signal may exit 0
        errors.append(f"worker exited {proc.returncode} after {finished} run(s):\n{''.join(stderr_lines)[-3000:]}")


def plan(args) -> tuple[list[dict], list[dict]]:
    """(the runs already recorded with today's settings, the specs still to run), smallest tasks first."""
    runs_file = Path(args.out) / "runs.jsonl"
    recorded = [json.loads(x) for x in runs_file.read_text().splitlines() if x.strip()] if runs_file.exists() else []
    budget = _budget(args)
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    done, todo = [], []
    for task in args.tasks:
        for method in args.methods:
            overrides = [*run_overrides(task, method, 0, budget, args.lora_lr), *args.override]
            sig = signature(compose(overrides), method)
            for seed in (args.seeds if args.seeds is not None else SEEDS[method]):
                hit = [r for r in recorded if (r["task"], r["method"], r["seed"]) == (task, method, seed)
                       and r["signature"] == sig]
                if hit:
                    done.append(hit[-1])
                    continue
                todo.append({"task": task, "method": method, "seed": seed, "signature": sig, "threads": threads,
                             "overrides": [*run_overrides(task, method, seed, budget, args.lora_lr), *args.override]})
    # seed 0 first; the two adapters on every task (smallest first) before the baselines
    order = {m: i for i, m in enumerate(["vera_r256", "lora_r8", "head", "full"])}
    todo.sort(key=lambda s: (s["seed"], order[s["method"]] > 1, args.tasks.index(s["task"]), order[s["method"]]))
    return done, todo


def _budget(args) -> list[str]:
    extra = []
    if args.train_rows:
        extra.append(f"data.max_train_samples={args.train_rows}")
    if args.dev_rows:
        extra.append(f"data.max_val_samples={args.dev_rows}")
    if args.max_steps:
        extra.append(f"trainer.max_steps={args.max_steps}")
    return extra


def orchestrate(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done, todo = plan(args)
    if args.limit is not None:
        todo = todo[: args.limit]
    jobs = max(1, min(args.jobs, len(todo)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(todo[0]["threads"] if todo else 1), "PYTHONPATH": os.pathsep.join(
               [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    lock, errors = threading.Lock(), []
    for spec in todo:
        print(f"[bench_glue] queued {spec['task']} {spec['method']} seed={spec['seed']}", flush=True)
    queue = list(todo)  # shared: each worker takes the next run when it is free, so the slow runs spread out
    workers = [threading.Thread(target=_worker, args=(queue, env, out / "runs.jsonl", lock, done, errors))
               for _ in range(jobs)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return done


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/glue", help="where runs.jsonl and glue.md/.csv/.png go")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0-2 for VeRA/LoRA, 0 otherwise")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (threads each = cores / jobs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores / jobs)")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many missing runs now")
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA's A/B learning rate")
    parser.add_argument("--train-rows", type=int, default=0, help="0: the experiment's per-task budget")
    parser.add_argument("--dev-rows", type=int, default=0, help="0: the whole dev split")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on optimiser steps (0: none)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--docs", help="Markdown file whose bench_glue markers receive the table")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # a worker: one run per stdin line
    args = parser.parse_args(argv)
    if args.serve:
        for line in sys.stdin:
            print(json.dumps(run_one(json.loads(line))), flush=True)
        return
    if args.docs and (not Path(args.docs).is_file() or START not in Path(args.docs).read_text()):
        parser.error(f"--docs={args.docs!r} is not a Markdown file holding the {START} ... {END} markers; "
                     "add them where the table should go")
    if "lora_r8" in args.methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("lora_r8 needs peft (pip install 'peft==0.21.*'), or leave it out with --methods")
    records = orchestrate(args)
    _, missing = plan(args)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--limit" in given:  # the command that completes the table runs everything missing
        del given[given.index("--limit"): given.index("--limit") + 2]
    command = "python benchmarks/bench_glue.py " + " ".join(given)
    report = render(records, missing, Path(args.out), command)
    if args.docs:
        write_docs(Path(args.docs), report)
    print(report)


if __name__ == "__main__":
    main()
