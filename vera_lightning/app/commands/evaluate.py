"""``evaluate(cfg) -> metrics`` for a composed ``conf/eval.yaml`` (``scripts/eval.py``).

Builds the model, data and LightningModule exactly as training does
(:func:`~vera_lightning.app.commands.build.build_components`), loads ``adapter=`` into it (an adapter
directory, a slim ``.ckpt`` or a merged export; none: the base model, a baseline), runs
``Trainer.validate`` on the data config's validation split only (no training file is read)
and writes ``metrics.json`` into the run directory.

With prompt/response data (``data.format=sft``, e.g. ``data=e2e``) validation also generates for the
split's distinct prompts (``generate.val_prompts``: null, the default, = all of them; decoding from the
``generate`` group) and reports ``val/bleu``, ``val/rougeL`` and ``val/chrf`` (0–100, every reference of a
prompt counts; :mod:`~vera_lightning.app.generation.textmetrics`); ``generations.jsonl`` beside ``metrics.json``
holds each prompt, its references, the generation and ``finished`` (false: cut at ``generate.max_new_tokens``)
(one process; under DDP each rank holds a share).

Check everything, then act: :func:`~vera_lightning.app.commands.preflight.preflight` checks the settings, refuses a
``hydra.run.dir`` holding a training run (eval never writes into a training run's record) and reads and tokenises
the whole validation file before the model is built. The run's own Hydra record goes to
``.hydra-eval-<date>_<time>/`` once the model is built and the adapter fits; ``metrics.json`` and
``generations.jsonl`` are written beside their targets and renamed into place (:func:`vera_lightning.replace_file`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from vera_lightning import replace_file
from vera_lightning.app.commands.adapters import attach_adapter
from vera_lightning.app.commands.build import build_components, instantiate_dict
from vera_lightning.app.commands.planning import make_plan
from vera_lightning.app.commands.preflight import preflight
from vera_lightning.app.runs.plan import RunPlan, plan_json
from vera_lightning.app.runs.records import command_record_name, discard_job_log, write_hydra_record

__all__ = ["evaluate", "run_evaluation"]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.adapter`` (or the base model) on the validation split of ``cfg.data``.

    Args:
        cfg: A composed ``conf/eval.yaml`` (``paths.output_dir`` set; ``adapter`` a path or null), read once into
            the command's :class:`~vera_lightning.app.runs.plan.RunPlan`: with an adapter from a training run, its
            recorded precision is replayed, whatever this machine would measure.

    Returns:
        The validation metrics (``val/acc``, ``val/f1``, ``val/loss``; ``val/loss`` and
        ``val/ppl`` for a causal LM, plus ``val/bleu``, ``val/rougeL``, ``val/chrf`` for prompt/response
        data) plus ``metric`` (the value of ``optimized_metric``),
        ``examples``, ``adapter``, ``precision``, ``device`` and ``wall_time_s``; the same record is in
        ``metrics.json``.

    Raises:
        FileNotFoundError: If ``adapter`` or the validation file does not exist.
        ValueError: If the adapter does not fit the model, or the config is inconsistent.
        FileExistsError: If ``hydra.run.dir`` holds a training run.
    """
    try:
        return run_evaluation(make_plan(cfg, "eval"))
    except BaseException:
        discard_job_log()  # a refused run leaves Hydra's job log as it was
        raise


def run_evaluation(plan: RunPlan) -> dict[str, Any]:
    """Evaluate as ``plan`` says (see :func:`evaluate`)."""
    start = time.perf_counter()
    checked = preflight(plan)  # directory, the whole validation file: before the model
    source = checked.adapter
    output_dir = plan.run_dir
    print(f"[vera] {plan.describe_precision()}", flush=True)
    parts = build_components(plan, model_cfg=checked.model_cfg, tokenizer=checked.tokenizer,
                             datamodule=checked.datamodule)
    described = attach_adapter(parts, source, checked.model_cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_hydra_record(plan.record, output_dir, False, command_record_name(output_dir, "eval"), plan=plan_json(plan))
    loggers = instantiate_dict(plan.loggers)
    trainer: pl.Trainer = hydra.utils.instantiate(
        plan.trainer, callbacks=instantiate_dict(plan.callbacks), logger=loggers or False
    )
    results = trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)
    values = {k: float(v) for k, v in (results[0] if results else {}).items()}

    metric_name = plan.optimized_metric
    record: dict[str, Any] = {
        **values,
        "metric_name": metric_name,
        "metric": values.get(metric_name, float("nan")),
        "examples": len(parts.datamodule.splits["val"]),
        "adapter": str(source.path) if source else None,
        "adapter_kind": source.kind if source else None,
        "model": plan.model.get("name"),
        "data": plan.data.get("name"),
        "split": str(plan.data.get("val_file") or plan.data.get("hf_val_split")),
        "precision": plan.precision,
        "precision_replayed_from": plan.replay.plan_file,
        "device": plan.device.accelerator,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if plan.dpo is not None:  # objective=dpo: the settings and the reference the rewards are measured against
        record["dpo"] = plan.dpo
    scored = getattr(parts.module, "val_generation", None)
    if scored is not None and scored.examples:
        record.update(prompts=len(scored.examples), generate=scored.settings.as_dict())
        if trainer.world_size == 1:
            with replace_file(output_dir / "generations.jsonl", overwrite=True) as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in scored.generations)
    if trainer.is_global_zero:
        with replace_file(output_dir / "metrics.json", overwrite=True) as handle:
            handle.write(json.dumps(record, indent=2) + "\n")
        lines = ["", "VeRA evaluation", f"  evaluated         : {described}",
                 f"  model / data      : {plan.model.get('name')} / {plan.data.get('name')} ({record['examples']} "
                 f"examples, {record['split']})",
                 f"  precision         : {plan.dtype} ({plan.scheme}) on {plan.device.accelerator}"]
        lines += [f"  {name:<18}: {value:.6g}" for name, value in sorted(values.items())]
        lines += [f"  metrics.json      : {output_dir / 'metrics.json'}", ""]
        print("\n".join(lines), flush=True)
    return record
