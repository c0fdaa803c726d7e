"""The export's typed options and its plan: every setting resolved once and checked before anything is loaded.

``conf/export.yaml`` is validated against :class:`ExportOptions` (``export_schema`` in Hydra's ``ConfigStore``,
:func:`register_export_schema`): an unknown key (``foo=1``) or a wrong type (``seed=abc``) fails when Hydra
composes; a key added with ``+`` gets past Hydra and is refused by :func:`unknown_keys` with the other problems.
``rank`` and ``overwrite`` are typed ``Any`` there on purpose and checked here, so that every problem comes in one
message and ``overwrite=no``/``off``/``'false'`` are refused, as ``train.py`` and ``predict.py`` refuse them (a
boolean field would turn them into ``false`` without a word; the old code's ``bool()`` of a string made them true).

:func:`plan_export` turns the options into one immutable :class:`ExportPlan`: the adapter (a run directory resolves
to its ``adapter/``, said in one line: :mod:`~vera_lightning.app.commands.export_adapter`), its rank and VeRA
options, the base model with its seed and where it came
from (:mod:`~vera_lightning.app.commands.export_base`), the format, the rank and dtype to write and the **one
output** it will write, with ``overwrite`` as a bool. Every problem is collected (the options, the adapter, the
base and its seed against the training run's, the architecture for ``gguf-lora``, the output against every input:
:mod:`~vera_lightning.app.commands.export_output`) and raised in one ``ValueError`` naming the option, the value
and the fix, before any model is loaded or any byte written.

:func:`export_problems` is the part ``train.py export=...``'s preflight needs (no adapter yet): the format, a
method that saves no VeRA adapter (``finetune=head|full``), and ``gguf-lora`` on an architecture or with options
a GGUF LoRA cannot carry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from vera_lightning import GGUF_ARCHITECTURES
from vera_lightning.app.commands.adapters import AdapterSource
from vera_lightning.app.commands.export_adapter import adapter_options, resolve_export_adapter
from vera_lightning.app.commands.export_base import ExportBase, base_architecture, base_inputs, find_base
from vera_lightning.app.commands.export_output import Inputs, output_problems
from vera_lightning.app.models.schema import check_model_keys
from vera_lightning.app.runs.run_dirs import RUN_RECORDS, previous_run

__all__ = ["FORMATS", "DEFAULT_OUTPUTS", "DTYPES", "ExportOptions", "ExportPlan", "register_export_schema",
           "check_format", "export_problems", "unknown_keys", "plan_export"]

#: ``format=`` values.
FORMATS = ("merged", "lora", "gguf-lora")
#: Where each format goes when ``output`` is not given: beside the adapter, in its run directory.
DEFAULT_OUTPUTS = {"merged": "merged", "lora": "lora", "gguf-lora": "adapter-lora.gguf"}
#: ``dtype=`` values (``format=merged``): what the merged weights are written in (the merge is float32).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIX_FORMAT = "format=lora (vLLM, TGI, PEFT) or format=merged (any Hugging Face runtime)"


@dataclass
class ExportOptions:
    """``conf/export.yaml``'s keys and types (the ``export_schema`` node; see the module docstring)."""

    adapter: str = MISSING
    format: str = MISSING
    output: Optional[str] = None
    rank: Any = None  # checked by plan_export: a positive int or null
    overwrite: Any = False  # checked by plan_export: true or false only
    dtype: str = "fp32"
    seed: Optional[int] = None
    model: Any = None
    data: Any = None
    paths: Any = None


def register_export_schema() -> None:
    """Store :class:`ExportOptions` as ``export_schema`` in Hydra's ``ConfigStore`` (``conf/export.yaml``'s first
    default). Idempotent."""
    ConfigStore.instance().store(name="export_schema", node=ExportOptions)


@dataclass(frozen=True)
class ExportPlan:
    """One export, resolved and checked (:func:`plan_export`); nothing below reads the options again.

    Attributes:
        adapter: The adapter directory or ``.ckpt``.
        r: The adapter's VeRA rank.
        format: ``merged``, ``lora`` or ``gguf-lora``.
        output: The one path the export writes.
        overwrite: Whether an earlier export of the same format there may be replaced.
        rank: The LoRA rank to write (``None``: exact, ``r``).
        dtype: ``fp32`` or ``bf16``: what ``merged`` writes (the merge itself is float32).
        base: The base model, its seed and where they came from.
        run_dir: The training run the adapter lies in, if any.
        notes: One-line notes to print (a run directory resolved to its adapter, ...).
        checkpoint: The loaded ``.ckpt`` (``None`` for an adapter directory).
    """

    adapter: AdapterSource
    r: int
    format: str
    output: Path
    overwrite: bool
    rank: Optional[int]
    dtype: str
    base: ExportBase
    run_dir: Optional[Path] = None
    notes: tuple[str, ...] = ()
    checkpoint: Any = field(default=None, repr=False, compare=False)


