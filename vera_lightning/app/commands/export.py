"""``export(cfg) -> ExportResult`` for a composed ``conf/export.yaml`` (``scripts/export.py``), and :func:`export_run`.

Turns a trained VeRA adapter into what serving runtimes read (``format=``):

* ``merged``: a Hugging Face model folder (``save_pretrained``: ``config.json``, ``model.safetensors``, the
  tokenizer with its chat template; tied embeddings stay tied), loadable with ``AutoModelForCausalLM`` (or
  the classification auto class) without vera-lightning;
* ``lora``: the exact PEFT LoRA adapter (:func:`vera_lightning.export_lora`; ``rank=k``: the best rank-``k`` one
  and its relative error), for PEFT, vLLM (``--enable-lora``) and TGI/LoRAX;
* ``gguf-lora``: a llama.cpp LoRA adapter in GGUF (:func:`vera_lightning.export_gguf_lora`) for llama.cpp and
  Ollama's ``ADAPTER``, LLaMA-architecture bases only.

``adapter=`` is an adapter directory or a ``.ckpt`` written by a training run. Its base model comes from, first
to last: ``model=`` (with ``data=`` and ``seed=``) on the command line; the training run's composed config
(``<run dir>/.hydra/config.yaml`` beside ``adapter/`` or ``checkpoints/``: its ``model``, ``data`` and ``seed``,
so a ``from_config`` base is drawn again exactly); the ``base_model_name_or_path`` an adapter directory records.

Check everything, then act: the format, the rank, the adapter, its base and the output are all checked, and
every problem is reported in one message naming the option, its value and the fix, before anything is
written. The output is written beside its target and renamed into place; an existing output is replaced
only with ``overwrite=true``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from vera_lightning import (
    ADAPTER_CONFIG_NAME,
    checkpoint_config,
    dequantize_base,
    export_gguf_lora,
    export_lora,
    gguf_lora_problems,
    is_quantized,
    load_adapter,
    load_vera_checkpoint,
    unload_vera,
)
from vera_lightning.app.commands.adapters import AdapterSource, resolve_adapter
from vera_lightning.app.commands.build import base_model_id
from vera_lightning.app.models.load import build_model, build_tokenizer
from vera_lightning.app.tasks.module import build_module

__all__ = ["FORMATS", "DEFAULT_OUTPUTS", "ExportResult", "check_format", "export", "export_run"]

#: ``format=`` values.
FORMATS = ("merged", "lora", "gguf-lora")
#: Where each format goes when ``output`` is not given: beside the adapter, in its run directory.
DEFAULT_OUTPUTS = {"merged": "merged", "lora": "lora", "gguf-lora": "adapter-lora.gguf"}
_FIX_FORMAT = "format=lora (vLLM, TGI, PEFT) or format=merged (any Hugging Face runtime)"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: format, path, LoRA rank (``None`` for ``merged``), relative error of ``ΔW``, seconds."""

    format: str
    output: Path
    rank: Optional[int]
    relative_error: float
    seconds: float
    bytes: int


@dataclass
class _Plan:
    source: AdapterSource
    rank_r: int
    checkpoint: Optional[dict]
    model_cfg: dict
    data_cfg: dict
    seed: int
    origin: str


def check_format(value: Any) -> str:
    """``value`` if it is a known ``format`` (for ``train.py export=...``'s preflight too).

    Raises:
        ValueError: Naming the value and the choices.
    """
    if value not in FORMATS:
        raise ValueError(f"format={value!r} is not an export format; use one of {list(FORMATS)}")
    return str(value)


def _run_dir(source: AdapterSource) -> Path:
    parent = source.path.parent
    return parent.parent if source.kind == "checkpoint" and parent.name == "checkpoints" else parent


def _container(node: Any) -> dict:
    if node is None:
        return {}
    try:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    except Exception:  # an interpolation of the training run (e.g. ${hydra:...}) that cannot resolve here
        return OmegaConf.to_container(node, resolve=False)


