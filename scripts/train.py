"""Fine-tune a model with VeRA: ``python scripts/train.py [group=option ...] [key=value ...]``.

A thin ``@hydra.main`` wrapper around :func:`vera_lightning.app.commands.train`; it returns the
optimised metric so Hydra sweepers (e.g. Optuna) can use it. Examples::

    python scripts/train.py                                  # offline default: MiniLM on the demo sentiment set
    python scripts/train.py experiment=smoke                 # seconds: tiny random OPT, 2 steps
    python scripts/train.py model=opt125m vera.r=512         # needs the Hub (or a cached model)
    python scripts/train.py data=sst2 data.data_dir=../shared/data/sst2
    python scripts/train.py -m vera.r=64,256,1024            # sweep; summary table + plot in the sweep dir
    python scripts/train.py ckpt_path=last hydra.run.dir=outputs/<date>/<time>   # resume an interrupted run

Errors the user caused print their message only (``HYDRA_FULL_ERROR=1`` for the traceback).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vera_lightning.app import register_configs, train
from vera_lightning.app.commands.cli import user_errors

register_configs()  # VeraConfig as the schema of the `vera` group, before Hydra composes


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> float:
    """Run one training job and return ``cfg.optimized_metric`` (NaN to a sweeper when no validation ran)."""
    metric = train(cfg)["metric"]
    return float("nan") if metric is None else float(metric)


if __name__ == "__main__":
    main()
