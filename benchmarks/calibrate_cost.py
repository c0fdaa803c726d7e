"""Measure the constants of vera_lightning.forward.cost and check its choices against measured path times.

Example::

    nice -n 5 python benchmarks/calibrate_cost.py --threads 2 --json calib.json
    python benchmarks/calibrate_cost.py --quick          # smoke run (seconds)

It times forward+backward of one sibling group (k layers reading one ``x``: q/v, q/k/v, fc1, fc2
of OPT-125m) for the frozen floor, PEFT and each of our paths, interleaved, at several token
counts and ranks; fits the model's three constants (GEMM rate, elementwise bandwidth, per-kernel
overhead) to the measured extra times over the floor; and prints, per case, the measured extras,
the model's estimates, and the path the cost model picks next to the fastest allowed one.

With tuning on (the default, :mod:`vera_lightning.forward.autotune`) ``auto`` measures its candidates
itself and the constants only order and prune them; they decide when tuning is off
(``VERA_LIGHTNING_AUTOTUNE=0``). This script times explicit paths, so tuning plays no part in it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import warnings

import torch
from bench_harness import time_round_robin
from torch import nn

from vera_lightning import VeraConfig, apply_vera, set_vera_path
from vera_lightning.forward.cost import Machine, allowed_paths, path_costs, path_terms


def fit_machine(rows: list[dict], source: str) -> Machine:
    """Fit ``1/F``, ``1/BW`` and ``τ`` (non-negative) to the measured extra times, by relative error.

    Each row holds one sibling group's measured extra seconds per path; the model is linear in the
    three unknowns (``t = flops/F + bytes/BW + kernels·τ``), so this is a small least-squares problem
    weighted by ``1/t`` (every measurement counts by its relative error).
    """
    design, target = [], []
    for row in rows:
        terms = path_terms(row["n"], row["in"], row["outs"], row["r"], getattr(torch, row.get("dtype", "float32")))
        for path, (flops, moved, kernels) in terms.items():
            t = row["extra_ms"][path] / 1e3
            if t > 0:
                design.append([flops / t, moved / t, kernels / t])
                target.append(1.0)
    a, b = torch.tensor(design, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    scale = a.abs().max(0).values
    active = [0, 1, 2]
    while True:  # least squares, dropping any coefficient that comes out negative
        coef = torch.linalg.lstsq(a[:, active] / scale[active], b[:, None]).solution[:, 0] / scale[active]
        if (coef >= 0).all() or len(active) == 1:
            break
        active = [i for i, c in zip(active, coef.tolist()) if c >= 0]
    full = [0.0, 0.0, 0.0]
    for i, c in zip(active, coef.tolist()):
        full[i] = max(c, 0.0)
    inv = lambda c: 1.0 / c if c > 0 else float("inf")  # noqa: E731
    return Machine(gemm=inv(full[0]), bandwidth=inv(full[1]), overhead=full[2], source=source)


class Group(nn.Module):
    """k linear layers reading the same input (q/k/v-like), outputs summed with fixed weights."""

    def __init__(self, in_features: int, outs: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_features, o) for o in outs)

    def forward(self, x):
        return sum(layer(x).mean(-1) * (i + 1) for i, layer in enumerate(self.layers))


def time_group(n, in_features, outs, r, dtype, device, repeats, paths) -> dict[str, float]:
    """Median extra seconds over the floor of PEFT and each path (per round, interleaved), and the floor's."""
    import peft

    torch.manual_seed(0)
    base = Group(in_features, outs).to(device=device, dtype=dtype).requires_grad_(False)
    names = [f"layers.{i}" for i in range(len(outs))]
    variants = {"floor": base}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants["peft"] = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=r, target_modules=names))
    for path in paths:
        model = apply_vera(copy.deepcopy(base), VeraConfig(r=r, target_modules=names, init_weights=False))
        variants[path] = set_vera_path(model, path, share=True)
    x = torch.randn(n, in_features, device=device, dtype=dtype, requires_grad=True)

    def step(model):
        def run():
            x.grad = None
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)
        return run

    times = time_round_robin({k: step(m) for k, m in variants.items()}, repeats, warmup=1)
    extra = {k: statistics.median(t - f for t, f in zip(v, times["floor"])) for k, v in times.items()}
    return {**extra, "floor": statistics.median(times["floor"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--ranks", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--groups", nargs="+", default=["768:768", "768:768,768", "768:3072", "3072:768"],
                   help="in:out1,out2,... one sibling group each")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--fit-only", default=None, help="refit the constants to the rows of an earlier --json")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.ranks, args.groups, args.repeats = [16, 64], [16], ["32:32,16"], 1
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    paths = ["lean", "save_h", "merged", "plain"]
    if args.fit_only:
        with open(args.fit_only) as f:
            rows = json.load(f)["rows"]
    else:
        rows = []
        for group in args.groups:
            in_s, outs_s = group.split(":")
            in_features, outs = int(in_s), [int(o) for o in outs_s.split(",")]
            for r in args.ranks:
                for n in args.tokens:
                    t = time_group(n, in_features, outs, r, dtype, args.device, args.repeats, paths)
                    extra = {k: 1e3 * v for k, v in t.items() if k != "floor"}
                    rows.append({"in": in_features, "outs": outs, "r": r, "n": n, "dtype": args.dtype,
                                 "floor_ms": 1e3 * t["floor"], "extra_ms": extra})
                    print(f"measured {group} r={r} N={n}: floor {1e3 * t['floor']:.1f} ms, extra "
                          + " ".join(f"{q}={extra[q]:.1f}" for q in ["peft", *paths]), flush=True)
    machine = fit_machine(rows, f"benchmarks/calibrate_cost.py --threads {args.threads} on {args.device}")
    print(f"\nfitted: gemm={machine.gemm:.3g} flop/s bandwidth={machine.bandwidth:.3g} B/s "
          f"overhead={machine.overhead:.3g} s")
    print(f"{'group':<16}{'r':>5}{'N':>6} | measured extra ms: peft " + " ".join(f"{q:>7}" for q in paths)
          + " | model ms: " + " ".join(f"{q:>7}" for q in paths) + " | auto picks / best allowed")
    for row in rows:
        extra, in_features, outs = row["extra_ms"], row["in"], row["outs"]
        model = {k: 1e3 * v for k, v in path_costs(row["n"], in_features, outs, row["r"], dtype, machine).items()}
        allowed = allowed_paths(row["n"], in_features, outs, row["r"], dtype, "lean")
        row["model_ms"], row["pick"] = model, min(allowed, key=model.get)
        row["best"] = min(allowed, key=extra.get)
        loss = extra[row["pick"]] - extra[row["best"]]
        print(f"{row['in']}:{','.join(map(str, outs)):<12}{row['r']:>5}{row['n']:>6} | {extra['peft']:7.1f} "
              + " ".join(f"{extra[q]:7.1f}" for q in paths) + " | " + " ".join(f"{model[q]:7.1f}" for q in paths)
              + f" | {row['pick']} / {row['best']}" + ("" if loss <= 0 else f" (+{loss:.1f} ms)"))
    result = {"machine": vars(machine), "args": vars(args), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
