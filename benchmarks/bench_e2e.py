"""E2E NLG on SmolLM2-135M-Instruct: zero-shot, VeRA, LoRA r=8 (PEFT) and VeRA over an NF4 base, same budget.

Every run is ``experiment=e2e_smollm2`` (the recipe: 2,000 training rows, one epoch, batch 8, all 60 val.csv
prompts scored against all their references). VeRA goes through ``vera_lightning.app.commands.train(cfg)``, LoRA through
``bench_app.train_lora`` (PEFT is a benchmark dependency, not the app's) on the same targets, data, schedule and
decoding, zero-shot through ``vera_lightning.app.commands.evaluate`` with ``adapter=null`` (the same prompt formatting).

Each run is one child process (its peak RSS is its own) whose record is appended to ``<out>/runs.jsonl`` with
the settings that define it, so an interrupted benchmark resumes where it stopped and a changed recipe runs
again. Writes ``e2e.md``, ``e2e.csv`` and ``e2e.png`` into ``--out`` and, with ``--docs``, the table between the
markers of that Markdown file.

    python benchmarks/bench_e2e.py --out benchmarks/e2e --docs docs/e2e.md
    python benchmarks/bench_e2e.py --out /tmp/e2e_smoke --smoke     # tiny budget: checks the harness (minutes)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_app import QUIET, compose, train_lora

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_e2e:start -->", "<!-- bench_e2e:end -->"

#: method -> (kind, extra overrides)
METHODS = {  # float32 pinned where the records predate model.compute_dtype=auto (their signatures stay valid)
    "zero_shot": ("eval", ["model.compute_dtype=fp32"]),
    "vera_r256": ("vera", ["model.compute_dtype=fp32"]),
    "lora_r8": ("lora", ["model.compute_dtype=fp32"]),
    "vera_r256_nf4": ("vera", ["model.quantize=nf4", "model.compute_dtype=fp32"]),
    "vera_r256_bf16": ("vera", ["model.compute_dtype=bf16"]),
}
LABELS = {"zero_shot": "zero-shot (no training)", "vera_r256": "VeRA r=256 (q,v)", "lora_r8": "LoRA r=8 (q,v; PEFT)",
          "vera_r256_nf4": "VeRA r=256 (q,v), NF4 base", "vera_r256_bf16": "VeRA r=256 (q,v), bf16 training form"}
METRICS = ("val/bleu", "val/rougeL", "val/chrf", "val/loss")


def overrides(method: str, seed: int, args) -> list[str]:
    kind, extra = METHODS[method]
    out = ["experiment=e2e_smollm2", f"seed={seed}", *extra, *args.override]
    if kind == "lora":
        out.append(f"optim.lr={args.lora_lr}")
    return out


def signature(cfg, method: str) -> dict:
    """The settings that define a run's result (the cache key besides method and seed)."""
    kind = METHODS[method][0]
    return {"rows": cfg.data.max_train_samples, "batch": cfg.data.batch_size, "epochs": cfg.trainer.max_epochs,
            "max_steps": cfg.trainer.max_steps, "lr": None if kind == "eval" else float(cfg.optim.lr),
            "r": cfg.vera.r if kind == "vera" else (8 if kind == "lora" else None),
            "targets": list(cfg.vera.target_modules), "quantize": cfg.model.quantize,
            # which weights quantize: 2 = NF4 of every linear holding a multiple of 64 values (1, unnamed: of 16,384)
            **({"quantize_rev": 2} if cfg.model.quantize else {}),
            # the precision (absent: float32, as every record before model.compute_dtype=auto); bf16_form 1: bf16
            # projection products, float32 λ's, response-only loss (issue 32)
            **({"compute_dtype": cfg.model.compute_dtype, "bf16_form": 1} if cfg.model.compute_dtype != "fp32" else {}),
            "val_prompts": cfg.generate.val_prompts, "max_new_tokens": cfg.generate.max_new_tokens,
            "max_val": cfg.data.max_val_samples, "prompt": cfg.data.prompt_template}


def trained_tokens(cfg) -> int:
    """Tokens of the training split the run reads (padding excluded), per epoch."""
    from omegaconf import OmegaConf

    from vera_lightning.app.data.datamodules import build_datamodule
    from vera_lightning.app.models.load import build_tokenizer

    data = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True), build_tokenizer(cfg.model))
    data.setup("fit")
    return sum(len(item["input_ids"]) for item in data.splits["train"])


