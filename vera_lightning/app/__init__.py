"""The Hydra training app built on the library's public API (``scripts/train.py`` is its entry point).

* :mod:`~vera_lightning.app.train`   ``train(cfg) -> metrics`` and the ``vera`` schema registration
* :mod:`~vera_lightning.app.models`  the Hugging Face model and tokenizer a ``model/`` config names
* :mod:`~vera_lightning.app.data`    DataModules for tables, text and Hugging Face datasets
* :mod:`~vera_lightning.app.module`  the task LightningModules (classification, causal LM)
* :mod:`~vera_lightning.app.sweep`   the multirun summary callback

The core library (``vera_lightning``) never imports this package.
"""

from vera_lightning.app.train import register_configs, train, vera_config_from

__all__ = ["register_configs", "train", "vera_config_from"]
