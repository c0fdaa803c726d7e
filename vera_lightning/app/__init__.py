"""The Hydra app built on the library's public API (entry points: ``scripts/train.py``, ``eval.py``, ``predict.py``).

* :mod:`~vera_lightning.app.train`     ``train(cfg) -> metrics``
* :mod:`~vera_lightning.app.evaluate`  ``evaluate(cfg) -> metrics`` (a saved adapter, or the base model)
* :mod:`~vera_lightning.app.predict`   ``predict(cfg) -> output file`` (labels, or generated text)
* :mod:`~vera_lightning.app.build`     one place that builds tokenizer, model, data and module from a config
* :mod:`~vera_lightning.app.adapters`  what ``adapter=PATH`` names (adapter dir, slim .ckpt, merged model)
* :mod:`~vera_lightning.app.models`    the Hugging Face model and tokenizer a ``model/`` config names
* :mod:`~vera_lightning.app.data`      DataModules for tables, text and Hugging Face datasets
* :mod:`~vera_lightning.app.module`    the task LightningModules (classification, causal LM)
* :mod:`~vera_lightning.app.run_dirs`    ``ckpt_path=last``, SLURM requeue, RNG state in checkpoints
* :mod:`~vera_lightning.app.trackers`  config and adapter artifacts for MLflow / W&B
* :mod:`~vera_lightning.app.cli`       the error boundary of the entry points
* :mod:`~vera_lightning.app.sweep`     the multirun summary callback

The core library (``vera_lightning``) never imports this package.
"""

from vera_lightning.app.build import register_configs, vera_config_from
from vera_lightning.app.train import train

__all__ = ["register_configs", "train", "vera_config_from"]
