"""What the quality benchmarks (``bench_quality``, ``bench_glue``) share: the app's config, and LoRA on the app.

* :func:`compose` gives ``conf/train.yaml`` composed with overrides; :data:`QUIET` the overrides that keep
  a benchmark run from writing checkpoints, progress bars and summaries it does not read.
* Head-only, VeRA and full fine-tuning go through ``vera_lightning.app.commands.train(cfg)`` (``finetune=``);
  LoRA cannot, because PEFT is a benchmark dependency, not the app's. :func:`train_lora` builds it from
  the same app pieces the composed config names (tokenizer, model, DataModule, LightningModule, Trainer),
  so only what trains differs, and returns the keys of ``train(cfg)``'s summary that a benchmark reads.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

__all__ = ["QUIET", "compose", "train_lora"]

ROOT = Path(__file__).resolve().parents[1]
#: overrides of every benchmark run: no checkpoints, progress bars, model summary or evaluation before training
QUIET = ["callbacks=none", "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "trainer.enable_checkpointing=false", "eval_before=false"]


def compose(overrides: list[str]):
    """``conf/train.yaml`` composed with ``overrides`` (the app's configs registered first)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vera_lightning.app import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def _lora_groups(model, lr: float, head_lr: float) -> list[dict]:
    """LoRA's A/B at ``lr`` (found through PEFT's LoraLayer modules, not by name), the rest at ``head_lr``."""
    from peft.tuners.lora import LoraLayer

    lora = {id(p): p for m in model.modules() if isinstance(m, LoraLayer)
            for d in (m.lora_A, m.lora_B) for p in d.parameters() if p.requires_grad}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in lora]
    return [{"params": list(lora.values()), "lr": lr, "name": "lora"}, {"params": rest, "lr": head_lr, "name": "heads"}]


def train_lora(cfg, r: int) -> dict:
    """PEFT LoRA (``r``, α = 2r) on ``vera.target_modules`` of the app's model for ``cfg``.

    The A/B matrices train at ``optim.lr``, ``vera.modules_to_save`` (PEFT's ``modules_to_save``) at
    ``optim.head_lr``.

    Returns:
        The final validation metrics and, as ``train(cfg)`` names them, ``metric``, ``trainable_params``,
        ``total_params``, ``adapter_bytes`` (PEFT's ``save_pretrained`` folder), ``model_bytes``,
        ``steps`` and ``fit_s``.
    """
    import lightning.pytorch as pl
    import peft
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vera_lightning import count_parameters, model_bytes
    from vera_lightning.app import vera_config_from
    from vera_lightning.app.data.datamodules import build_datamodule
    from vera_lightning.app.models.load import build_model, build_tokenizer
    from vera_lightning.app.tasks.final_validation import ValidationMemo, final_metrics
    from vera_lightning.app.tasks.module import build_module

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    vera_config = vera_config_from(cfg.vera)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, num_labels=data_cfg.get("num_labels"),
                        problem_type=data_cfg.get("problem_type"))
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=sorted(
        vera_config.target_modules), modules_to_save=list(vera_config.modules_to_save or [])))
    module = build_module(cfg.model.task, model, cfg.optim, num_labels=data_cfg.get("num_labels"),
                          metrics=data_cfg.get("metrics"), problem_type=data_cfg.get("problem_type"),
                          generate=cfg.get("generate") if data_cfg.get("format") == "sft" else None)
    module.param_groups = lambda: _lora_groups(model, float(cfg.optim.lr), float(cfg.optim.head_lr))
    datamodule = build_datamodule(data_cfg, tokenizer)
    memo = ValidationMemo()  # as train(cfg): the validation at fit's last step is the final one when it can be
    trainer = instantiate(cfg.trainer, callbacks=[memo], logger=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    metrics, _ = final_metrics(trainer, module, datamodule, memo)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    trainable, total = count_parameters(model)
    return {**metrics, "metric": metrics[cfg.optimized_metric], "trainable_params": trainable,
            "total_params": total, "adapter_bytes": size, "model_bytes": model_bytes(model)["total"],
            "steps": trainer.global_step, "fit_s": round(fit_s, 2)}
