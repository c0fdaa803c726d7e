"""Issue 36's target for ``format=merged``: a bf16-trained SmolLM2 adapter merges into a **float32** model whose logits
equal PEFT VeRA's over the float32 base within 1e-4 relative.

Steps (each kept in ``--out``; a rerun reuses the finished ones):

1. train 3 E2E steps with ``experiment=e2e_smollm2 model.compute_dtype=bf16`` (the bf16 training form: a bf16 base,
   float32 λ's), through ``scripts/train.py``;
2. ``scripts/export.py format=merged`` of its adapter (default ``dtype=fp32``), and ``dtype=bf16`` for contrast;
3. logits of 4 E2E validation prompts from each merged folder and from PEFT's ``PeftModel`` (the adapter over the
   float32 base the app builds from the packaged GGUF); the max absolute difference relative to the largest
   reference logit, and the adapter's own effect (adapted vs base logits) for scale.

    python benchmarks/check_merged_bf16.py --out /tmp/check_merged
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script}.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a scratch folder (the run, the exports, results.json)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = out / "run"
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        _run("train", "experiment=e2e_smollm2", "model.compute_dtype=bf16", "trainer.max_steps=3",
             "data.max_val_samples=8", "generate.val_prompts=0", f"hydra.run.dir={run}")
    for dtype in ("fp32", "bf16"):
        if not (out / f"merged-{dtype}" / "config.json").is_file():
            _run("export", f"adapter={run / 'adapter'}", "format=merged", f"dtype={dtype}",
                 f"output={out / f'merged-{dtype}'}")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vera_lightning.app.models.load import resolve_path

    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    base_dir = resolve_path(plan["model"]["name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = ["name[The Eagle], eatType[coffee shop], food[French]", "name[Alimentum], area[city centre]",
               "name[Aromi], eatType[restaurant], food[Italian], familyFriendly[yes]", "name[Cotto], near[Ranch]"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        plain = base(**batch).logits
        peft = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        reference = peft(**batch).logits
        record = {"trained_in": plan["precision"], "adapter_effect_rel": float((reference - plain).abs().max()
                                                                               / reference.abs().max())}
        for dtype in ("fp32", "bf16"):
            merged = AutoModelForCausalLM.from_pretrained(str(out / f"merged-{dtype}"), dtype="auto").eval()
            logits = merged(**batch).logits.float()
            record[dtype] = {"stored": str(next(merged.parameters()).dtype),
                             "max_abs": float((logits - reference).abs().max()),
                             "max_rel": float((logits - reference).abs().max() / reference.abs().max())}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
