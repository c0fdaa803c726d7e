"""Serving benchmark: many VeRA adapters on one model (MiniLM shape, VeRA r=256 on query/value).

Throughput of one forward over ``--rows`` rows that use ``--adapters`` distinct adapters:

* ``mixed``: ``with adapter_batch(model, names): model(batch)`` (one forward, per-row λ's);
* ``loop``: what a user does without mixed batches: for each adapter, ``set_adapter`` and one forward
  over its rows (``peft-loop``: the same with PEFT's VeRA, ``set_adapter`` + forward);
* ``single``: the same batch through one adapter (the ceiling ``mixed`` is measured against).

Variants are timed round-robin (each round runs every variant once, in rotating order) and the
median is reported, with ratios against ``mixed`` measured in the same run. The mixed batch's
outputs are checked against the loop's.

Memory of N resident adapters (``--resident``): bytes of the adapter tensors the model holds (all
λ's plus one copy of ``vera_A``/``vera_B``; task heads excluded), against N PEFT LoRA adapters of
rank ``--lora-r`` on the same layers (their ``lora_A``/``lora_B``), both measured on built models.

Example::

    nice -n 5 python benchmarks/bench_serving.py --threads 2 --json serving.json
    python benchmarks/bench_serving.py --smoke        # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch

from vera_lightning import VeraConfig, adapter_batch, add_adapter, apply_vera, find_adapter, set_adapter, vera_layers

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
SMOKE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TARGETS = ["query", "value"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--adapters", type=int, default=64, help="distinct adapters in the batch (rows round-robin)")
    p.add_argument("--seq-len", type=int, nargs="*", default=[32, 4, 1], help="one throughput case per length")
    p.add_argument("--r", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--resident", type=int, nargs="*", default=[1, 64, 1024], help="memory cases (none: skip)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's loop and PEFT's LoRA memory")
    p.add_argument("--lora-build-max", type=int, default=64,
                   help="build PEFT LoRA models up to this many adapters (PEFT's add_adapter slows down with every "
                        "adapter); larger counts scale the bytes of the largest built one (each LoRA adapter holds "
                        "its own lora_A/lora_B of fixed shape)")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes: a test that everything runs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.shape = SMOKE if args.smoke else MINILM
    if args.smoke:
        args.rows, args.adapters, args.seq_len, args.r, args.repeats, args.warmup = 4, 3, [6], 8, 1, 0
        args.resident = [1, 3, 8]
    return args


def build_model(shape: dict[str, int]) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(max_position_embeddings=512, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **shape)
    return BertForSequenceClassification(config).eval()


def vera_config(r: int) -> VeraConfig:
    return VeraConfig(r=r, target_modules=TARGETS, init_weights=False)  # random λ's: distinct adapters


def with_adapters(model: torch.nn.Module, r: int, count: int) -> torch.nn.Module:
    """``model`` adapted with ``count`` adapters ``a0`` (primary) ... ``a{count-1}``."""
    adapter = find_adapter(model)
    if adapter is None:
        apply_vera(model, vera_config(r), adapter_name="a0")
        adapter = find_adapter(model)
    for i in range(len(adapter.names), count):
        add_adapter(model, f"a{i}", vera_config(r))
    return model


def adapter_bytes(model: torch.nn.Module) -> int:
    """Bytes of every λ of every adapter plus one copy of the projections (task heads excluded)."""
    adapter = find_adapter(model)
    seen: dict[int, int] = {}
    for _, layer in vera_layers(model):
        for name, param in layer.named_parameters(recurse=False):
            if name.startswith("vera_lambda_"):
                seen[id(param)] = param.numel() * param.element_size()
    for buf in (adapter.vera_A, adapter.vera_B):
        seen[id(buf)] = buf.numel() * buf.element_size()
    return sum(seen.values())


def with_lora_adapters(model: torch.nn.Module, lora_r: int, count: int) -> torch.nn.Module:
    """A PEFT model holding ``count`` LoRA adapters of rank ``lora_r`` on the same layers (built up in place)."""
    import peft

    def config():
        return peft.LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=TARGETS)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not isinstance(model, peft.PeftModel):
            model = peft.get_peft_model(model, config(), adapter_name="l0")
        for i in range(len(model.peft_config), count):
            model.add_adapter(f"l{i}", config())
    return model


def lora_bytes(model: torch.nn.Module) -> int:
    """Bytes of every ``lora_A``/``lora_B`` in a PEFT model."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)


