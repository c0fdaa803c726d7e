"""What TRL's ``DPOTrainer`` takes as the reference when it is given a PEFT model whose adapter is already trained
(the SFT -> DPO case), for VeRA and for LoRA, against what this project's DPO takes (issue 38).

For each of PEFT VeRA (r=256 on q/v, as ``experiment=hh_dpo_smollm2``) and PEFT LoRA (r=8 on q/v), on SmolLM2-135M:

1. an "SFT-trained" adapter: PEFT's adapter with every trainable tensor set to seeded random values (λ_b is 0 and
   LoRA's B is 0 at initialisation, so an untrained adapter would hide the difference);
2. ``DPOTrainer(model=<that PEFT model>, ref_model=None, ...)`` is built (no step is taken): TRL adds a ``ref`` adapter
   and copies the ``default`` adapter's tensors into it by name;
3. reported: how many of the ``default`` adapter's trainable tensors the ``ref`` adapter holds equal copies of, and the
   summed response log-probability of one HH pair's chosen reply under the ``ref`` adapter (TRL's reference), under
   the SFT adapter and under the base model (adapters disabled).

Then this project's reference for ``adapter=<SFT adapter>`` (``load_adapter(..., adapter_name="reference")``, what
``objective=dpo`` does) on the same VeRA adapter saved by PEFT: its log-prob against the SFT adapter's.

    python benchmarks/check_trl_vera_reference.py      # needs the bench extra: pip install -e .[bench]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh_harmless"


def _pair() -> dict[str, str]:
    """The first HH val pair as prompt / chosen / rejected (the shared transcript prefix is the prompt)."""
    path = next(p for p in (HH / "val.jsonl", HH / "test.jsonl", HH / "train.jsonl") if p.is_file())
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    chosen, rejected = row["chosen"], row["rejected"]
    cut = chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:")
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def _logp(model: torch.nn.Module, tokenizer: Any, pair: dict[str, str]) -> float:
    prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
    reply = tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt) - 1:].sum())


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora" in name else 0.5))


def check(kind: str, base_loader, tokenizer: Any, pair: dict[str, str], work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig, VeraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    config = (VeraConfig(r=256, target_modules=["q_proj", "v_proj"], d_initial=0.1) if kind == "vera"
              else LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(base_loader(), config)
    _randomise(model, seed=1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sft_logp = _logp(model, tokenizer, pair)
    with model.disable_adapter():
        base_logp = _logp(model, tokenizer, pair)
    if kind == "vera":
        model.save_pretrained(str(work / "sft-vera"))
    args = DPOConfig(output_dir=str(work / f"trl-{kind}"), per_device_train_batch_size=1, max_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", logging_strategy="no")
    DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list([pair] * 2),
               processing_class=tokenizer)
    params = dict(model.named_parameters())
    ref_names = {n: n.replace(".default", ".ref", 1) for n in trained}
    copied = sum(1 for n, r in ref_names.items() if r in params and torch.equal(params[r].detach(), trained[n]))
    model.set_adapter("ref")
    ref_logp = _logp(model, tokenizer, pair)
    return {"adapter": kind, "trained_tensors": len(trained), "copied_into_ref": copied,
            "logp_sft": round(sft_logp, 4), "logp_trl_reference": round(ref_logp, 4), "logp_base": round(base_logp, 4)}


def ours(base_loader, tokenizer: Any, pair: dict[str, str], work: Path) -> dict[str, Any]:
    from vera_lightning import load_adapter, set_adapter

    model = base_loader()
    load_adapter(model, work / "sft-vera", adapter_name="reference")  # what objective=dpo adapter=<dir> loads
    set_adapter(model, "reference")
    return {"adapter": "vera (this project)", "logp_reference": round(_logp(model, tokenizer, pair), 4)}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trl_vera_reference.json")
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    from vera_lightning.app.models.load import build_model, build_tokenizer

    model_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml"))
    tokenizer = build_tokenizer(model_cfg)
    base = build_model(model_cfg, tokenizer, compute_dtype="fp32")
    import copy

    pair = _pair()
    results = []
    with tempfile.TemporaryDirectory() as work:
        for kind in ("vera", "lora"):
            results.append(check(kind, lambda: copy.deepcopy(base), tokenizer, pair, Path(work)))
            print(json.dumps(results[-1]), flush=True)
        results.append(ours(lambda: copy.deepcopy(base), tokenizer, pair, Path(work)))
        print(json.dumps(results[-1]), flush=True)
    import peft
    import trl

    record = {"trl": trl.__version__, "peft": peft.__version__, "model": model_cfg["name_or_path"], "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
