"""Benchmark VeRA training steps: frozen-base floor vs PEFT (VeRA, LoRA) vs vera-lightning, interleaved.

Example::

    python benchmarks/bench.py --threads 2 --batch 4 --seq-len 128 --json bench.json
    python benchmarks/bench.py --threads 1 2 --batch 4 16 64 --seq-len 128 --layers 4 --vocab 1024 --ranks 1024 \\
        --targets qv --no-rss --json sweep.json       # token sweep N = 512, 2048, 8192 at 1 and 2 threads
    python benchmarks/bench.py --model smollm2 --threads 1 2 --shapes 3x256 8x512 --ranks 256 --no-rss
    python benchmarks/bench.py --quick --threads 1 2      # tiny smoke run (< 30 s)

Prints one table per case (tokens x rank x targets) with the paths ``auto`` took with its measured
choice (``ours``) and with the cost model alone, the seconds it spent measuring, and the thread
count; with ``--json``, writes every number. Several ``--threads`` run one after the other in this
process (every case is tagged with its thread count; ``auto`` measures again for each count).
The ``--json`` file is written after every case, and the same command run again resumes: the cases
it holds are kept and only the rest is measured (a file holding another command's numbers is refused,
never overwritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_harness import (
    MODEL_TARGETS,
    SHAPES,
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

from vera_lightning import autotune_report, configure_autotune, merge_vera

QUICK = {
    "opt": BenchShape(hidden=64, layers=2, ffn=128, heads=4, vocab=256, batch=2, seq_len=16),
    "smollm2": BenchShape(hidden=64, layers=2, ffn=96, heads=4, kv_heads=2, vocab=256, batch=2, seq_len=16,
                          model="smollm2"),
}
DEFAULT_RANKS = {"opt": [256, 1024], "smollm2": [256]}
DEFAULT_VARIANTS = {"opt": ["floor", "peft", "ours"], "smollm2": ["floor", "peft", "lora8", "ours"]}


def _shape_pair(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxT, e.g. 8x512") from None
    return b, t


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt", choices=list(SHAPES), help="opt (OPT-125m) or smollm2 (SmolLM2-135M)")
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="one or more thread counts, in turn")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (a token sweep)")
    p.add_argument("--seq-len", type=int, nargs="+", default=None, help="sequence lengths (N = B x T)")
    p.add_argument("--shapes", type=_shape_pair, nargs="+", default=None,
                   help="BxT pairs (e.g. 3x256 8x512) instead of the product of --batch and --seq-len")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 12 for opt, 4 for smollm2)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="default: 256 1024 (opt), 256 (smollm2)")
    p.add_argument("--targets", nargs="+", default=None, choices=list(TARGET_SETS),
                   help="default: qv all (opt), qv all7 (smollm2)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="default: floor peft ours (opt), floor peft lora8 ours (smollm2)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--merged-repeats", type=int, default=10, help="rounds of merged vs base forward (0: skip)")
    p.add_argument("--tune-budget", type=float, default=None, help="seconds auto may spend measuring, per case")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--quick", action="store_true", help="tiny model, r=8 (or given ranks <= 16), 2 rounds: smoke test")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # internal: VARIANT:r:targets
    args = p.parse_args(argv)
    args.threads = args.threads[0] if len(args.threads) == 1 else args.threads
    shape = (QUICK if args.quick else SHAPES)[args.model]
    args.ranks = args.ranks or DEFAULT_RANKS[args.model]
    args.targets = args.targets or list(MODEL_TARGETS[args.model])
    args.variants = args.variants or DEFAULT_VARIANTS[args.model]
    wrong = [t for t in args.targets if t not in MODEL_TARGETS[args.model]]
    if wrong:
        p.error(f"--targets {' '.join(wrong)}: {args.model} has {', '.join(MODEL_TARGETS[args.model])}")
    if args.shapes:
        args.cases = list(args.shapes)
    else:
        batches, seq_lens = args.batch or [shape.batch], args.seq_len or [shape.seq_len]
        args.cases = list(itertools.product(batches, seq_lens))
    args.batch, args.seq_len = sorted({b for b, _ in args.cases}), sorted({t for _, t in args.cases})
    sizes = {k: v for k, v in (("layers", args.layers), ("vocab", args.vocab)) if v is not None}
    args.shape = dataclasses.replace(shape, batch=max(args.batch), seq_len=max(args.seq_len), **sizes)
    if args.quick:
        args.ranks = [r for r in args.ranks if r <= 16] or [8]
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
    """Build one variant alone, run two warm-up steps, print the peak RSS of the next step in bytes.

    The warm-up steps let ``auto`` learn its sibling groups and measure its paths; the high-water
    mark is reset (``/proc/self/clear_refs``) after them, so the figure is one step's peak (weights +
    activations + gradients + AdamW state), not the construction's. Elsewhere than Linux it falls
    back to the process-wide ``ru_maxrss``.
    """
    name, r, targets = args.rss_child.split(":")
    configure_autotune(cache_file=None, budget_s=args.tune_budget)
    base = build_base(args.shape, getattr(torch, args.dtype), args.device)
    model = build_variant(base, name, int(r), TARGET_SETS[targets], inplace=True)
    step = make_step(model, _inputs(args, args.batch[0], args.seq_len[0]), VARIANTS[name].tune)
    step(), step()
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
    cmd = [sys.executable, __file__, "--rss-child", f"{name}:{r}:{targets}", "--threads", str(torch.get_num_threads()),
           "--model", args.model, "--shapes", f"{ids.shape[0]}x{ids.shape[1]}", "--dtype", args.dtype,
           "--device", args.device]
    cmd += [f"--{k}={v}" for k, v in (("layers", args.layers), ("vocab", args.vocab), ("tune-budget", args.tune_budget))
            if v is not None]
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


def warm_ours(model, ids, tune) -> dict:
    """Two steps (learn the sibling groups, then measure), the seconds measuring took, the paths with and without it."""
    step = make_step(model, ids, tune)
    before = autotune_report()["spent_s"]
    step(), step()
    info = {"tune_s": autotune_report()["spent_s"] - before, "paths": paths_taken(step)}
    if tune is not None:  # auto: what the cost model alone takes on the same model
        info["paths_model"] = paths_taken(make_step(model, ids, tune=False))
    return info


def run_case(args, base, floor, r: int, targets: str, ids) -> dict:
    variants = {"floor": floor}
    for name in args.variants:
        if name != "floor":
            variants[name] = build_variant(base, name, r, TARGET_SETS[targets])
    configure_autotune(clear=True)  # every case measures afresh, so its tuning time is its own
    warm = {n: warm_ours(m, ids, VARIANTS[n].tune) for n, m in variants.items() if n.startswith("ours")}
    saved = {n: saved_activation_bytes(m, ids) for n, m in variants.items()}
    times = time_round_robin({n: make_step(m, ids, VARIANTS[n].tune) for n, m in variants.items()}, args.repeats,
                             args.warmup)
    rows = summarize(times)
    for n, row in rows.items():
        row["saved_bytes"] = saved[n]
        row["saved_over_floor"] = saved[n] - saved["floor"]
        row.update(warm.get(n, {}))
        if "lora8" in times:
            row["step_vs_lora8"] = statistics.median(t / lo for t, lo in zip(times[n], times["lora8"]))
    case = {"r": r, "targets": targets, "batch": ids.shape[0], "seq_len": ids.shape[1], "tokens": ids.numel(),
            "threads": torch.get_num_threads(), "variants": rows}
    if "ours" in rows:
        case["auto_paths"] = rows["ours"]["paths"]
        case["auto_paths_model"] = rows["ours"].get("paths_model")
        case["tune_s"] = rows["ours"]["tune_s"]
        case["tune_vs_200_steps"] = rows["ours"]["tune_s"] / (200 * rows["ours"]["median_s"])
    if "peft" in rows:
        peft_extra = rows["peft"]["saved_over_floor"]
        for n, row in rows.items():
            if n.startswith("ours") or n == "lora8":
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


def _paths(counts) -> str:
    return "+".join(f"{p}x{c}" for p, c in sorted(counts.items())) if counts else "-"


def print_case(case: dict) -> None:
    print(f"\n== r={case['r']}  targets={case['targets']}  N={case['tokens']} (B={case['batch']}, T={case['seq_len']})"
          + (f"  auto took {case['auto_paths']}" if "auto_paths" in case else "") + f"  threads={case['threads']}")
    if "auto_paths" in case:
        print(f"   measured choice: {_paths(case['auto_paths'])}; cost model alone: {_paths(case['auto_paths_model'])};"
              f" measuring took {case['tune_s']:.2f} s ({100 * case['tune_vs_200_steps']:.2f} % of 200 steps)")
    print(f"{'variant':<18}{'median s':>9}{'p25-p75 s':>15}{'x floor':>9}{'(q1-q3)':>14}{'ovh/PEFT':>9}"
          f"{'saved MiB':>10}{'+floor MiB':>11}{'/PEFT':>7}{'RSS MiB':>9}{'/LoRA8':>8}")
    for n, row in case["variants"].items():
        lo, hi = row.get("ratio_spread", [float("nan")] * 2)
        print(f"{n:<18}{row['median_s']:>9.3f}{row['p25_s']:>7.3f}-{row['p75_s']:<7.3f}{row['ratio_to_floor']:>9.3f}"
              f"{f'{lo:.3f}-{hi:.3f}':>14}{row.get('overhead_vs_peft', float('nan')):>9.2f}"
              f"{row['saved_bytes'] / 2**20:>10.1f}{row['saved_over_floor'] / 2**20:>11.1f}"
              f"{row.get('saved_extra_vs_peft', float('nan')):>7.2f}"
              f"{row.get('peak_rss_bytes', float('nan')) / 2**20:>9.0f}{row.get('step_vs_lora8', float('nan')):>8.2f}")
    if "merged_forward" in case:
        m = case["merged_forward"]
        print(f"merged forward / base forward: {m['ratio']:.3f} (min {m['ratio_min']:.3f}, max {m['ratio_max']:.3f})")


def print_summary(cases: list[dict]) -> None:
    """One line per case: the issue's columns (ours' overhead and saved bytes over PEFT's, paths, tuning)."""
    print(f"\n{'threads':>7}{'N':>6}{'r':>6}{'targets':>8}{'ovh/PEFT':>10}{'saved/PEFT':>11}{'/LoRA8':>8}"
          f"{'tune s':>8}  paths measured | cost model")
    for c in cases:
        ours, nan = c["variants"].get("ours", {}), float("nan")
        print(f"{c['threads']:>7}{c['tokens']:>6}{c['r']:>6}{c['targets']:>8}"
              f"{ours.get('overhead_vs_peft', nan):>10.2f}{ours.get('saved_extra_vs_peft', nan):>11.2f}"
              f"{ours.get('step_vs_lora8', nan):>8.2f}{c.get('tune_s', nan):>8.2f}  "
              f"{_paths(c.get('auto_paths'))} | {_paths(c.get('auto_paths_model'))}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    thread_counts = args.threads if isinstance(args.threads, list) else [args.threads]
    torch.set_num_threads(thread_counts[0])
    if args.rss_child:
        rss_child(args)
        return {}
    # measure afresh in this process (never read or write the user's cache file), within the budget given
    with configure_autotune(cache_file=None, budget_s=args.tune_budget):
        return run_cases(args, thread_counts)


def _case_key(case: dict) -> tuple:
    return case["threads"], case["batch"], case["seq_len"], case["targets"], case["r"]


def resumable(path, header: dict) -> dict:
    """What an earlier, interrupted run of the same command left in ``--json`` (``{}``: none, start afresh).

    Raises:
        SystemExit: ``path`` holds something else (another command's numbers, or not this script's JSON):
            it is never overwritten; the message names what differs and the two ways on.
    """
    if not path:
        return {}
    try:
        with open(path) as f:
            earlier = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise SystemExit(f"bench.py: --json {path} exists and is not a benchmark file this script wrote ({err}); "
                         "it is left as it is: pass another --json path, or remove the file") from None
    differs = [k for k in ("machine", "args", "shape") if not isinstance(earlier, dict) or earlier.get(k) != header[k]]
    if differs:
        detail = ""
        if isinstance(earlier, dict) and isinstance(earlier.get("args"), dict) and "args" in differs:
            keys = sorted(k for k in set(earlier["args"]) | set(header["args"])
                          if earlier["args"].get(k) != header["args"].get(k))
            detail = f" (options differing: {', '.join(keys)})"
        raise SystemExit(f"bench.py: --json {path} holds the numbers of another run: its {', '.join(differs)} "
                         f"differ{detail}. Nothing was measured and the file is left as it is: pass another --json "
                         "path, or rerun that file's own command to resume it")
    return earlier


def run_cases(args, thread_counts: list[int]) -> dict:
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "threads": args.threads, "device": args.device},
              "args": {k: v for k, v in vars(args).items() if k not in ("shape", "rss_child")},
              "shape": vars(args.shape), "cases": []}
    result = json.loads(json.dumps(result))  # as the file holds it (tuples as lists), to compare with an earlier run
    earlier = resumable(args.json, result)
    result["cases"], result["wall_s"] = earlier.get("cases", []), earlier.get("wall_s", 0.0)
    done = {_case_key(c) for c in result["cases"]}
    if done:
        print(f"resuming {args.json}: {len(done)} case(s) already measured by the same command are kept")
    base = build_base(args.shape, getattr(torch, args.dtype), args.device)
    floor = build_variant(base, "floor", 0, [])
    for threads in thread_counts:  # one after the other, in this process; each case is tagged with its count
        torch.set_num_threads(threads)
        for (batch, seq_len), targets, r in itertools.product(args.cases, args.targets, args.ranks):
            if (threads, batch, seq_len, targets, r) in done:
                continue
            ids = _inputs(args, batch, seq_len)
            start = time.time()
            case = run_case(args, base, floor, r, targets, ids)
            print_case(case)
            result["cases"].append(case)
            result["wall_s"] += time.time() - start
            if args.json:  # after every case (whole or not at all), so a run cut short resumes where it stopped
                with open(f"{args.json}.partial", "w") as f:
                    json.dump(result, f, indent=1)
                os.replace(f"{args.json}.partial", args.json)
    print_summary(result["cases"])
    return result


if __name__ == "__main__":
    main()