def time_round_robin(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for step in range(warmup + repeats):
        for name in order[step % len(order):] + order[:step % len(order)]:
            start = time.perf_counter()
            variants[name]()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def progress(message: str) -> None:
    print(f"[bench_serving] {message}", file=sys.stderr, flush=True)


def throughput_case(args: argparse.Namespace, model: torch.nn.Module, seq_len: int) -> dict[str, Any]:
    progress(f"throughput, seq_len={seq_len}")
    rows, adapters = args.rows, args.adapters
    names = [f"a{i % adapters}" for i in range(rows)]
    g = torch.Generator().manual_seed(seq_len)
    batch = {"input_ids": torch.randint(0, args.shape["vocab_size"], (rows, seq_len), generator=g)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    groups = {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}
    switch_s: list[float] = []

    def single():  # whichever adapter is active
        return model(**batch).logits

    def mixed():
        with adapter_batch(model, names):
            return model(**batch).logits

    def loop(switch=lambda name: set_adapter(model, name), forward=model):
        out = torch.empty(rows, 2)
        spent = 0.0
        for name, idx in groups.items():
            start = time.perf_counter()
            switch(name)
            spent += time.perf_counter() - start
            out[idx] = forward(**{k: v[idx] for k, v in batch.items()}).logits
        switch_s.append(spent)
        return out

    variants: dict[str, Callable[[], Any]] = {"mixed": mixed, "loop": loop, "single": single}
    theirs = None if args.no_peft else peft_twin(args, model, adapters)
    if theirs is not None:
        variants["peft-loop"] = lambda: loop(switch=theirs.set_adapter, forward=theirs)
    with torch.no_grad():
        reference, served = loop(), mixed()
        check = {"mixed_vs_loop_max_abs": (served - reference).abs().max().item()}
        if theirs is not None:
            check["peft_loop_vs_loop_max_abs"] = (variants["peft-loop"]() - reference).abs().max().item()
        switch_s.clear()
        times = time_round_robin(variants, args.repeats, args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"seq_len": seq_len, "rows": rows, "adapters": adapters, "check": check,
              "median_s": medians, "times_s": times, "loop_set_adapter_s": statistics.median(switch_s)}
    result["loop_forward_only_s"] = medians["loop"] - result["loop_set_adapter_s"]
    result["loop_over_mixed"] = medians["loop"] / medians["mixed"]
    result["loop_forward_only_over_mixed"] = result["loop_forward_only_s"] / medians["mixed"]
    result["mixed_over_single"] = medians["mixed"] / medians["single"]
    result["rows_per_s"] = {name: rows / t for name, t in medians.items()}
    if theirs is not None:
        result["peft_loop_over_mixed"] = medians["peft-loop"] / medians["mixed"]
    return result


def peft_twin(args: argparse.Namespace, model: torch.nn.Module, adapters: int):
    """PEFT's VeRA with the same base and the same λ's for adapters ``a0`` ... (PEFT's per-adapter loop)."""
    import peft

    fields = {"r": args.r, "target_modules": TARGETS, "init_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build_model(args.shape), peft.VeraConfig(**fields), adapter_name="a0")
        for i in range(1, adapters):
            theirs.add_adapter(f"a{i}", peft.VeraConfig(**fields))
    adapter = find_adapter(model)
    with torch.no_grad():
        for layer_name, layer in vera_layers(model):
            twin = theirs.base_model.model.get_submodule(layer_name)
            for i in range(adapters):
                lam_b, lam_d = adapter.lambda_names(f"a{i}")
                twin.vera_lambda_b[f"a{i}"].copy_(getattr(layer, lam_b))
                twin.vera_lambda_d[f"a{i}"].copy_(getattr(layer, lam_d))
    return theirs.eval()


def memory_case(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, lora = build_model(args.shape), None if args.no_peft else build_model(args.shape)
    out = []
    for count in sorted(args.resident):
        progress(f"memory, {count} adapters")
        start = time.perf_counter()
        with_adapters(model, args.r, count)
        row = {"adapters": count, "vera_bytes": adapter_bytes(model), "vera_build_s": time.perf_counter() - start}
        if lora is not None:
            start = time.perf_counter()
            built = min(count, max(args.lora_build_max, 1))
            lora = with_lora_adapters(lora, args.lora_r, built)
            measured = lora_bytes(lora)
            row.update(lora_bytes=measured * count // built, lora_built=built, lora_build_s=time.perf_counter() - start)
            row["vera_over_lora"] = row["vera_bytes"] / row["lora_bytes"]
        out.append(row)
    return out


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
        "args": {k: v for k, v in vars(args).items() if k != "shape"}, "shape": args.shape,
        "throughput": [], "memory": [],
    }
    if args.seq_len:
        model = with_adapters(build_model(args.shape), args.r, args.adapters)
        for seq_len in args.seq_len:
            report["throughput"].append(throughput_case(args, model, seq_len))
            save(report, args, started)  # every finished case is kept
        del model
    if args.resident:
        report["memory"] = memory_case(args)
    save(report, args, started)
    print_report(report)
    return report


def save(report: dict[str, Any], args: argparse.Namespace, started: float) -> None:
    report["wall_s"] = time.perf_counter() - started
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)


def print_report(report: dict[str, Any]) -> None:
    for case in report["throughput"]:
        print(f"\nrows={case['rows']} adapters={case['adapters']} seq_len={case['seq_len']} "
              f"(mixed vs loop max |diff| {case['check']['mixed_vs_loop_max_abs']:.2e})")
        print(f"  {'variant':<10} {'median s':>10} {'rows/s':>10} {'vs mixed':>9}")
        for name, t in case["median_s"].items():
            print(f"  {name:<10} {t:>10.4f} {case['rows_per_s'][name]:>10.1f} {t / case['median_s']['mixed']:>8.2f}x")
        print(f"  loop: set_adapter took {case['loop_set_adapter_s']:.4f} s of it; its forwards alone: "
              f"{case['loop_forward_only_s']:.4f} s = {case['loop_forward_only_over_mixed']:.2f}x mixed")
    if report["memory"]:
        print(f"\n  {'adapters':>8} {'VeRA bytes':>12} {'LoRA bytes':>12} {'VeRA/LoRA':>10}")
    for row in report["memory"]:
        lora = row.get("lora_bytes")
        built = "" if row.get("lora_built", row["adapters"]) == row["adapters"] else \
            f"  (LoRA: {row['lora_built']} built, scaled)"
        print(f"  {row['adapters']:>8} {row['vera_bytes']:>12,} {lora if lora is None else f'{lora:,}':>12} "
              f"{row.get('vera_over_lora', float('nan')):>10.4f}{built}")
    print(f"\nwall {report['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