def run_one(spec: dict) -> dict:
    """One run in this (child) process; returns its record."""
    import torch

    torch.set_num_threads(spec["threads"])
    kind = METHODS[spec["method"]][0]
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        if kind == "eval":
            from hydra import compose as hydra_compose
            from hydra import initialize_config_dir

            from vera_lightning.app import register_configs
            from vera_lightning.app.commands.evaluate import evaluate

            register_configs()
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = hydra_compose("eval", overrides=[*spec["overrides"], "adapter=null", f"paths.output_dir={work}",
                                                       "trainer.enable_progress_bar=false"])
            result = evaluate(cfg)
            tokens, fit_s = 0, None
        else:
            cfg = compose([*spec["overrides"], f"paths.output_dir={work}", *QUIET])
            tokens = trained_tokens(cfg) * int(cfg.trainer.max_epochs)
            if kind == "lora":
                result = train_lora(cfg, r=8)
            else:
                from vera_lightning.app import train

                result = train(cfg)
                if spec.get("keep"):  # the trained adapter, for what comes after (e.g. benchmarks/bench_export.py)
                    import shutil

                    kept = Path(spec["keep"]) / f"{spec['method']}-seed{spec['seed']}"
                    shutil.rmtree(kept, ignore_errors=True)
                    shutil.copytree(Path(work) / "adapter", kept / "adapter")
                    if (Path(work) / ".hydra").is_dir():
                        shutil.copytree(Path(work) / ".hydra", kept / ".hydra", dirs_exist_ok=True)
            fit_s = float(result["fit_s"])
        wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": spec["method"], "seed": spec["seed"],
            "metrics": {k: float(result[k]) for k in METRICS if k in result},
            "trainable_params": int(result.get("trainable_params", 0)),
            "model_bytes": int(result.get("model_bytes", 0) or 0),
            "tokens": tokens, "fit_s": fit_s, "tokens_per_s": round(tokens / fit_s, 1) if fit_s else None,
            "steps": int(result.get("steps", 0) or 0), "wall_s": round(wall, 1), "peak_rss_bytes": rss,
            "threads": spec["threads"], "signature": spec["signature"]}


#: What every record of this benchmark holds (``run_one``); a line without them is not this benchmark's.
RECORD_KEYS = {"method": str, "seed": int, "signature": dict, "metrics": dict, "trainable_params": int,
               "model_bytes": int, "peak_rss_bytes": int, "wall_s": (int, float)}


def load_runs(path: Path) -> list[dict]:
    """This benchmark's records in ``path`` ([] when it does not exist); the file is only read.

    Raises:
        SystemExit: Naming the file and its first line that is not JSON or not a bench_e2e record (a corrupt or
            foreign file), and the fix; the file is left as it is.
    """
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"bench_e2e: cannot read {path} ({err}); move it away or pass another --out") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"bench_e2e: {path}: line {number} is not JSON ({err.msg}); the file is corrupt or not "
                             "this benchmark's and was left as it is: move it away or pass another --out") from None
        bad = ([k for k, kind in RECORD_KEYS.items() if not isinstance(record.get(k), kind)]
               if isinstance(record, dict) else [type(record).__name__])
        if bad:
            raise SystemExit(f"bench_e2e: {path}: line {number} is not a bench_e2e record (missing or wrong: "
                             f"{', '.join(bad)}); the file was left as it is: move it away or pass another --out")
        records.append(record)
    return records


def plan(args) -> list[dict]:
    specs = []
    for method in args.methods:
        for seed in (args.seeds if METHODS[method][0] != "eval" else args.seeds[:1]):
            ov = overrides(method, seed, args)
            cfg = compose([*ov, *QUIET])
            specs.append({"method": method, "seed": seed, "overrides": ov, "threads": args.threads,
                          "signature": signature(cfg, method), "keep": args.keep})
    return specs


def current(records: list[dict], args) -> list[dict]:
    """The records made with today's settings: a record whose signature a changed recipe (or code revision)
    no longer gives stays in runs.jsonl but leaves the table."""
    wanted = {method: signature(compose([*overrides(method, 0, args), *QUIET]), method) for method in METHODS}
    return [r for r in records if r["signature"] == wanted.get(r["method"])]


