"""Quality benchmark: dev accuracy of head-only, VeRA, LoRA (PEFT) and full fine-tuning, same budget.

Every method runs on ``experiment=sst2_minilm`` (all-MiniLM-L6-v2 offline weights, SST-2 from
``--data-dir``) with the same training examples, epochs, sequence length, batch size, schedule and
seeds; only what trains (and its learning rate) differs. Head-only, VeRA (also over an NF4/int8 base)
and full fine-tuning are ``vera_lightning.app.commands.train(cfg)`` with ``finetune=head|vera|full`` (full: every
weight at ``optim.head_lr=5e-5``); LoRA (PEFT is a benchmark dependency, not the app's) is
``bench_app.train_lora``, shared with ``bench_glue.py``. Each run is its own subprocess (results are
appended to ``runs.jsonl`` in ``--out`` and reused when the script is run again with the same budget and
learning rate), ``--jobs`` run side by side with ``cores / jobs`` threads each. Writes ``quality.md``,
``quality.csv`` and ``quality.png`` (dev accuracy vs trainable parameters, log x) into ``--out``.

    python benchmarks/bench_quality.py --data-dir ../shared/data/sst2 --out benchmarks/quality --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_app import QUIET, compose, train_lora

#: method -> (kind, options). VeRA without an explicit lr uses the recipe of conf/experiment/sst2_minilm;
#: LoRA at the rate of the issue's reference measurement, full fine-tuning at a common BERT rate for every
#: weight, the classifier included. The other methods train the classifier (modules_to_save) at the
#: experiment's head_lr.
METHODS = {
    "head": ("head", {}),
    "vera_r256": ("vera", {"r": 256}),                      # the recipe of experiment/sst2_minilm (λ lr 2e-2)
    "vera_r256_lr1e-2": ("vera", {"r": 256, "lr": 1e-2}),   # the previous recipe, for the record
    "vera_r1024_lr1e-2": ("vera", {"r": 1024, "lr": 1e-2}),
    "vera_r256_nf4": ("vera", {"r": 256, "quantize": "nf4"}),   # the same recipe over an NF4 base (QVeRA)
    "vera_r256_int8": ("vera", {"r": 256, "quantize": "int8"}),  # ... over an int8 weight-only base
    "lora_r8": ("lora", {"r": 8, "lr": 5e-4}),
    "full": ("full", {"lr": 5e-5}),
}


def method_overrides(method: str) -> list[str]:
    """The Hydra overrides that make ``experiment=sst2_minilm`` train ``method`` (LoRA: its r and lr only)."""
    kind, options = METHODS[method]
    extra = [] if kind == "lora" else [f"finetune={kind}"]
    if kind == "vera":
        extra.append(f"vera.r={options['r']}")
    if "lr" in options:  # finetune=full trains every weight at head_lr
        extra.append(f"optim.{'head_lr' if kind == 'full' else 'lr'}={options['lr']}")
    if "quantize" in options:
        extra.append(f"model.quantize={options['quantize']}")
    return extra


def _trained_lr(kind: str, cfg) -> float | None:
    """The rate of what trains besides the classifier (the cache key): None for head, every weight's for full."""
    if kind == "head":
        return None
    return float(cfg.optim.head_lr if kind == "full" else cfg.optim.lr)


