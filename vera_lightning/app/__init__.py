"""The Hydra app built on the library's public API (entry points: ``scripts/train.py``, ``eval.py``, ``predict.py``).

Sub-packages by concern, floors bottom to top (a module imports its own sub-package or lower ones):

* :mod:`~vera_lightning.app.data`        data formats and their tokenisation, DataModules
* :mod:`~vera_lightning.app.generation`  generation, its settings and metrics
* :mod:`~vera_lightning.app.models`      the model and tokenizer a ``model/`` config names
* :mod:`~vera_lightning.app.tasks`       the LightningModules and fine-tuning methods
* :mod:`~vera_lightning.app.runs`        run directories, records, trackers, sweep summaries
* :mod:`~vera_lightning.app.commands`    checks, building, and the train / evaluate / predict commands

The core library (``vera_lightning``) never imports this package.
"""

from vera_lightning.app.commands.build import vera_config_from
from vera_lightning.app.commands.configs import register_configs
from vera_lightning.app.commands.train import train

__all__ = ["register_configs", "train", "vera_config_from"]
