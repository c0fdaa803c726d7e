"""Benchmark VeRA training steps: frozen-base floor vs PEFT vs vera-lightning, interleaved.

Example::

    python scripts/bench.py --threads 2 --batch 4 --seq-len 128 --json bench.json
    python scripts/bench.py --batch 4 16 64 --seq-len 128 --layers 4 --no-rss   # token sweep N = 512, 2048, 8192
    python scripts/bench.py --quick            # tiny smoke run (seconds)

Prints one table per case (tokens x rank x targets), with the paths ``auto`` took, and, with
``--json``, writes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_harness import (
    TARGET_SETS,
    VARIANTS,
    BenchShape,
    build_base,
    build_variant,
    make_step,
    paths_taken,
    saved_activation_bytes,
    summarize,
    time_round_robin,
)

from vera_lightning import merge_vera

QUICK = BenchShape(hidden=64, layers=2, ffn=128, heads=4, vocab=256, batch=2, seq_len=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 4; a token sweep)")
    p.add_argument("--seq-len", type=int, nargs="+", default=None, help="sequence lengths (default 128; N = B x T)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 12, OPT-125m)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: 50272, OPT-125m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ranks", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--targets", nargs="+", default=list(TARGET_SETS), choices=list(TARGET_SETS))
    p.add_argument("--variants", nargs="+", default=["floor", "peft", "ours"], choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--merged-repeats", type=int, default=10, help="rounds of merged vs base forward (0: skip)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--quick", action="store_true", help="tiny model, r in {8,16}, 2 rounds: a smoke test")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # internal: VARIANT:r:targets
    args = p.parse_args(argv)
    shape = QUICK if args.quick else BenchShape()
    args.batch, args.seq_len = args.batch or [shape.batch], args.seq_len or [shape.seq_len]
    sizes = {k: v for k, v in (("layers", args.layers), ("vocab", args.vocab)) if v is not None}
    args.shape = dataclasses.replace(shape, batch=max(args.batch), seq_len=max(args.seq_len), **sizes)
    if args.quick:
        args.ranks = [r for r in args.ranks if r <= 16] or [8, 16]
        args.repeats, args.warmup, args.merged_repeats = min(args.repeats, 2), 1, min(args.merged_repeats, 2)
        args.no_rss = True
    return args


def _inputs(args, batch: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.shape.vocab, (batch, seq_len), generator=g)
    return ids.to(args.device)


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_child(args) -> None:
    """Build one variant alone, run one training step, print the peak RSS of that step in bytes.

    The high-water mark is reset (``/proc/self/clear_refs``) after the model is built, so the
    figure is the step's peak (weights + activations + gradients + new AdamW state), not the
    construction's. Elsewhere than Linux it falls back to the process-wide ``ru_maxrss``.
    """
    name, r, targets = args.rss_child.split(":")
    base = build_base(args.shape, getattr(torch, args.dtype), args.device)
    model = build_variant(base, name, int(r), TARGET_SETS[targets], inplace=True)
    step = make_step(model, _inputs(args, args.batch[0], args.seq_len[0]))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        peak = _vm_kib("VmHWM") * 1024
    except OSError:
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak)


def peak_rss(args, name: str, r: int, targets: str, ids: torch.Tensor) -> int:
    cmd = [sys.executable, __file__, "--rss-child", f"{name}:{r}:{targets}", "--threads", str(args.threads),
           "--batch", str(ids.shape[0]), "--seq-len", str(ids.shape[1]), "--dtype", args.dtype, "--device", args.device]
    cmd += [f"--{k}={v}" for k, v in (("layers", args.layers), ("vocab", args.vocab)) if v is not None]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def merged_forward_ratio(base_model, merged_model, ids, repeats: int) -> dict:
    """Forward (no grad, eval) of the merged adapted model over the plain base model, interleaved."""
    base_model.eval(), merged_model.eval()
    with torch.no_grad():
        times = time_round_robin({"base": lambda: base_model(input_ids=ids),
                                  "merged": lambda: merged_model(input_ids=ids)}, repeats, warmup=1)
    base_model.train(), merged_model.train()
    ratios = [m / b for m, b in zip(times["merged"], times["base"])]
    return {"base_median_s": statistics.median(times["base"]), "merged_median_s": statistics.median(times["merged"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def run_case(args, base, floor, r: int, targets: str, ids) -> dict:
    variants = {"floor": floor}
    for name in args.variants:
        if name != "floor":
            variants[name] = build_variant(base, name, r, TARGET_SETS[targets])
    saved = {n: saved_activation_bytes(m, ids) for n, m in variants.items()}
    times = time_round_robin({n: make_step(m, ids) for n, m in variants.items()}, args.repeats, args.warmup)
    rows = summarize(times)
    for n, row in rows.items():
        row["saved_bytes"] = saved[n]
        row["saved_over_floor"] = saved[n] - saved["floor"]
    for n, model in variants.items():
        if n.startswith("ours"):
            rows[n]["paths"] = paths_taken(make_step(model, ids))  # one more step, recording each layer's path
    case = {"r": r, "targets": targets, "batch": ids.shape[0], "seq_len": ids.shape[1], "tokens": ids.numel(),
            "variants": rows}
    if "ours" in rows:
        case["auto_paths"] = rows["ours"]["paths"]
    if "peft" in rows:
        peft_extra = rows["peft"]["saved_over_floor"]
        for n, row in rows.items():
            if n.startswith("ours"):
                row["overhead_vs_peft"] = row["overhead_s"] / rows["peft"]["overhead_s"]
                row["saved_extra_vs_peft"] = row["saved_over_floor"] / peft_extra if peft_extra else float("nan")
    if not args.no_rss:
        for n in variants:
            rows[n]["peak_rss_bytes"] = peak_rss(args, n, r, targets, ids)
    ours = next((n for n in ("ours", *variants) if n.startswith("ours") and n in variants), None)
    if args.merged_repeats and ours:
        merge_vera(variants[ours])
        case["merged_forward"] = merged_forward_ratio(floor, variants[ours], ids, args.merged_repeats)
    del variants
    return case


def print_case(case: dict) -> None:
    print(f"\n== r={case['r']}  targets={case['targets']}  N={case['tokens']} (B={case['batch']}, T={case['seq_len']})"
          + (f"  auto took {case['auto_paths']}" if "auto_paths" in case else ""))
    print(f"{'variant':<18}{'median s':>9}{'p25-p75 s':>15}{'x floor':>9}{'(q1-q3)':>14}{'ovh/PEFT':>9}"
          f"{'saved MiB':>10}{'+floor MiB':>11}{'/PEFT':>7}{'RSS MiB':>9}")
    for n, row in case["variants"].items():
        lo, hi = row.get("ratio_spread", [float("nan")] * 2)
        print(f"{n:<18}{row['median_s']:>9.3f}{row['p25_s']:>7.3f}-{row['p75_s']:<7.3f}{row['ratio_to_floor']:>9.3f}"
              f"{f'{lo:.3f}-{hi:.3f}':>14}{row.get('overhead_vs_peft', float('nan')):>9.2f}"
              f"{row['saved_bytes'] / 2**20:>10.1f}{row['saved_over_floor'] / 2**20:>11.1f}"
              f"{row.get('saved_extra_vs_peft', float('nan')):>7.2f}"
              f"{row.get('peak_rss_bytes', float('nan')) / 2**20:>9.0f}")
    if "merged_forward" in case:
        m = case["merged_forward"]
        print(f"merged forward / base forward: {m['ratio']:.3f} (min {m['ratio_min']:.3f}, max {m['ratio_max']:.3f})")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return {}
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    base = build_base(args.shape, dtype, args.device)
    floor = build_variant(base, "floor", 0, [])
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "threads": args.threads, "device": args.device},
              "args": {k: v for k, v in vars(args).items() if k not in ("shape", "rss_child")},
              "shape": vars(args.shape), "cases": []}
    for batch, seq_len, targets, r in itertools.product(args.batch, args.seq_len, args.targets, args.ranks):
        ids = _inputs(args, batch, seq_len)
        case = run_case(args, base, floor, r, targets, ids)
        print_case(case)
        result["cases"].append(case)
        result["wall_s"] = time.time() - t0
        if args.json:  # after every case, so a long run that is cut short still leaves its numbers
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