def run_one(spec: dict) -> dict:
    """Train and evaluate one (method, seed) in this process; returns its record."""
    import torch

    from vera_lightning.app import train

    torch.set_num_threads(spec["threads"])
    kind, options = METHODS[spec["method"]]
    with tempfile.TemporaryDirectory() as work:
        cfg = compose(["experiment=sst2_minilm", f"data.data_dir={spec['data_dir']}", f"seed={spec['seed']}",
                       f"paths.output_dir={work}", *QUIET, *spec["overrides"], *method_overrides(spec["method"])])
        result = train_lora(cfg, r=options["r"]) if kind == "lora" else train(cfg)
    return {"method": spec["method"], "seed": spec["seed"], "acc": float(result["val/acc"]),
            "f1": float(result["val/f1"]), "trainable_params": int(result["trainable_params"]),
            "total_params": int(result["total_params"]), "saved_bytes": int(result["adapter_bytes"]),
            "train_s": round(result["fit_s"], 1), "steps": int(result["steps"]), "budget": spec["budget"],
            "lr": _trained_lr(kind, cfg), "head_lr": float(cfg.optim.head_lr),
            "model_bytes": int(result["model_bytes"]),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _budget(args) -> dict:
    return {"max_train_samples": args.train_rows, "max_val_samples": args.dev_rows, "epochs": args.epochs,
            "max_steps": args.max_steps, "max_length": 64, "batch_size": 32}


def _spec_overrides(args) -> list[str]:
    extra = [f"data.max_train_samples={args.train_rows}", f"trainer.max_epochs={args.epochs}",
             f"trainer.max_steps={args.max_steps}"]
    if args.dev_rows:
        extra.append(f"data.max_val_samples={args.dev_rows}")
    return extra + list(args.override)


def _method_lr(method: str, args) -> float | None:
    """The learning rate ``method`` trains with under the current recipe (None: head only); the cache key."""
    cfg = compose(["experiment=sst2_minilm", *args.override, *method_overrides(method)])
    return _trained_lr(METHODS[method][0], cfg)


def plan(args) -> tuple[list[dict], list[tuple[str, int]]]:
    """(the runs recorded in ``--out`` with today's budget and rates, the (method, seed) pairs still to run)."""
    runs_file = Path(args.out) / "runs.jsonl"
    budget = _budget(args)
    done = []
    if runs_file.exists():
        done = [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]
    current_lr = {m: _method_lr(m, args) for m in args.methods}
    done = [r for r in done if r.get("budget") == budget and r["method"] in current_lr
            and r.get("lr") == current_lr[r["method"]]]
    have = {(r["method"], r["seed"]) for r in done}
    return done, [(m, s) for s in args.seeds for m in args.methods if (m, s) not in have]


def orchestrate(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.jsonl"
    budget = _budget(args)
    done, todo = plan(args)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    running: list[tuple[subprocess.Popen, str]] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    while todo or running:
        while todo and len(running) < args.jobs:
            method, seed = todo.pop(0)
            spec = {"method": method, "seed": seed, "data_dir": str(Path(args.data_dir).resolve()),
                    "threads": threads, "overrides": _spec_overrides(args), "budget": budget}
            proc = subprocess.Popen([sys.executable, __file__, "--run-one", json.dumps(spec)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((proc, f"{method} seed={seed}"))
            print(f"[bench_quality] started {method} seed={seed}", flush=True)
        time.sleep(1)
        for proc, label in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, label))
            stdout, stderr = proc.communicate()
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
            record = json.loads(lines[-1])
            with runs_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            done.append(record)
            print(f"[bench_quality] {label}: acc={record['acc']:.4f} ({record['train_s']} s)", flush=True)
    return done


def summarise(records: list[dict], out: Path, title: str) -> str:
    rows = []
    for method in [m for m in METHODS if any(r["method"] == m for r in records)]:
        rs = [r for r in records if r["method"] == method]
        accs = [100 * r["acc"] for r in rs]
        rows.append({
            "method": method, "seeds": len(rs), "acc_mean": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "trainable_params": rs[0]["trainable_params"], "saved_kib": rs[0]["saved_bytes"] / 1024,
            "train_s": statistics.mean(r["train_s"] for r in rs),
        })
    header = "| method | dev accuracy % (mean ± std) | seeds | trainable params | saved size | train time / run |"
    lines = [f"**{title}**", "", header, "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['acc_mean']:.2f} ± {row['acc_std']:.2f} | {row['seeds']} | "
                     f"{row['trainable_params']:,} | {row['saved_kib']:,.0f} KiB | {row['train_s']:.0f} s |")
    table = "\n".join(lines) + "\n"
    (out / "quality.md").write_text(table)
    with (out / "quality.csv").open("w") as fh:
        fh.write("method,seeds,acc_mean,acc_std,trainable_params,saved_kib,train_s\n")
        for row in rows:
            fh.write(",".join(str(round(v, 4)) if isinstance(v, float) else str(v) for v in row.values()) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, row in enumerate(sorted(rows, key=lambda r: r["acc_mean"])):
        ax.errorbar(row["trainable_params"], row["acc_mean"], yerr=row["acc_std"], fmt="o", capsize=4)
        ax.annotate(f"{row['method']} {row['acc_mean']:.1f}", (row["trainable_params"], row["acc_mean"]),
                    textcoords="offset points", xytext=(8, -12 if i % 2 else 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title(title.replace("**", "").replace(", max len", ",\nmax len"), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/sst2", help="folder with train.tsv and dev.tsv")
    parser.add_argument("--out", default="benchmarks/quality", help="where runs.jsonl, quality.md/.csv/.png go")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        default=[m for m, (_, options) in METHODS.items() if "quantize" not in options])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-rows", type=int, default=8000, help="training examples (the budget)")
    parser.add_argument("--dev-rows", type=int, default=0, help="0: the whole dev split (872)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=-1, help="cap on optimiser steps (-1: none)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (threads = cores / jobs)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))), flush=True)
        return
    if not (Path(args.data_dir) / "train.tsv").is_file():
        parser.error(f"--data-dir={args.data_dir!r} holds no train.tsv; point it at the SST-2 folder "
                     "(e.g. ../shared/data/sst2)")
    if "lora_r8" in args.methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("[bench_quality] peft is not installed: skipping lora_r8 (pip install peft)")
            args.methods = [m for m in args.methods if m != "lora_r8"]
    records = orchestrate(args)
    title = (f"SST-2 dev, all-MiniLM-L6-v2, {args.train_rows} train rows x {args.epochs} epoch(s), "
             f"max len 64, batch 32, seeds {args.seeds}")
    print(summarise(records, Path(args.out), title))


if __name__ == "__main__":
    main()
