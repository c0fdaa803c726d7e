"""Training-step time of SmolLM2 + VeRA in float32 and in the bf16 forms, round-robin in one process.

Variants (VeRA r=256 on q_proj, v_proj, as ``experiment=e2e_smollm2``; batches of 8 rows of 80 tokens whose
last 25 are the scored response, as E2E's chat-formatted rows are):

* ``fp32``        float32 base, ``model(**batch).loss`` (the app before issue 32);
* ``fp32+rl``     float32 base, the response-only loss (:mod:`vera_lightning.app.tasks.lm_loss`);
* ``bf16-peft``   bf16 base, projections in the λ's dtype (PEFT's form: the adapter's products in float32), full loss
  (the app's ``compute_dtype=bf16`` before issue 32);
* ``bf16``        bf16 base, projection products in bf16, float32 λ's, response-only loss (the bf16 training form);
* ``lora8-bf16``  PEFT LoRA r=8 on q,v over the bf16 base, response-only loss (the step a LoRA user would pay).

Every round runs one step of each variant in turn (after one warm-up round), so slow phases of a shared machine
hit all of them; the table gives the median wall and CPU seconds per step and the ratio to ``fp32``.

Usage::

    python benchmarks/bench_precision.py --rounds 6 --json benchmarks/results/issue32-precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("fp32", "fp32+rl", "bf16-peft", "bf16", "lora8-bf16")


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text})


def build(variant: str, cfg_model, tokenizer):
    import warnings

    from vera_lightning import VeraConfig, apply_vera, set_projection_dtype
    from vera_lightning.app.models.load import build_model

    dtype = "bf16" if variant.startswith(("bf16", "lora8")) else "fp32"
    cfg = dict(cfg_model)
    cfg["compute_dtype"] = dtype
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "lora8-bf16":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        else:
            apply_vera(model, VeraConfig(r=256, target_modules=["q_proj", "v_proj"], d_initial=0.1))
            if variant == "bf16":
                set_projection_dtype(model, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), torch.optim.AdamW(params, lr=1e-3)


def batch(vocab: int, rows: int = 8, length: int = 80, response: int = 25) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length - response] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step(variant: str, model, optimizer, data) -> float:
    from vera_lightning.app.tasks.lm_loss import response_loss

    optimizer.zero_grad(set_to_none=True)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    loss = inner(**data).loss if variant in ("fp32", "bf16-peft") else response_loss(inner, data)
    loss.backward()
    optimizer.step()
    return float(loss)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VERA_LIGHTNING_AUTOTUNE_CACHE", "off")

    from bench_app import compose

    from vera_lightning.app.models.load import build_tokenizer

    cfg = compose(["experiment=e2e_smollm2"])
    tokenizer = build_tokenizer(cfg.model)
    data = batch(len(tokenizer))
    built = {v: build(v, cfg.model, tokenizer) for v in args.variants}
    wall = {v: [] for v in args.variants}
    cpu = {v: [] for v in args.variants}
    losses = {}
    for r in range(args.rounds + 1):
        for v in args.variants:
            w0, c0 = time.perf_counter(), time.process_time()
            losses[v] = step(v, *built[v], data)
            if r:  # round 0 warms up (and lets auto tune its paths)
                wall[v].append(time.perf_counter() - w0)
                cpu[v].append(time.process_time() - c0)
        print(f"[bench_precision] round {r}: " + ", ".join(f"{v} {wall[v][-1]:.2f}s" for v in args.variants if r),
              flush=True)
    med = {v: statistics.median(wall[v]) for v in args.variants}
    base = med.get("fp32")
    result = {
        "command": "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu_flags": cpu_flags(), "threads": args.threads, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "loadavg_end": os.getloadavg()[0],
        "variants": {v: {"wall_s_median": med[v], "cpu_s_median": statistics.median(cpu[v]), "wall_s": wall[v],
                         "vs_fp32": (med[v] / base) if base else None, "last_loss": losses[v]}
                     for v in args.variants},
    }
    print("| variant | wall s/step (median) | CPU s/step | vs fp32 |\n|---|---|---|---|")
    for v in args.variants:
        x = result["variants"][v]
        ratio = f"{x['vs_fp32']:.2f}" if x["vs_fp32"] else "-"
        print(f"| {v} | {x['wall_s_median']:.2f} | {x['cpu_s_median']:.2f} | {ratio} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
