"""The schemas Hydra checks when it composes a config: :func:`register_configs`, called by every entry point."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from vera_lightning import VeraConfig
from vera_lightning.app.commands.export_plan import register_export_schema
from vera_lightning.app.data.schema import register_schema as register_data_schema
from vera_lightning.app.generation.generate import register_schema
from vera_lightning.app.models.schema import register_schema as register_model_schema

__all__ = ["register_configs"]


def register_configs() -> None:
    """Register the schemas of the typed groups: :class:`VeraConfig` (``vera/schema``), the generation settings
    (``generate/schema``, :func:`~vera_lightning.app.generation.generate.register_schema`) and the model's keys
    (``model/schema``, :class:`~vera_lightning.app.models.schema.ModelSchema`), the data settings (``data/schema``,
    :class:`~vera_lightning.app.data.schema.DataSchema`) and ``export.py``'s options (``export_schema``).

    ``conf/vera/*.yaml``, ``conf/generate/*.yaml`` and ``conf/model/*.yaml`` start with ``defaults: [schema, ...,
    _self_]``, so Hydra validates every key and type against the dataclass when the config is composed. Idempotent.
    """
    store = ConfigStore.instance()
    store.store(group="vera", name="schema", node=VeraConfig)
    register_schema(store)
    register_model_schema(store)
    register_data_schema(store)
    register_export_schema()
