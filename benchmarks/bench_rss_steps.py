"""Resident memory over training steps: what grows, and what bounds it (issue 37, item 7). Three modes, each variant in
its own process, one JSON record per finished case appended to ``--out`` (cases already there are skipped, so an
interrupted benchmark resumes):

* ``kernels`` (seconds): SmolLM2-135M's linear shapes (576→576, 576→192, 576→1536, 1536→576), forward and backward
  on ``batch`` × ``width`` tokens for every width from 20 to 192, twice over (346 steps, as length-grouped E2E batches
  give a new width almost every step), in ``--dtype``; RSS after selected steps. Variants: ``pad1`` (each batch padded
  to its longest row, the app before ``data.pad_to_multiple_of``), ``pad8``, ``pad16`` (widths rounded up),
  ``onednn0`` (``pad1`` with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``: oneDNN's per-shape primitive cache off).
* ``model`` (minutes): the E2E model (SmolLM2 + VeRA r=256 on q/v, AdamW on the λ's) on random tokens in batches whose
  widths follow the E2E set's token lengths (one row's length drawn, the other rows 0-3 tokens shorter).
* ``app`` (tens of minutes): ``scripts/train.py experiment=e2e_smollm2`` itself, as a user runs it, with
  ``data.pad_to_multiple_of`` = 1 (``pad1``) or 8 (``pad8``) and an RSS trace after every step (``rss_trace.py``).

Each record: RSS at selected steps, the growth per 100 steps from step 100 (or mid-run) to the end, and the time::

    python benchmarks/bench_rss_steps.py --mode kernels --dtype bf16 --variants pad1 pad8 pad16 onednn0
    python benchmarks/bench_rss_steps.py --mode app --dtype fp32 --steps 150 --variants pad1 pad8
    python benchmarks/bench_rss_steps.py --mode app --dtype fp32 --steps 1000 --batch 4 --variants pad8

(``--batch 4`` for 1,000 steps: the E2E set's 4,157 rows give 1,039 steps an epoch, and ~1.2 s a step instead of ~2.4.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e" / "train.csv"
VARIANTS = {"pad1": ({}, 1), "pad8": ({}, 8), "pad16": ({}, 16),
            "onednn0": ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}, 1)}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**30


def summarise(trace: list[tuple[int, float]], marks: tuple[int, ...] = (10, 50, 100, 200, 300, 500, 1000)) -> dict:
    """RSS at the marks (and the last step) and the growth per 100 steps from step 100 (or mid-run) to the end."""
    at = dict(trace)
    last = trace[-1][0]
    start = 100 if last >= 200 else last // 2
    growth = (at[last] - at[start]) / max(last - start, 1) * 100
    return {"rss_gib_at": {str(s): round(at[s], 4) for s in (*[m for m in marks if m <= last], last) if s in at},
            "growth_gib_per_100_steps": round(growth, 4), "max_over_step_100": round(
                max(r for s, r in trace if s >= start) / at[start], 4)}


def kernels(dtype: str, multiple: int, batch: int) -> dict:
    import torch

    torch.manual_seed(0)
    kind = getattr(torch, DTYPES[dtype])
    layers = [torch.nn.Linear(i, o, bias=False).to(kind) for i, o in ((576, 576), (576, 192), (576, 1536))]
    down = torch.nn.Linear(1536, 576, bias=False).to(kind)
    trace, widths, start = [], set(), time.perf_counter()
    for step, width in enumerate(list(range(20, 193)) * 2, start=1):
        width = -(-width // multiple) * multiple
        widths.add(width)
        x = torch.randn(batch * width, 576, dtype=kind, requires_grad=True)
        (sum(layer(x).sum() for layer in layers) + down(layers[2](x)).sum()).backward()
        trace.append((step, rss_gib()))
    return {**summarise(trace), "widths": len(widths), "wall_s": round(time.perf_counter() - start, 1)}


def model(dtype: str, multiple: int, batch: int, steps: int, seed: int = 0) -> dict:
    import random

    import torch
    from omegaconf import OmegaConf

    from vera_lightning import VeraConfig, apply_vera
    from vera_lightning.app.data import sft_tokens
    from vera_lightning.app.models.load import build_model, build_tokenizer

    torch.manual_seed(seed)
    model_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml"))
    data_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "sft.yaml"))
    e2e = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "e2e.yaml"))
    data_cfg.update({k: v for k, v in e2e.items() if k != "defaults"})
    tokenizer = build_tokenizer(model_cfg)
    with E2E.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))[:2000]
    lengths = [min(len(ids), 192) for ids in sft_tokens.encode_columns(rows, data_cfg, tokenizer)["input_ids"]]
    net = apply_vera(build_model(model_cfg, tokenizer, compute_dtype=dtype),
                     VeraConfig(r=256, target_modules=["q_proj", "v_proj"], d_initial=0.1))
    optim = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-2)
    net.train()
    rng = random.Random(seed)
    trace, tokens, widths, start = [], 0, set(), time.perf_counter()
    for step in range(1, steps + 1):
        top = rng.choice(lengths)  # length grouping: a batch of rows about as long as one drawn row
        real = [top] + [max(1, top - rng.randint(0, 3)) for _ in range(batch - 1)]
        width = -(-top // multiple) * multiple
        widths.add(width)
        ids = torch.randint(0, tokenizer.vocab_size, (batch, width))
        mask = (torch.arange(width)[None, :] < torch.tensor(real)[:, None]).long()
        net(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        tokens += sum(real)
        trace.append((step, rss_gib()))
    wall = time.perf_counter() - start
    return {**summarise(trace), "widths": len(widths), "tokens_per_s": round(tokens / wall, 1),
            "wall_s": round(wall, 1)}


def app(dtype: str, multiple: int, steps: int, scratch: Path, name: str, batch: int = 8) -> dict:
    trace_file = scratch / f"{name}.trace.jsonl"
    trace_file.unlink(missing_ok=True)
    argv = [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=e2e_smollm2", f"trainer.max_steps={steps}",
            "data.max_train_samples=null", "eval_before=false", "trainer.limit_val_batches=0",
            f"data.pad_to_multiple_of={multiple}", f"model.compute_dtype={dtype}", "trainer.enable_progress_bar=false",
            f"data.batch_size={batch}",
            "+callbacks.rss_trace._target_=rss_trace.RssTrace", f"+callbacks.rss_trace.path={trace_file}",
            f"hydra.run.dir={scratch / name}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
    trace = [(r["step"], r["rss_gib"]) for r in rows]
    fit = rows[-1]["t_s"] - rows[0]["t_s"]
    return {**summarise(trace), "widths": len({r["width"] for r in rows}),
            "s_per_step": round(fit / (len(rows) - 1), 3), "wall_s": round(time.perf_counter() - start, 1),
            "command": " ".join(argv[1:])}


def done(out: Path) -> set[tuple]:
    if not out.is_file():
        return set()
    records = map(json.loads, out.read_text().splitlines())
    return {(r["mode"], r["variant"], r["dtype"], r.get("steps")) for r in records}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["kernels", "model", "app"], default="kernels")
    parser.add_argument("--variants", nargs="+", default=["pad1", "pad8"], choices=list(VARIANTS))
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=150, help="model/app modes (kernels: always 346)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/vera-rss-steps"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rss_steps.jsonl")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = 346 if args.mode == "kernels" else args.steps
    if args.child:
        multiple = VARIANTS[args.child][1]
        result = (kernels(args.dtype, multiple, args.batch) if args.mode == "kernels"
                  else model(args.dtype, multiple, args.batch, steps))
        print(json.dumps(result))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        if (args.mode, variant, args.dtype, steps) in done(args.out):
            continue
        env_extra, multiple = VARIANTS[variant]
        if args.mode == "app":
            result = app(args.dtype, multiple, steps, args.scratch, f"app-{variant}-{args.dtype}-{steps}-b{args.batch}",
                         args.batch)
        else:
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--mode", args.mode, "--dtype",
                                   args.dtype, "--steps", str(steps), "--batch", str(args.batch)],
                                  env={**os.environ, **env_extra}, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{variant}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        import torch

        record = {"mode": args.mode, "variant": variant, "dtype": args.dtype, "steps": steps, "batch": args.batch,
                  **result, "threads": torch.get_num_threads(), "load": [round(x, 2) for x in os.getloadavg()],
                  "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY", ""),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with args.out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
