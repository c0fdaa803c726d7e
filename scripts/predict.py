"""Predict with a saved adapter: ``python scripts/predict.py adapter=PATH input=FILE [output=FILE]``.

A thin ``@hydra.main`` wrapper around :func:`vera_lightning.app.commands.predict.predict` over the same
``conf/`` groups as training (config ``conf/predict.yaml``). Classification writes a TSV
(``input``, ``label``, ``probability``); a causal LM generates a continuation per prompt line
and writes JSON lines (``prompt``, ``generation``). Examples::

    python scripts/predict.py adapter=outputs/2026-11-23/10-00-00/adapter input=reviews.txt output=labels.tsv
    python scripts/predict.py experiment=smoke adapter=PATH input=prompts.txt generate.max_new_tokens=64
    python scripts/predict.py model=opt125m adapter=PATH input=prompts.txt generate.do_sample=true seed=1
    python scripts/predict.py model=opt125m adapter=merged_model_dir/ input=prompts.txt   # a merged export

Errors the user caused print their message only (``HYDRA_FULL_ERROR=1`` for the traceback).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vera_lightning.app import register_configs
from vera_lightning.app.commands.cli import user_errors
from vera_lightning.app.commands.predict import predict

register_configs()  # VeraConfig as the schema of the `vera` group, before Hydra composes


@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    """Write the predictions and print where they are."""
    print(f"[vera] predictions written to {predict(cfg)}")


if __name__ == "__main__":
    main()
