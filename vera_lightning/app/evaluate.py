"""``evaluate(cfg) -> metrics`` for a composed ``conf/eval.yaml`` (``scripts/eval.py``).

Builds the model, data and LightningModule exactly as training does
(:func:`~vera_lightning.app.build.build_components`), loads ``adapter=`` into it (an adapter
directory, a slim ``.ckpt`` or a merged export; none: the base model, a baseline), runs
``Trainer.validate`` on the data config's validation split only (no training file is read)
and writes ``metrics.json`` into the run directory.

With prompt/response data (``data.format=sft``, e.g. ``data=e2e``) validation also generates for the
split's distinct prompts (``generate.val_prompts``: null, the default, = all of them; decoding from the
``generate`` group) and reports ``val/bleu``, ``val/rougeL`` and ``val/chrf`` (0–100, every reference of a
prompt counts; :mod:`~vera_lightning.app.textmetrics`); ``generations.jsonl`` beside ``metrics.json``
holds each prompt, its references and the generation (one process; under DDP each rank holds a share).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from vera_lightning.app.adapters import attach_adapter, model_config_for, resolve_adapter
from vera_lightning.app.build import build_components, check_task, instantiate_dict

__all__ = ["evaluate"]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.adapter`` (or the base model) on the validation split of ``cfg.data``.

    Args:
        cfg: A composed ``conf/eval.yaml`` (``paths.output_dir`` set; ``adapter`` a path or null).

    Returns:
        The validation metrics (``val/acc``, ``val/f1``, ``val/loss``; ``val/loss`` and
        ``val/ppl`` for a causal LM, plus ``val/bleu``, ``val/rougeL``, ``val/chrf`` for prompt/response
        data) plus ``metric`` (the value of ``optimized_metric``),
        ``examples``, ``adapter`` and ``wall_time_s``; the same record is in ``metrics.json``.

    Raises:
        FileNotFoundError: If ``adapter`` or the validation file does not exist.
        ValueError: If the adapter does not fit the model, or the config is inconsistent.
    """
    start = time.perf_counter()
    source = resolve_adapter(cfg.adapter) if cfg.get("adapter") else None  # checked before any work
    check_task(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model_cfg = model_config_for(source, cfg.model)
    parts = build_components(cfg, model_cfg=model_cfg)
    described = attach_adapter(parts, source, model_cfg or cfg.model)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_dict(cfg.get("callbacks")), logger=loggers or False
    )
    results = trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)
    values = {k: float(v) for k, v in (results[0] if results else {}).items()}

    metric_name = cfg.optimized_metric
    record: dict[str, Any] = {
        **values,
        "metric_name": metric_name,
        "metric": values.get(metric_name, float("nan")),
        "examples": len(parts.datamodule.splits["val"]),
        "adapter": str(source.path) if source else None,
        "adapter_kind": source.kind if source else None,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "split": str(cfg.data.get("val_file") or cfg.data.get("hf_val_split")),
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    scored = getattr(parts.module, "val_generation", None)
    if scored is not None and scored.examples:
        record.update(prompts=len(scored.examples), generate=scored.settings.as_dict())
        if trainer.world_size == 1:
            with (output_dir / "generations.jsonl").open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in scored.generations)
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        lines = ["", "VeRA evaluation", f"  evaluated         : {described}",
                 f"  model / data      : {cfg.model.name} / {cfg.data.name} ({record['examples']} examples, "
                 f"{record['split']})"]
        lines += [f"  {name:<18}: {value:.6g}" for name, value in sorted(values.items())]
        lines += [f"  metrics.json      : {output_dir / 'metrics.json'}", ""]
        print("\n".join(lines), flush=True)
    return record
