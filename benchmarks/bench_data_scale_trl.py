"""TRL's side of ``bench_data_scale.py``: what a TRL user does with the same E2E CSV, as one timed subprocess.

``datasets.load_dataset("csv")`` on ``<data-dir>/train.csv`` with its cache in ``--cache-dir`` (``Dataset.map`` then
caches beside it by fingerprint, so a second run with the same folder reuses the tokenised rows, as it would for a
user); each row mapped to TRL's conversational prompt/completion form (``conf/data/e2e.yaml``'s prompt template
through the tokenizer's chat template); ``SFTTrainer`` with PEFT's ``VeraConfig(r=256)`` on q_proj/v_proj (as
``conf/experiment/e2e_smollm2.yaml``), batch size 8, max length 192, on SmolLM2-135M built by the app's own loader
(the local GGUF, float32, no network), for ``--steps`` steps on the CPU. ``bf16=False``: TRL's default ``bf16=True``
autocasts to bfloat16 on a CPU too, while ours ran in float32 on the measuring host (``model.compute_dtype=auto``
measured it faster there), and the comparison is of the data path, not of precisions. ``SFTConfig``'s other options are
TRL's defaults. The last line printed is JSON: the seconds from process start to the end of the first step, and the
steps done::

    python benchmarks/bench_data_scale_trl.py --data-dir D --cache-dir C --output-dir O [--steps 2]
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: they are part of what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write one sentence describing this restaurant: {mr}"  # conf/data/e2e.yaml's prompt_template


def to_conversation(row: dict) -> dict:
    """One CSV row (``mr``, ``ref``) in TRL's conversational prompt/completion form."""
    return {"prompt": [{"role": "user", "content": PROMPT.format(mr=row["mr"])}],
            "completion": [{"role": "assistant", "content": row["ref"]}]}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=192)
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from omegaconf import OmegaConf
    from peft import VeraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from vera_lightning.app.models.load import build_model, build_tokenizer

    first_step: dict[str, float] = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                first_step["s"] = time.perf_counter() - START

    train = load_dataset("csv", data_files={"train": str(args.data_dir / "train.csv")},
                         cache_dir=str(args.cache_dir))["train"]
    train = train.map(to_conversation, remove_columns=train.column_names)
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml")
    tokenizer = build_tokenizer(model_cfg)
    model = build_model(model_cfg, tokenizer, compute_dtype="fp32")
    config = SFTConfig(max_steps=args.steps, per_device_train_batch_size=8, max_length=args.max_length,
                       learning_rate=2e-2,
                       report_to=[], save_strategy="no", use_cpu=True, output_dir=str(args.output_dir),
                       dataset_num_proc=None, logging_steps=1, gradient_checkpointing=False, bf16=False)
    peft_config = VeraConfig(r=256, target_modules=["q_proj", "v_proj"], d_initial=0.1)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[FirstStep()])
    trainer.train()
    print(json.dumps({"first_step_s": round(first_step["s"], 2) if first_step else None,
                      "steps": trainer.state.global_step}), flush=True)


if __name__ == "__main__":
    main()
