"""One run of ``bench_peers.py`` (in its own process): ours (the app's ``train(cfg)``) or TRL's ``SFTTrainer`` + PEFT.

What every method shares, so only the training tool differs:

* **Rows, order, batches**: the app's DataModule for the composed config tokenises the training split (the
  tokenizer's chat template around the prompt, -100 on the prompt and on padding, one EOS per response:
  :mod:`vera_lightning.app.data.sft_tokens`) and its training loader's batch sampler gives the order (length-grouped
  and seeded, as ``experiment=e2e_smollm2`` trains). TRL gets those tokenised rows (``input_ids``, ``labels``)
  flattened in that order with ``train_sampling_strategy="sequential"``, so each of its batches holds the app's
  rows, padded the same way (TRL pads on the right to the longest row, as ours does). With
  ``padding_free=True`` TRL concatenates a batch's rows into one (no padding at all).
* **Schedule**: AdamW (betas 0.9/0.999, eps 1e-8, ``optim.weight_decay``) at ``optim.lr`` (LoRA: ``--lora-lr``),
  the app's own warm-up/decay factor (:func:`vera_lightning.app.tasks.module.linear_warmup`) over the run's
  steps, no gradient clipping (``max_grad_norm=0``; the app clips nothing), no gradient checkpointing (TRL's
  default is on; the app's is off).
* **Base weights**: the app's :func:`~vera_lightning.app.models.load.build_model` for the composed model config
  (SmolLM2: ``from_pretrained`` of the folder :mod:`~vera_lightning.app.models.gguf_cache` converted once), cast
  to bf16 for TRL's bf16 runs.
* **Decoding** (``--bleu``): :func:`~vera_lightning.app.generation.generate.generate_texts` with the recipe's
  ``generate`` settings (greedy, KV cache, stop at a newline) over every distinct ``val.csv`` prompt, scored by
  :func:`~vera_lightning.app.generation.textmetrics.score_generations`; ours reloads its saved adapter into a
  fresh base with :func:`vera_lightning.load_adapter`, TRL's model generates as trained (PEFT's modules).

The timed span is the training loop: from the tool's train-begin hook (optimizer, scheduler and loaders built)
to its train-end hook; model loading, adapter injection, tokenisation and generation are outside it.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from bench_app import QUIET, compose

__all__ = ["LoopTimer", "run_spec", "recipe", "batch_order", "trl_trainer", "machine_facts"]

#: perf_counter stamps of the current process's training loop, set by :class:`LoopTimer` (ours).
TIMES: dict[str, float] = {}


class LoopTimer(pl.Callback):
    """Stamps ``TIMES`` at the start and end of Lightning's training loop (added to ours by a Hydra override)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        TIMES["start"] = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        TIMES["end"] = time.perf_counter()