def orchestrate(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.jsonl"
    done = load_runs(runs_file)
    for spec in plan(args):
        if any(r["method"] == spec["method"] and r["seed"] == spec["seed"] and r["signature"] == spec["signature"]
               for r in done):
            print(f"cached: {spec['method']} seed {spec['seed']}", flush=True)
            continue
        print(f"running: {spec['method']} seed {spec['seed']} ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"run {spec['method']} seed {spec['seed']} failed (exit {proc.returncode})")
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        with runs_file.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        done.append(record)
        print(f"  {record['metrics']} in {record['wall_s']} s", flush=True)
    return done


def render(records: list[dict]) -> str:
    """The Markdown table: mean (and spread over seeds) per method, in METHODS order."""
    rows = ["| method | seeds | BLEU | ROUGE-L | chrF | val loss | trainable params | tokens/s (train) | "
            "peak RSS | model in memory | wall |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in records if r["method"] == method]
        if not mine:
            continue

        def stat(key: str, fmt: str = "{:.1f}", mine: list = mine) -> str:
            vals = [r["metrics"][key] for r in mine if key in r["metrics"]]
            if not vals:
                return "-"
            text = fmt.format(sum(vals) / len(vals))
            return text + (f" ({fmt.format(min(vals))}–{fmt.format(max(vals))})" if len(vals) > 1 else "")

        tps = [r["tokens_per_s"] for r in mine if r.get("tokens_per_s")]
        rows.append(
            f"| {LABELS[method]} | {len(mine)} | {stat('val/bleu')} | {stat('val/rougeL')} | {stat('val/chrf')} | "
            f"{stat('val/loss', fmt='{:.3f}')} | {mine[0]['trainable_params']:,} | "
            f"{(sum(tps) / len(tps)) if tps else 0:.0f} | {max(r['peak_rss_bytes'] for r in mine) / 2**30:.2f} GiB | "
            f"{mine[0]['model_bytes'] / 2**20:.0f} MiB | {sum(r['wall_s'] for r in mine) / len(mine) / 60:.1f} min |")
    return "\n".join(rows) + "\n"


def write_outputs(records: list[dict], out: Path, docs: str | None) -> None:
    table = render(records)
    (out / "e2e.md").write_text(table)
    with (out / "e2e.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "seed", "bleu", "rougeL", "chrf", "val_loss", "trainable_params", "tokens_per_s",
                         "peak_rss_bytes", "model_bytes", "wall_s"])
        for r in records:
            m = r["metrics"]
            writer.writerow([r["method"], r["seed"], m.get("val/bleu"), m.get("val/rougeL"), m.get("val/chrf"),
                             m.get("val/loss"), r["trainable_params"], r.get("tokens_per_s"), r["peak_rss_bytes"],
                             r["model_bytes"], r["wall_s"]])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in METHODS:
            mine = [r for r in records if r["method"] == method and "val/bleu" in r["metrics"]]
            if mine:
                ax.scatter([max(r["trainable_params"], 1) for r in mine], [r["metrics"]["val/bleu"] for r in mine],
                           label=LABELS[method])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log; zero-shot drawn at 1)")
        ax.set_ylabel("BLEU on E2E val.csv (60 MRs, all references)")
        ax.set_title("SmolLM2-135M-Instruct on E2E, same budget")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "e2e.png", dpi=120)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    if docs:
        path = Path(docs)
        text = path.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"--docs {docs}: the file has no {START} ... {END} markers")
        head, rest = text.split(START, 1)
        path.write_text(head + START + "\n" + table + END + rest.split(END, 1)[1])
    print(table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/e2e")
    parser.add_argument("--docs", default=None, help="a Markdown file whose bench_e2e markers get the table")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--keep", default=None,
                        help="copy each trained adapter (and its .hydra/) to DIR/<method>-seed<k>/")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (checks the harness, not a result)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    if args.smoke:
        args.override = [*args.override, "data.max_train_samples=16", "data.max_val_samples=16",
                         "generate.val_prompts=4", "generate.max_new_tokens=8"]
    records = current(orchestrate(args), args)
    write_outputs(records, Path(args.out), args.docs)


if __name__ == "__main__":
    main()
