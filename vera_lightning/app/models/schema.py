"""The ``model`` group's schema: every key a ``conf/model/*.yaml`` may hold, typed, checked when Hydra composes.

:class:`ModelSchema` is stored as the ``model/schema`` node of Hydra's ``ConfigStore`` (:func:`register_schema`,
called by the app's ``register_configs``); each ``conf/model/*.yaml`` starts with ``defaults: [schema, ...,
_self_]``. So ``model.gradient_checkpointing=maybe`` or a misspelt key in a user's model file fails at compose time
with Hydra's message naming the key, before any entry point runs. Values whose meaning needs more than a type
(``compute_dtype``, ``compile``, ``quantize``, the model's source) are checked by the code that reads them
(:mod:`.precision`, :mod:`.load`), before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

__all__ = ["ModelSchema", "register_schema", "check_model_keys"]


@dataclass
class ModelSchema:
    """The keys of a ``model/`` config (see ``conf/model/*.yaml`` for what each means)."""

    name: str = "???"
    #: ``causal_lm``, ``classification`` or ``regression``
    task: str = "???"
    #: a hub id, a local folder, ``pkg://<package>/<folder>`` or ``gguf://<package>/<file>``; null with ``from_config``
    name_or_path: Optional[str] = None
    tokenizer: Optional[str] = None
    #: a transformers config (``model_type`` and its fields) to build a randomly initialised model from
    from_config: Any = None
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    #: a list of module names, or a string (``all-linear``, a regular expression)
    target_modules: Any = "???"
    modules_to_save: Optional[list[str]] = None
    #: null, ``nf4`` or ``int8``
    quantize: Optional[str] = None
    #: ``auto``, ``fp32`` or ``bf16``
    compute_dtype: str = "fp32"
    #: true, false or ``auto``
    compile: Any = False
    fan_in_fan_out: bool = False
    monitor: str = "val/loss"
    monitor_mode: str = "min"


def register_schema(store: Any) -> None:
    """Store :class:`ModelSchema` as the ``model/schema`` node of Hydra's ``ConfigStore``. Idempotent."""
    store.store(group="model", name="schema", node=ModelSchema)


def check_model_keys(model_cfg: Any) -> None:
    """Refuse keys of a composed ``model`` node that :class:`ModelSchema` does not know.

    Hydra lets ``+model.<key>=...`` past the schema; nothing would read such a key, so a misspelt option would be
    ignored without a word.

    Raises:
        ValueError: Naming every unknown key and the known ones.
    """
    known = [f.name for f in fields(ModelSchema)]
    unknown = sorted(str(key) for key in model_cfg.keys() if key not in known)
    if unknown:
        raise ValueError(f"model: unknown key(s) {', '.join('model.' + k for k in unknown)}; a model config holds "
                         f"{', '.join(known)} (see conf/model/*.yaml)")
