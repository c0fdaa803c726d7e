"""Quality benchmark: dev accuracy of head-only, VeRA, LoRA (PEFT) and full fine-tuning, same budget.

Every method runs on ``experiment=sst2_minilm`` (all-MiniLM-L6-v2 offline weights, SST-2 from
``--data-dir``) with the same training examples, epochs, sequence length, batch size, schedule and
seeds; only what trains (and its learning rate) differs. Each run is its own subprocess (results
are appended to ``runs.jsonl`` in ``--out`` and reused when the script is run again), ``--jobs``
run side by side with ``cores / jobs`` threads each. Writes ``quality.md``, ``quality.csv`` and
``quality.png`` (dev accuracy vs trainable parameters, log x) into ``--out``.

    python scripts/bench_quality.py --data-dir ../shared/data/sst2 --out benchmarks/quality --jobs 2
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

#: method -> (kind, options). VeRA without an explicit lr uses the recipe of conf/experiment/sst2_minilm;
#: LoRA at the rate of the issue's reference measurement, full fine-tuning at a common BERT rate. Every run
#: trains the classifier (modules_to_save) at the experiment's head_lr.
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


def compose(overrides: list[str]):
    from vera_lightning.app import register_configs

    register_configs()
    from hydra import compose as hydra_compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(spec: dict) -> dict:
    """Train and evaluate one (method, seed) in this process; returns its record."""
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate
    from safetensors.torch import save_file

    from vera_lightning import VeraCallback, count_parameters, model_bytes, save_adapter
    from vera_lightning.app import vera_config_from
    from vera_lightning.app.data import build_datamodule
    from vera_lightning.app.models import build_model, build_tokenizer
    from vera_lightning.app.module import ClassificationModule

    torch.set_num_threads(spec["threads"])
    kind, options = METHODS[spec["method"]]
    overrides = ["experiment=sst2_minilm", f"data.data_dir={spec['data_dir']}", f"seed={spec['seed']}",
                 f"paths.output_dir={spec['workdir']}", "callbacks=none", "logger=csv",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "trainer.enable_checkpointing=false", *spec["overrides"]]
    if kind == "vera":
        overrides.append(f"vera.r={options['r']}")
    if options.get("quantize"):
        overrides.append(f"model.quantize={options['quantize']}")
    cfg = compose(overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, num_labels=cfg.data.num_labels)
    vera_config = vera_config_from(cfg)
    heads = list(vera_config.modules_to_save or [])
    callbacks = []
    if kind == "vera":
        callbacks.append(VeraCallback(vera_config))
    elif kind == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=options["r"], lora_alpha=2 * options["r"],
                                                            target_modules=sorted(vera_config.target_modules),
                                                            modules_to_save=heads))
    elif kind == "head":
        model.requires_grad_(False)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
    lr = options.get("lr", cfg.optim.lr)
    if kind == "head":
        lr = None  # nothing but the head trains (at head_lr)

    class BenchModule(ClassificationModule):
        def param_groups(self):
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            adapter = [p for n, p in named if kind != "head" and ("vera_lambda" in n or "lora_" in n or kind == "full")]
            ids = {id(p) for p in adapter}
            rest = [p for _, p in named if id(p) not in ids]
            return [g for g in ({"params": adapter, "lr": lr}, {"params": rest, "lr": cfg.optim.head_lr})
                    if g["params"]]

    module = BenchModule(model, num_labels=cfg.data.num_labels, lr=lr or cfg.optim.head_lr, head_lr=cfg.optim.head_lr,
                         weight_decay=cfg.optim.weight_decay, warmup_ratio=cfg.optim.warmup_ratio)
    datamodule = build_datamodule(cfg.data, tokenizer)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_s = time.perf_counter() - start
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    trainable, total = count_parameters(model)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapter"
        if kind == "vera":
            save_adapter(model, out)
        elif kind == "lora":
            model.save_pretrained(str(out))
        else:
            out.mkdir()
            tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(tensors, str(out / "model.safetensors"))
        size = _dir_bytes(out)
    return {"method": spec["method"], "seed": spec["seed"], "acc": float(metrics["val/acc"]),
            "f1": float(metrics["val/f1"]), "trainable_params": trainable, "total_params": total,
            "saved_bytes": size, "train_s": round(train_s, 1), "steps": trainer.global_step,
            "budget": spec["budget"], "lr": lr, "head_lr": float(cfg.optim.head_lr),
            "model_bytes": model_bytes(model)["total"],
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
    """The λ/adapter learning rate ``method`` trains with under the current recipe (None: head only)."""
    kind, options = METHODS[method]
    if kind == "head":
        return None
    if "lr" in options:
        return options["lr"]
    return float(compose(["experiment=sst2_minilm", *args.override]).optim.lr)


def orchestrate(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.jsonl"
    budget = _budget(args)
    done = []
    if runs_file.exists():
        done = [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]
    current_lr = {m: _method_lr(m, args) for m in args.methods}
    done = [r for r in done if r.get("budget") == budget and r["method"] in current_lr
            and r.get("lr") == current_lr[r["method"]]]
    have = {(r["method"], r["seed"]) for r in done}
    todo = [(m, s) for s in args.seeds for m in args.methods if (m, s) not in have]
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    running: list[tuple[subprocess.Popen, str]] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    work = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    while todo or running:
        while todo and len(running) < args.jobs:
            method, seed = todo.pop(0)
            spec = {"method": method, "seed": seed, "data_dir": str(Path(args.data_dir).resolve()),
                    "threads": threads, "overrides": _spec_overrides(args), "budget": budget,
                    "workdir": str(work / f"{method}-{seed}")}
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
