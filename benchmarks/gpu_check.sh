#!/usr/bin/env bash
# The GPU check (issue 32, item 6): everything this project measures or tests only on CUDA, in one go.
#
#   benchmarks/gpu_check.sh RESULTS.json        # or: make gpu-check [GPU_JSON=RESULTS.json]
#
# On a CUDA machine it runs, each step logged beside the results file (RESULTS.json.d/<step>.log):
#   1. gpu_tests   the `gpu`-marked tests (pytest -m gpu)
#   2. autotune    benchmarks/bench.py on the GPU: the measured path choice (`auto`) at SmolLM2's shapes, float32
#   3. steps_bf16  the bf16 SmolLM2 step table: frozen floor, PEFT VeRA, PEFT LoRA r=8 and ours (30 layers,
#                  r=256, q,v and all seven linears, N = 3x256 and 8x512 tokens)
#   4. nf4_bnb     NF4 through bitsandbytes (when installed): its interop tests against PEFT and a timed
#                  SmolLM2-shaped VeRA step over an NF4 base (skipped, and said so, without bitsandbytes)
#   5. ddp_2gpu    scripts/train.py experiment=smoke trainer=ddp trainer.devices=2 trainer.accelerator=gpu
#                  (when 2 GPUs exist; skipped, and said so, otherwise)
# and writes one JSON: the machine (GPUs, torch, CUDA), each step's exit code, seconds, log and numbers
# (bench.py's own JSON for 2 and 3). A failed step does not stop the others; the exit code is 1 if any failed.
# Without CUDA it refuses at once (exit 2) and runs nothing. PYTHON=... picks the interpreter (default: .venv's).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: benchmarks/gpu_check.sh RESULTS.json  (the one JSON of results this check writes)" >&2
    exit 2
fi
OUT="$1"

refuse() {
    echo "gpu_check: no CUDA device here ($1): this check needs a CUDA machine; nothing was run." >&2
    exit 2
}
# no NVIDIA device node and no nvidia-smi: refuse before paying for torch's import
if ! ls /dev/nvidia[0-9]* > /dev/null 2>&1 && ! command -v nvidia-smi > /dev/null 2>&1; then
    refuse "no /dev/nvidia* and no nvidia-smi"
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    refuse "torch.cuda.is_available() is False with $PYTHON"
fi

cd "$ROOT" || exit 2
LOGS="$OUT.d"
mkdir -p "$LOGS" || exit 2
STEPS="$LOGS/steps.tsv"
: > "$STEPS"
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# run NAME CMD...: run one step, record "name<TAB>rc<TAB>seconds<TAB>note"
run() {
    local name="$1"; shift
    local start end rc
    echo "gpu_check: $name ..." >&2
    start=$(date +%s%N)
    "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( (end - start) / 1000000 ))" "" >> "$STEPS"
    echo "gpu_check: $name exit $rc" >&2
}

skip() {
    printf '%s\t%s\t%s\t%s\n' "$1" "skipped" "0" "$2" >> "$STEPS"
    echo "gpu_check: $1 skipped: $2" >&2
}

run gpu_tests "$PYTHON" -m pytest tests -q -m gpu -p no:cacheprovider

run autotune "$PYTHON" benchmarks/bench.py --model smollm2 --device cuda --dtype float32 --threads 1 \
    --layers 30 --shapes 3x256 8x512 --ranks 256 --targets qv all7 --variants floor ours --no-rss \
    --json "$LOGS/autotune.json"

run steps_bf16 "$PYTHON" benchmarks/bench.py --model smollm2 --device cuda --dtype bfloat16 --threads 1 \
    --layers 30 --shapes 3x256 8x512 --ranks 256 --targets qv all7 --variants floor peft lora8 ours --no-rss \
    --json "$LOGS/steps_bf16.json"

if "$PYTHON" -c 'import bitsandbytes' > /dev/null 2>&1; then
    cat > "$LOGS/nf4_step.py" <<'EOF'
"""A timed VeRA step (r=256, q,v) over an NF4 (bitsandbytes) base of SmolLM2-135M's shapes, 30 layers, bf16."""
import dataclasses
import json
import sys
import time

import torch
from bench_harness import SHAPES, build_base

from vera_lightning import VeraConfig, apply_vera, model_bytes, quantize_base

shape = dataclasses.replace(SHAPES["smollm2"], layers=30)
model = build_base(shape, torch.bfloat16, "cuda")
quantize_base(model, "nf4", backend="bitsandbytes")
apply_vera(model, VeraConfig(r=256, target_modules=["q_proj", "v_proj"]))
ids = torch.randint(0, shape.vocab, (8, 512), device="cuda")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
times = []
for _ in range(7):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
timed = sorted(times[1:])
with open(sys.argv[1], "w") as fh:
    json.dump({"median_step_s": timed[len(timed) // 2], "tokens_per_step": 8 * 512, "layers": 30,
               "peak_cuda_bytes": torch.cuda.max_memory_allocated(), "model_bytes": model_bytes(model)}, fh)
EOF
    run nf4_bnb bash -c '"$0" -m pytest tests/ops/test_quantize.py -q -k bitsandbytes -p no:cacheprovider &&
        PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" "$0" "$2" "$3"' \
        "$PYTHON" "$ROOT/benchmarks" "$LOGS/nf4_step.py" "$LOGS/nf4_bnb.json"
else
    skip nf4_bnb "bitsandbytes is not installed (pip install bitsandbytes)"
fi

if [ "$GPUS" -ge 2 ]; then
    run ddp_2gpu "$PYTHON" scripts/train.py experiment=smoke trainer=ddp trainer.devices=2 trainer.accelerator=gpu \
        "hydra.run.dir=$LOGS/ddp_run"
else
    skip ddp_2gpu "$GPUS GPU(s): the DDP smoke test needs 2"
fi

"$PYTHON" - "$OUT" "$LOGS" <<'EOF'
import json, os, platform, sys, time
from pathlib import Path

import torch

out, logs = Path(sys.argv[1]), Path(sys.argv[2])
steps = {}
for line in (logs / "steps.tsv").read_text().splitlines():
    name, rc, seconds, note = line.split("\t")
    step = {"status": "skipped", "reason": note} if rc == "skipped" else \
        {"status": "ok" if rc == "0" else "failed", "exit_code": int(rc), "seconds": round(int(seconds) / 1000, 1),
         "log": str(logs / f"{name}.log"),
         "log_tail": (logs / f"{name}.log").read_text(errors="replace")[-2000:]}
    numbers = logs / f"{name}.json"
    if numbers.is_file():
        step["results"] = json.loads(numbers.read_text())
    steps[name] = step
record = {"kind": "gpu_check", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
          "torch": torch.__version__, "cuda": torch.version.cuda,
          "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
          "bf16_supported": torch.cuda.is_bf16_supported(), "steps": steps,
          "failed": sorted(n for n, s in steps.items() if s["status"] == "failed")}
partial = out.with_name(f".{out.name}.partial")
partial.write_text(json.dumps(record, indent=2) + "\n")
os.replace(partial, out)
print(f"gpu_check: wrote {out}; failed: {record['failed'] or 'none'}", file=sys.stderr)
sys.exit(1 if record["failed"] else 0)
EOF
