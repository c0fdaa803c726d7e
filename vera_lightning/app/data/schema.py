"""The ``data`` group's schema: every key a ``conf/data/*.yaml`` may hold, typed, checked when Hydra composes.

:class:`DataSchema` is stored as the ``data/schema`` node of Hydra's ``ConfigStore`` (:func:`register_schema`, called
by the app's ``register_configs``); the data configs that start a family (``demo_sentiment``, ``demo_text``,
``table``, ``sst2``, ``sft``) list ``schema`` first in their defaults, and the others inherit it through them. So a
misspelt key in a user's data file or ``data.max_length=abc`` fails at compose time with Hydra's message, and a key
added with ``+data.<key>=...`` (which Hydra lets past a schema) is refused by the plan before any work
(``app/commands/options.py``).

``monitor`` / ``monitor_mode`` default to ``???`` (not set): the objective then falls back to the model's
(``conf/objective/default.yaml`` selects ``data.monitor`` only where a data config sets it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

__all__ = ["DataSchema", "UNSET_FALLBACKS", "register_schema", "check_data_values",
           "data_settings"]

#: Keys whose ``???`` means "not set: use the fallback" rather than "required".
UNSET_FALLBACKS = ("monitor", "monitor_mode")


@dataclass
class DataSchema:
    """The keys of a ``data/`` config (the files in ``conf/data/`` say what each means)."""

    name: str = "???"
    #: ``classification`` or ``causal_lm``
    task: str = "???"
    #: ``table`` (.tsv/.csv), ``text`` (.txt), ``sft`` (prompt/response or chat rows), ``hf`` (``datasets``)
    format: str = "???"
    #: ``???`` here so that a data config's ``data_dir: ???`` stays required (a ``???`` never overrides a value in a
    #: merge); every data config that starts a family sets it (null: the built-in demo data)
    data_dir: Optional[str] = "???"
    train_file: Optional[str] = None
    val_file: Optional[str] = None
    text_field: Optional[str] = None
    text_pair_field: Optional[str] = None
    label_field: Optional[str] = None
    num_labels: Optional[int] = None
    problem_type: Optional[str] = None
    #: ``{name: {_target_: torchmetrics class, ...}}``; null: the task's defaults
    metrics: Any = None
    max_length: int = 128
    batch_size: int = 8
    eval_batch_size: int = 16
    max_train_samples: Optional[int] = None
    max_val_samples: Optional[int] = None
    num_workers: int = 0
    seed: int = 42
    monitor: str = "???"
    monitor_mode: str = "???"
    # Hugging Face datasets (format: hf)
    hf_name: Optional[str] = None
    hf_subset: Optional[str] = None
    hf_train_split: Optional[str] = None
    hf_val_split: Optional[str] = None
    # prompt/response data (format: sft)
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    messages_field: Optional[str] = None
    prompt_template: Optional[str] = None
    chat_template: bool = False
    system_prompt: Optional[str] = None
    train_on_prompt: bool = False
    truncation: str = "left"
    group_by_length: bool = False
    packing: bool = False
    #: a batch is padded to a multiple of this many tokens (1: to its longest row). Fewer distinct shapes keep
    #: oneDNN's per-shape kernels and the allocator's free lists from growing with steps (docs/data.md)
    pad_to_multiple_of: int = 8
    # the tokenised-data cache (:mod:`vera_lightning.app.data.cache`)
    #: ``on`` (reuse, else build), ``refresh`` (build this run's entries again), ``off`` (a temporary folder)
    cache: str = "on"
    #: null: ``$VERA_DATA_CACHE``, else ``~/.cache/vera_lightning/data``
    cache_dir: Optional[str] = None
    #: true: the training file is tokenised as training reads it (:mod:`vera_lightning.app.data.streaming`)
    streaming: bool = False
    # preference pairs (format: preference, :mod:`vera_lightning.app.data.preference`)
    #: ``pairs`` (prompt_field + chosen_field + rejected_field, strings or chat turns) or ``hh``
    #: (chosen/rejected as whole ``\n\nHuman: ... \n\nAssistant: ...`` transcripts with an implicit prompt)
    preference_format: Optional[str] = None
    chosen_field: Optional[str] = None
    rejected_field: Optional[str] = None
    #: ``pairs`` (DPO) or ``chosen``: SFT on the chosen responses only (the step before DPO from an SFT adapter)
    preference_target: Optional[str] = None
    #: false: a bad row stops the run naming file, row and fix; true: bad rows are dropped, counted in one warning
    skip_invalid_rows: bool = False


def register_schema(store: Any) -> None:
    """Store :class:`DataSchema` as the ``data/schema`` node of Hydra's ``ConfigStore``. Idempotent."""
    store.store(group="data", name="schema", node=DataSchema)


def check_data_values(data: dict[str, Any], trainer: Optional[dict[str, Any]] = None) -> list[str]:
    """Problems with settings that are required only in some formats (``hf_name`` with ``format: hf``), with
    ``data.cache``, and, given the ``trainer`` settings of a training run, ``data.streaming`` without ``max_steps``."""
    if trainer is not None and data.get("streaming") and (trainer.get("max_steps") in (None, -1)):
        return ["data.streaming=true: the number of rows is not known before training, so set trainer.max_steps "
                "(e.g. trainer.max_steps=1000)"]
    multiple = data.get("pad_to_multiple_of", 1)
    if not isinstance(multiple, int) or isinstance(multiple, bool) or not 1 <= multiple <= 512:
        return [f"data.pad_to_multiple_of={multiple!r}: must be a whole number from 1 (pad each batch to its longest "
                "row) to 512, e.g. data.pad_to_multiple_of=8"]
    if data.get("cache", "on") not in (None, "on", "off", "refresh"):
        return [f"data.cache={data.get('cache')!r}: must be on (reuse the tokenised data), refresh (tokenise again) "
                "or off (keep nothing)"]
    if data.get("format") == "hf" and not data.get("hf_name"):
        return ["data.hf_name is required with data.format=hf (a Hugging Face dataset name or a saved dataset's "
                "folder): add data.hf_name=... to the command line, e.g. data=hf data.hf_name=glue data.hf_subset=sst2"]
    return []


def data_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The data settings as the data layer reads them: every schema key present, ``???`` fallbacks as ``None``."""
    out = {f.name: values.get(f.name, None) for f in fields(DataSchema)}
    for key in UNSET_FALLBACKS:
        if out.get(key) == "???":
            out[key] = None
    return out