def machine_facts() -> dict[str, Any]:
    """CPU bf16 flags (``avx512_bf16``/``amx_bf16`` in /proc/cpuinfo), torch threads, the load average now."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            words = set(fh.read().split())
    except OSError:
        words = set()
    try:
        with open("/proc/loadavg", encoding="utf-8") as fh:
            load = " ".join(fh.read().split()[:3])
    except OSError:
        load = None
    return {"cpu_flags": sorted(words & {"avx512_bf16", "amx_bf16"}), "torch_threads": torch.get_num_threads(),
            "loadavg": load}


def recipe(spec: dict[str, Any], output_dir: str, extra: tuple[str, ...] = ()):
    """The composed ``experiment=e2e_smollm2`` config of a run (validation off: generation is timed apart)."""
    return compose(["experiment=e2e_smollm2", f"seed={spec['seed']}", f"data.data_dir={spec['data_dir']}",
                    f"trainer.max_steps={spec['steps']}", "trainer.limit_val_batches=0", "generate.val_prompts=0",
                    f"paths.output_dir={output_dir}", *QUIET, *spec["overrides"], *extra])


def batch_order(cfg, steps: int):
    """``(tokenizer, items, batches)``: the app's tokenised training rows and its first ``steps`` batches.

    Raises:
        SystemExit: If the epoch has fewer batches than ``steps`` or a batch is short (TRL's batches are
            fixed-size cuts of the flattened order, so they would no longer be the app's).
    """
    from omegaconf import OmegaConf

    from vera_lightning.app.data.datamodules import build_datamodule
    from vera_lightning.app.models.load import build_tokenizer

    tokenizer = build_tokenizer(cfg.model)
    data = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True), tokenizer)
    data.setup("fit")
    batches = list(data.train_dataloader().batch_sampler)[:steps]
    size = int(cfg.data.batch_size)
    if len(batches) < steps or any(len(b) != size for b in batches):
        raise SystemExit(f"--steps {steps}: the app's epoch has {len(batches)} batches of sizes "
                         f"{sorted({len(b) for b in batches})}; use at most the epoch's full batches of {size}")
    return tokenizer, data.splits["train"], batches


def _base(cfg, tokenizer, dtype: torch.dtype):
    from vera_lightning.app.models.load import build_model

    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # a from_config model: the same init as ours
    model = build_model({**cfg.model, "compute_dtype": "fp32", "quantize": None}, tokenizer)
    return model.to(dtype) if dtype != torch.float32 else model


def trl_trainer(spec: dict[str, Any], cfg, tokenizer, items, batches, output_dir: str):
    """TRL's ``SFTTrainer`` (PEFT VeRA or LoRA) on the app's rows in the app's order, with the app's schedule."""
    import datasets
    import peft
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from vera_lightning.app.tasks.module import linear_warmup

    bf16 = spec["precision"] == "bf16"
    if spec["method"] == "trl_vera":
        adapter = peft.VeraConfig(r=int(cfg.vera.r), target_modules=list(cfg.vera.target_modules),
                                  d_initial=float(cfg.vera.d_initial), vera_dropout=0.0,
                                  projection_prng_key=int(cfg.vera.projection_prng_key), save_projection=True)
        lr = float(cfg.optim.lr)
    else:
        adapter = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(cfg.vera.target_modules))
        lr = float(spec["lora_lr"])
    rows = [items[i] for batch in batches for i in batch]
    dataset = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=int(cfg.data.batch_size), max_steps=spec["steps"],
        learning_rate=lr, weight_decay=float(cfg.optim.weight_decay), max_grad_norm=0.0, optim="adamw_torch",
        bf16=bf16, fp16=False, gradient_checkpointing=False, padding_free=bool(spec.get("padding_free")),
        max_length=None, train_sampling_strategy="sequential", seed=int(cfg.seed),
        logging_steps=int(cfg.trainer.log_every_n_steps), save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())

    class SameSchedule(SFTTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                warmup = int(float(cfg.optim.warmup_ratio) * num_training_steps)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, linear_warmup(warmup, num_training_steps))
            return self.lr_scheduler

    class Stamp(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            TIMES["start"] = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            TIMES["end"] = time.perf_counter()

    model = _base(cfg, tokenizer, torch.bfloat16 if bf16 else torch.float32)
    return SameSchedule(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                        peft_config=adapter, callbacks=[Stamp()])


def bleu_of(model, tokenizer, cfg, autocast: bool) -> dict[str, float]:
    """``{"bleu", "rougeL", "chrf", "gen_s"}`` of greedy generations for every distinct val prompt."""
    from omegaconf import OmegaConf

    from vera_lightning.app.data import sft
    from vera_lightning.app.data.datamodules import build_datamodule
    from vera_lightning.app.generation.generate import GenerateSettings, generate_texts
    from vera_lightning.app.generation.textmetrics import score_generations

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    examples = build_datamodule(data_cfg, tokenizer).generation_examples("val")
    node = {**OmegaConf.to_container(cfg.generate, resolve=True), "val_prompts": None, "progress": False}
    settings = GenerateSettings.from_config(node)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        texts = list(generate_texts(model, tokenizer, [e["prompt"] for e in examples], settings,
                                    encode=partial(sft.prompt_token_ids, data_cfg, tokenizer), progress=False))
    scores = score_generations(texts, [e["references"] for e in examples])
    return {**{k: round(float(v), 3) for k, v in scores.items()}, "prompts": len(texts),
            "gen_s": round(time.perf_counter() - start, 1)}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (and score, with ``spec["bleu"]``) one run in this process; returns its measurements."""
    torch.set_num_threads(int(spec["threads"]))
    before = machine_facts()
    TIMES.clear()
    with tempfile.TemporaryDirectory() as work:
        if spec["method"] == "ours":
            cfg = recipe(spec, work, (spec["precision_override"],
                                      "+callbacks.peers_timer._target_=bench_peers_run.LoopTimer"))
            tokenizer, items, batches = batch_order(cfg, spec["steps"])
            from vera_lightning.app import train

            result = train(cfg)
            steps, fit_s = int(result["steps"]), float(result["fit_s"])
            rss_train = _rss()
            model = None
            if spec["bleu"]:
                from vera_lightning import load_adapter
                from vera_lightning.app.models.load import build_model

                model = build_model(cfg.model, tokenizer)
                load_adapter(model, result["adapter_dir"])
        else:
            cfg = recipe(spec, work)
            tokenizer, items, batches = batch_order(cfg, spec["steps"])
            trainer = trl_trainer(spec, cfg, tokenizer, items, batches, os.path.join(work, "trl"))
            start = time.perf_counter()
            trainer.train()
            fit_s = time.perf_counter() - start
            steps, rss_train, model = int(trainer.state.global_step), _rss(), trainer.model
        scores = bleu_of(model, tokenizer, cfg, autocast=spec["method"] != "ours" and spec["precision"] == "bf16") \
            if spec["bleu"] else None
    tokens = sum(len(items[i]["input_ids"]) for batch in batches for i in batch)
    padded = sum(len(batch) * max(len(items[i]["input_ids"]) for i in batch) for batch in batches)
    train_s = TIMES["end"] - TIMES["start"]
    after = machine_facts()
    return {"steps_done": steps, "train_s": round(train_s, 2), "fit_s": round(fit_s, 2), "tokens": tokens,
            "padded_tokens": padded, "tokens_per_s": round(tokens / train_s, 1),
            "peak_rss_train_bytes": rss_train, "peak_rss_bytes": _rss(), "scores": scores,
            "cpu_flags": before["cpu_flags"], "torch_threads": before["torch_threads"],
            "loadavg_before": before["loadavg"], "loadavg_after": after["loadavg"],
            "versions": _versions()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "lightning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
