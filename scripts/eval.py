"""Evaluate a saved adapter (or the base model): ``python scripts/eval.py adapter=PATH [group=option ...]``.

A thin ``@hydra.main`` wrapper around :func:`vera_lightning.app.commands.evaluate.evaluate` over the same
``conf/`` groups as training (config ``conf/eval.yaml``). It prints the validation metrics and
writes ``metrics.json`` into the run directory (``outputs/eval/<date>/<time>/``). Examples::

    python scripts/eval.py adapter=outputs/2026-11-23/10-00-00/adapter            # MiniLM, demo dev set
    python scripts/eval.py adapter=PATH data=sst2 data.data_dir=DIR                # only DIR/dev.tsv is read
    python scripts/eval.py experiment=smoke adapter=outputs/.../checkpoints/last.ckpt
    python scripts/eval.py model=opt125m                                           # no adapter: the baseline

Errors the user caused print their message only (``HYDRA_FULL_ERROR=1`` for the traceback).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vera_lightning.app import register_configs
from vera_lightning.app.commands.cli import user_errors
from vera_lightning.app.commands.evaluate import evaluate

register_configs()  # VeraConfig as the schema of the `vera` group, before Hydra composes


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> float:
    """Evaluate and return ``cfg.optimized_metric``."""
    return float(evaluate(cfg)["metric"])


if __name__ == "__main__":
    main()