def _base_from_adapter_config(base: str) -> Optional[tuple[dict, dict]]:
    """A model config for an adapter whose ``base_model_name_or_path`` is a model folder (or a hub id)."""
    config_file = Path(base).expanduser() / "config.json"
    task, data = "causal_lm", {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        archs = config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            task, data = "classification", {"num_labels": len(config.get("id2label") or {}) or 2}
    model = {"name": Path(base).name or base, "task": task, "name_or_path": base, "tokenizer": None,
             "from_config": None}
    return model, data


def _find_base(source: AdapterSource, given: Optional[Mapping[str, Any]]) -> tuple[Optional[tuple], str]:
    """``((model, data, seed), origin)`` for the adapter's base, or ``(None, why not)``."""
    if given and given.get("model"):
        return (_container(given["model"]), _container(given.get("data")), int(given.get("seed") or 0)), "model="
    run_config = _run_dir(source) / ".hydra" / "config.yaml"
    if run_config.is_file():
        run = OmegaConf.load(run_config)
        if run.get("model") is not None:
            return ((_container(run.model), _container(run.get("data")), int(run.get("seed") or 0)),
                    f"its training run ({run_config})")
    if source.kind == "adapter" and source.base:
        found = _base_from_adapter_config(source.base)
        if found is not None:
            return (*found, 0), f"base_model_name_or_path={source.base!r}"
    what = "a checkpoint holds no base model and records none" if source.kind == "checkpoint" else \
        f"{ADAPTER_CONFIG_NAME} records no usable base_model_name_or_path"
    return None, (f"adapter={str(source.path)!r}: cannot tell its base model: {what}, and no training run config "
                  f"({run_config}) is beside it. Pass the model options it was trained with: model=NAME "
                  "(e.g. model=smollm2, or model=llama model.name_or_path=DIR) and, for a classifier, data=NAME; "
                  "a from_config model (model=tiny_opt) also needs the run's seed=N")


def _adapter_rank(source: AdapterSource) -> tuple[Optional[int], Optional[dict], Optional[str]]:
    """``(r, loaded checkpoint, problem)`` of a VeRA adapter directory or ``.ckpt``."""
    if source.kind == "checkpoint":
        try:
            checkpoint = torch.load(source.path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            return None, None, f"adapter={str(source.path)!r}: could not read the checkpoint ({type(err).__name__})"
        config = checkpoint_config(checkpoint) if isinstance(checkpoint, dict) else None
        if config is None:
            return None, None, (f"adapter={str(source.path)!r} is not a checkpoint written with VeraCallback (no VeRA "
                                "config marker); give a VeRA run's <run dir>/checkpoints/last.ckpt or its adapter/")
        return config.r, checkpoint, None
    try:
        saved = json.loads((source.path / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, None, f"adapter={str(source.path)!r}: {ADAPTER_CONFIG_NAME} cannot be read ({err})"
    kind = saved.get("peft_type") if isinstance(saved, dict) else None
    if kind != "VERA":
        return None, None, (f"adapter={str(source.path)!r} is a {kind or 'non-PEFT'} adapter, not VeRA (peft_type="
                            f"{kind!r} in {ADAPTER_CONFIG_NAME}); export converts VeRA adapters (a training run's "
                            "adapter/ or save_adapter's directory). A LoRA adapter serves as it is in vLLM/TGI; "
                            "llama.cpp's convert_lora_to_gguf.py converts it to GGUF")
    return int(saved.get("r") or 0), None, None


def _check_output(fmt: str, output: Path, overwrite: bool, adapter: Path) -> list[str]:
    problems = []
    if output.resolve() == adapter.resolve() or adapter.resolve() in output.resolve().parents:
        problems.append(f"output={str(output)!r} is (inside) the adapter itself; choose a path outside it")
    elif os.path.lexists(output) and not overwrite:
        problems.append(f"output={str(output)!r} already exists and is never replaced silently; choose another path "
                        "or pass overwrite=true")
    if fmt == "gguf-lora" and (output.suffix != ".gguf" or output.is_dir()):
        example = output / "adapter.gguf" if output.is_dir() else output.with_suffix(".gguf")
        problems.append(f"output={str(output)!r}: format=gguf-lora writes one file; give a path ending in .gguf, "
                        f"e.g. output={str(example)!r}")
    elif fmt != "gguf-lora" and output.is_file():
        problems.append(f"output={str(output)!r} is a file, but format={fmt} writes a directory; give a directory path")
    if not output.parent.is_dir() and not problems:
        problems.append(f"output={str(output)!r}: its parent directory {str(output.parent)!r} does not exist; "
                        "create it first")
    return problems


def _plan(adapter: Any, fmt: Any, output: Optional[Any], rank: Any, overwrite: bool,
          base: Optional[Mapping[str, Any]]) -> tuple[_Plan, str, Path]:
    """Every check that needs no model; one ``ValueError`` listing all problems."""
    source = resolve_adapter(adapter)  # FileNotFoundError / ValueError naming adapter=
    problems = []
    if fmt not in FORMATS:
        problems.append(f"format={fmt!r} is not an export format; use one of {list(FORMATS)}")
    if source.kind == "merged":
        problems.append(f"adapter={str(source.path)!r} is a model directory (config.json), not a VeRA adapter: it is "
                        "already a plain model that any runtime loads; export needs an adapter directory or a .ckpt")
        raise ValueError("\n".join(problems))
    r, checkpoint, problem = _adapter_rank(source)
    problems += [problem] if problem else []
    if rank is not None:
        if fmt == "merged":
            problems.append(f"rank={rank!r}: format=merged folds the exact update into the weights; rank applies to "
                            "format=lora|gguf-lora only (drop rank=)")
        elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.append(f"rank={rank!r} must be a positive integer or null (null: the exact export at rank r)")
        elif r and rank > r:
            problems.append(f"rank={rank} is above the adapter's r={r}: the exact export already has rank {r}; "
                            f"use rank=null, or 1 <= rank <= {r}")
    found, origin = _find_base(source, base)
    if found is None:
        problems.append(origin)
    target = Path(str(output)).expanduser() if output else _run_dir(source) / DEFAULT_OUTPUTS.get(str(fmt), "export")
    if fmt in FORMATS:
        problems += _check_output(str(fmt), target, overwrite, source.path)
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else
                         "Cannot export:\n  - " + "\n  - ".join(problems))
    model_cfg, data_cfg, seed = found
    return _Plan(source, r, checkpoint, model_cfg, data_cfg, seed, origin), str(fmt), target


def _load(plan: _Plan) -> tuple[torch.nn.Module, Any]:
    """The base, built as training built it, with the adapter loaded; ``(model, tokenizer)``."""
    model_cfg, data = plan.model_cfg, plan.data_cfg
    pl.seed_everything(plan.seed, workers=True, verbose=False)  # as build_components: a from_config base is redrawn
    tokenizer = build_tokenizer(model_cfg)
    model = build_model(model_cfg, tokenizer, num_labels=data.get("num_labels"), problem_type=data.get("problem_type"))
    try:
        if plan.source.kind == "adapter":
            load_adapter(model, plan.source.path)
        else:
            module = build_module(model_cfg["task"], model, {}, num_labels=data.get("num_labels"),
                                  metrics=data.get("metrics"), problem_type=data.get("problem_type"))
            load_vera_checkpoint(module, plan.checkpoint)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"adapter={str(plan.source.path)!r} does not fit the base from {plan.origin} "
                         f"({base_model_id(model_cfg)!r}):\n{str(err).strip()}\nPass the model= (and data=, seed=) "
                         "options it was trained with") from None
    return model.eval(), tokenizer


def _publish(staging: Path, target: Path) -> None:
    """Rename the complete ``staging`` into ``target``; a previous ``target`` is moved aside first, then deleted."""
    old = None
    if os.path.lexists(target):
        old = target.parent / f".{target.name}.export-old-{os.getpid()}"
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _write(fmt: str, model: torch.nn.Module, tokenizer: Any, target: Path, rank: Optional[int],
           base_id: str) -> tuple[Optional[int], float]:
    if fmt == "gguf-lora":
        done = export_gguf_lora(model, target, rank=rank)
        return done.rank, done.relative_error
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        if fmt == "lora":
            done = export_lora(model, staging / "adapter", rank=rank, base_model_name_or_path=base_id)
            written = (done.rank, done.relative_error)
            _publish(staging / "adapter", target)
        else:
            if is_quantized(model):  # serve what was trained: the de-quantized base plus ΔW
                dequantize_base(model)
            merged = unload_vera(model, merge=True)
            merged.save_pretrained(staging / "model", safe_serialization=True)
            tokenizer.save_pretrained(staging / "model")
            written = (None, 0.0)
            _publish(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_run(adapter: Any, fmt: Any, output: Optional[Any] = None, rank: Optional[int] = None,
               overwrite: bool = False, base: Optional[Mapping[str, Any]] = None) -> ExportResult:
    """Export ``adapter`` (a VeRA adapter directory or ``.ckpt``) as ``fmt``: check everything, then write.

    Args:
        adapter: The adapter directory or slim ``.ckpt``.
        fmt: ``"merged"``, ``"lora"`` or ``"gguf-lora"``.
        output: Target directory (``merged``, ``lora``) or ``.gguf`` file; ``None``: beside the adapter, in its run
            directory (:data:`DEFAULT_OUTPUTS`).
        rank: ``None``: exact; ``k``: the best rank-``k`` LoRA (``lora``, ``gguf-lora``).
        overwrite: Replace an existing output.
        base: A mapping with ``model`` (and ``data``, ``seed``) configs of the base; ``None``: found from the
            training run or the adapter (module docstring). ``train.py`` passes its own config.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ValueError: Listing every problem (option, value, fix) before anything is written.
        FileNotFoundError: If ``adapter`` does not exist.
    """
    start = time.perf_counter()
    plan, fmt, target = _plan(adapter, fmt, output, rank, overwrite, base)
    model, tokenizer = _load(plan)
    if fmt == "gguf-lora":
        problems = gguf_lora_problems(model)
        if problems:
            raise ValueError(f"format=gguf-lora cannot export adapter={str(plan.source.path)!r}: "
                             f"{'; '.join(problems)}. Use {_FIX_FORMAT}")
    written, error = _write(fmt, model, tokenizer, target, rank, base_model_id(plan.model_cfg))
    return ExportResult(fmt, target, written, error, round(time.perf_counter() - start, 2), _size(target))


def export(cfg: DictConfig) -> ExportResult:
    """Run ``scripts/export.py``'s composed ``conf/export.yaml`` and print what was written."""
    given = {"model": cfg.model, "data": cfg.get("data"), "seed": cfg.get("seed")} if cfg.get("model") else None
    result = export_run(cfg.adapter, cfg.format, cfg.get("output"), cfg.get("rank"), bool(cfg.get("overwrite")),
                        base=given)
    lines = ["", "VeRA export", f"  adapter           : {cfg.adapter}", f"  format            : {result.format}",
             f"  output            : {result.output} ({result.bytes / 2**20:.2f} MiB)"]
    if result.rank is not None:
        lines.append(f"  LoRA rank         : {result.rank}" + (
            f"  (relative error of ΔW: {result.relative_error:.3g})" if cfg.get("rank") else "  (exact)"))
    lines += [f"  time              : {result.seconds:.1f} s", ""]
    print("\n".join(lines), flush=True)
    return result