def check_format(value: Any, option: str = "format") -> str:
    """``value`` if it is a known export format.

    Raises:
        ValueError: Naming the value and the choices.
    """
    if value not in FORMATS:
        raise ValueError(f"{option}={value!r} is not an export format; use one of {list(FORMATS)}")
    return str(value)


def export_problems(fmt: Any, model_cfg: Mapping[str, Any], method: str = "vera", *,
                    modules_to_save: Optional[Sequence[str]] = None, bias: Any = "none",
                    option: str = "export") -> list[str]:
    """Why ``fmt`` cannot export a ``method`` run on the base ``model_cfg`` names (no model is loaded).

    Args:
        fmt: The format (``export=`` of ``train.py``, ``format=`` of ``export.py``).
        model_cfg: The ``model`` config of the base.
        method: ``finetune``: only ``vera`` saves a VeRA adapter.
        modules_to_save, bias: The VeRA options (a GGUF LoRA carries neither trained modules nor biases).
        option: The option's name in the messages.

    Returns:
        One message per problem (empty: the export can go ahead as far as can be told before training).
    """
    if fmt not in FORMATS:
        return [f"{option}={fmt!r} is not an export format; use one of {list(FORMATS)}"]
    problems = []
    if method != "vera":
        problems.append(f"{option}={fmt} with finetune={method}: export converts a VeRA adapter, and finetune={method} "
                        "saves trained weights instead (adapter/model.safetensors). Drop export= or use finetune=vera")
    if fmt == "gguf-lora":
        arch = base_architecture(model_cfg)
        if arch is not None and arch[0] not in GGUF_ARCHITECTURES:
            problems.append(f"{option}=gguf-lora: the base is a {arch[0]!r} model ({arch[1]}); GGUF LoRA export knows "
                            f"the llama.cpp tensor names of {sorted(GGUF_ARCHITECTURES)} models only (LLaMA, SmolLM2, "
                            f"TinyLlama). Use {FIX_FORMAT.replace('format=', option + '=')}")
        trained = list(modules_to_save or []) + list(model_cfg.get("modules_to_save") or [])
        if trained:
            problems.append(f"{option}=gguf-lora: the adapter also trains modules_to_save={sorted(set(trained))}, "
                            f"which a GGUF LoRA cannot carry. Use {FIX_FORMAT.replace('format=', option + '=')}")
        bias_value = str(getattr(bias, "value", bias) or "none")
        if bias_value != "none":
            problems.append(f"{option}=gguf-lora: the adapter also trains biases (bias={bias_value!r}), which a GGUF "
                            f"LoRA cannot carry. Use {FIX_FORMAT.replace('format=', option + '=')}")
    return problems


def _home(path: Path, kind: str) -> Path:
    """The folder an adapter's default output goes to: its run directory (``checkpoints/``'s parent for a ``.ckpt``)."""
    parent = path.parent
    return parent.parent if kind == "checkpoint" and parent.name == "checkpoints" else parent


def _option_problems(fmt: Any, rank: Any, overwrite: Any, dtype: Any, r: Optional[int]) -> list[str]:
    problems = []
    if fmt not in FORMATS:
        problems.append(f"format={fmt!r} is not an export format; use one of {list(FORMATS)}")
    if not isinstance(overwrite, bool):
        problems.append(f"overwrite={overwrite!r}: must be true or false (a boolean: 'no', 'off' or a quoted 'false' "
                        "are not read as false); write overwrite=false or overwrite=true")
    if dtype not in DTYPES:
        problems.append(f"dtype={dtype!r}: use fp32 (the default: the merged weights as merged) or bf16 (half the "
                        "size; the rounding it costs is printed)")
    elif dtype != "fp32" and fmt != "merged":
        problems.append(f"dtype={dtype}: applies to format=merged only (lora and gguf-lora write float32 factors); "
                        "drop dtype=")
    if rank is not None:
        if fmt == "merged":
            problems.append(f"rank={rank!r}: format=merged folds the exact update into the weights; rank applies to "
                            "format=lora|gguf-lora only (drop rank=)")
        elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.append(f"rank={rank!r} must be a positive integer or null (null: the exact export at rank r)")
        elif r and rank > r:
            problems.append(f"rank={rank} is above the adapter's r={r}: the exact export already has rank {r}; "
                            f"use rank=null, or 1 <= rank <= {r}")
    return problems


