"""Multirun summary: a Hydra callback that tabulates and plots the jobs of a sweep.

After ``python scripts/train.py -m vera.r=64,256,1024`` it reads every job's
``summary.json`` (written by :func:`vera_lightning.app.commands.train`) and writes into the sweep
directory:

* ``summary.csv`` and ``summary.md``: one row per job, the swept values, the metric
  before/after, trainable parameters, adapter size and wall time;
* ``summary.png``: the optimised metric against the (first) swept value, one line per
  combination of the other swept values.

Reading the files instead of the jobs' return values makes it work for every launcher
(basic, joblib, submitit) since it only runs in the process that launched the sweep.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepSummary", "collect", "objective_problem", "write_summary"]

log = logging.getLogger(__name__)

COLUMNS = ["before", "metric", "trainable_params", "adapter_bytes", "wall_time_s", "steps"]


def _parse(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def collect(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Read the jobs' ``summary.json`` files under ``sweep_dir``.

    Returns:
        ``(swept_keys, rows)``: the override keys whose value differs between jobs, and one
        dict per job (job number order) with those keys plus the metrics.
    """
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        record = json.loads(path.read_text(encoding="utf-8"))
        overrides = dict(o.split("=", 1) for o in record.get("overrides", []) if "=" in o)
        row = {"job": path.parent.name, **{k.lstrip("+~"): _parse(v) for k, v in overrides.items()}}
        row["metric_name"] = record.get("metric_name")
        row["before"] = record.get(f"before/{record.get('metric_name')}")
        row.update({k: record.get(k) for k in COLUMNS if k != "before"})
        rows.append(row)
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("job", "metric_name", *COLUMNS)]
    swept = [k for k in keys if len({str(row.get(k)) for row in rows}) > 1]
    return swept, rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def write_summary(sweep_dir: Path) -> Optional[dict[str, Path]]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``sweep_dir``.

    Returns:
        The written paths by kind, or ``None`` if no job left a ``summary.json``.
    """
    swept, rows = collect(sweep_dir)
    if not rows:
        return None
    metric = next((r["metric_name"] for r in rows if r.get("metric_name")), "metric")
    header = ["job", *swept, "metric_name", *COLUMNS]
    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "summary.png"}
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    names = {"before": f"{metric} before", "metric": f"{metric} after"}
    md_header = [names.get(h, h) for h in header if h != "metric_name"]
    lines = ["| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(h)) for h in header if h != "metric_name") + " |")
    paths["md"].write_text(f"# Sweep summary ({len(rows)} jobs)\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    _plot(rows, swept, metric, paths["png"])
    return paths


def _plot(rows: list[dict[str, Any]], swept: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = swept[0] if swept else "job"
    others = swept[1:]
    series: dict[str, list[tuple[Any, float]]] = {}
    for row in (r for r in rows if r.get("metric") is not None):  # None: a job that validated nothing
        label = ", ".join(f"{k}={row.get(k)}" for k in others) or metric
        series.setdefault(label, []).append((row.get(x_key), row.get("metric")))
    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(isinstance(x, (int, float)) for row in rows for x in [row.get(x_key)])
    for label, points in series.items():
        points.sort(key=lambda p: p[0] if numeric else str(p[0]))
        xs = [p[0] if numeric else str(p[0]) for p in points]
        ax.plot(xs, [p[1] for p in points], marker="o", label=label)
    if numeric and x_key.endswith(".r") and len({row.get(x_key) for row in rows}) > 2:
        ax.set_xscale("log", base=2)
    if numeric:
        ticks = sorted({row.get(x_key) for row in rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x_key}")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def objective_problem(config: DictConfig) -> Optional[str]:
    """Why the sweep ``config`` cannot run, or ``None``: a sweeper that optimises the value each job returns (any but
    Hydra's basic one) while ``trainer.limit_val_batches=0`` validates nothing (the jobs would return NaN)."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    limit = OmegaConf.select(config, "trainer.limit_val_batches", default=None)
    if not target or target.endswith("BasicSweeper") or isinstance(limit, bool) or limit not in (0, 0.0):
        return None
    name = OmegaConf.select(config, "hydra.runtime.choices", default={}).get("hydra/sweeper") or target
    metric = OmegaConf.select(config, "optimized_metric", default="metric", throw_on_resolution_failure=False)
    return (f"trainer.limit_val_batches={limit} validates nothing, but hydra/sweeper={name} optimises the {metric} "
            "each job returns (optimized_metric): let validation run (drop trainer.limit_val_batches=0) or sweep "
            "with the basic sweeper (leave hydra/sweeper out)")


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks``) writing the sweep summary at the end of a multirun; at its start it
    refuses a sweep whose objective no job can measure (:func:`objective_problem`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = objective_problem(config)
        if problem is not None:  # Hydra turns a callback's exception into a warning: say it and exit
            print(f"Error: {problem}. Nothing was written", file=sys.stderr, flush=True)
            raise SystemExit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        paths = write_summary(sweep_dir)
        if paths is None:
            log.warning("SweepSummary: no job in %s wrote a summary.json; nothing to summarise", sweep_dir)
            return
        print(f"[vera] sweep summary: {paths['md']}  {paths['csv']}  {paths['png']}")
        print(paths["md"].read_text(encoding="utf-8"))