def _inputs(source: AdapterSource, run_dir: Optional[Path], base: Optional[ExportBase]) -> Inputs:
    what = "the adapter" if source.kind == "adapter" else "the checkpoint being exported"
    holders = [(source.path, what)]
    containers = [(Path.cwd(), "the current directory")]
    if source.kind == "checkpoint":
        containers.append((source.path.parent, "the checkpoint's folder"))
    if run_dir is not None:
        records = [n for n in (*RUN_RECORDS, "adapter") if os.path.lexists(run_dir / n)]
        holders += [(run_dir / n, f"the training run's {n}") for n in records]
        containers.append((run_dir, "the training run's directory (its adapter, checkpoints and record)"))
    if base is not None:
        holders += base_inputs(base.model)
    return Inputs(tuple(holders), tuple(containers))


def unknown_keys(keys: Sequence[str]) -> list[str]:
    """A problem for each top-level key :class:`ExportOptions` does not know (``+key=value`` gets past Hydra's
    schema check; nothing would read it)."""
    known = [f.name for f in fields(ExportOptions)]
    unknown = sorted(str(k) for k in keys if k not in known)
    return [f"unknown option(s) {', '.join(unknown)}: export.py takes {', '.join(known)} (conf/export.yaml); "
            "nothing reads the others, so a misspelt option would be ignored. Remove them"] if unknown else []


def plan_export(adapter: Any, fmt: Any, output: Optional[Any] = None, rank: Any = None, overwrite: Any = False,
                base: Optional[Mapping[str, Any]] = None, *, dtype: Any = "fp32", seed: Optional[int] = None,
                check_keys: bool = False, problems: Sequence[str] = ()) -> ExportPlan:
    """Resolve and check one export (module docstring); nothing is loaded but the adapter's config (or ``.ckpt``).

    Args:
        adapter: A VeRA adapter directory, a ``.ckpt``, or a training run directory (its ``adapter/``).
        fmt: ``merged``, ``lora`` or ``gguf-lora``.
        output: The output path; ``None`` or empty: beside the adapter (:data:`DEFAULT_OUTPUTS`).
        rank: ``None`` or a positive int (``lora``, ``gguf-lora``).
        overwrite: ``True`` or ``False`` (anything else is refused).
        base: ``{"model", "data", "seed"}`` of the base (``model=``, or ``train.py``'s); ``None``: found.
        dtype: ``fp32`` or ``bf16`` (``merged``).
        seed: ``seed=`` as given (``None``: the training run's).
        check_keys: Refuse ``model`` keys the model schema does not know (``+model.<key>`` on the command line).
        problems: Problems the caller found already (:func:`unknown_keys`), reported with the others.

    Raises:
        ValueError: Listing every problem, each naming the option, its value and the fix.
    """
    source, note, problem = resolve_export_adapter(adapter)
    problems = [*problems, *([problem] if problem else [])]
    r, options, checkpoint, run_dir = None, {}, None, None
    found: Optional[ExportBase] = None
    notes = [note] if note else []
    if source is not None:
        r, options, checkpoint, problem = adapter_options(source)
        problems += [problem] if problem else []
        home = _home(source.path, source.kind)
        run_dir = home if previous_run(home) or (home / ".hydra").is_dir() else None
    problems += _option_problems(fmt, rank, overwrite, dtype, r)
    if base and base.get("model") and check_keys:
        try:
            check_model_keys(base["model"])
        except ValueError as err:
            problems.append(str(err))
    if source is not None:
        found, base_problems, base_notes = find_base(source.kind, source.path, source.base, run_dir, base, seed)
        problems += base_problems
        notes += base_notes
    if found is not None and fmt == "gguf-lora":
        problems += export_problems(fmt, found.model, option="format", **options)
    target = None
    if source is not None and fmt in FORMATS:
        target = Path(str(output)).expanduser() if output not in (None, "") else \
            _home(source.path, source.kind) / DEFAULT_OUTPUTS[str(fmt)]
        problems += output_problems(str(fmt), target, overwrite is True, _inputs(source, run_dir, found))
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else "Cannot export:\n  - " + "\n  - ".join(problems))
    assert source is not None and found is not None and target is not None and r is not None
    return ExportPlan(adapter=source, r=r, format=str(fmt), output=target, overwrite=overwrite, rank=rank,
                      dtype=str(dtype), base=found, run_dir=run_dir, notes=tuple(notes), checkpoint=checkpoint)
