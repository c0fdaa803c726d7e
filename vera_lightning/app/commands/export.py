"""``export(cfg) -> ExportResult`` for a composed ``conf/export.yaml`` (``scripts/export.py``), and :func:`export_run`.

Turns a trained VeRA adapter into what serving runtimes read (``format=``):

* ``merged``: a Hugging Face model folder (``save_pretrained``: ``config.json``, ``model.safetensors``, the
  tokenizer with its chat template; tied embeddings stay tied), loadable with ``AutoModelForCausalLM`` (or
  the classification auto class) without vera-lightning. The base is always built in **float32** (whatever the
  training run's ``compute_dtype``: ``auto`` is not decided again here) and the update merged there; the weights are
  written in float32, or in bf16 with ``dtype=bf16`` (cast after the float32 merge; the rounding it costs is
  printed);
* ``lora``: the exact PEFT LoRA adapter (:func:`vera_lightning.export_lora`; ``rank=k``: the best rank-``k`` one
  and its relative error), for PEFT, vLLM (``--enable-lora``) and TGI/LoRAX;
* ``gguf-lora``: a llama.cpp LoRA adapter in GGUF (:func:`vera_lightning.export_gguf_lora`) for llama.cpp and
  Ollama's ``ADAPTER``, LLaMA-architecture bases only.

Check everything, then act. The line is: options → :class:`~vera_lightning.app.commands.export_plan.ExportPlan`
(every problem in one message, before any model is loaded or any byte written) → build the base and load the
adapter → write the output through :func:`vera_lightning.publish`: staged beside it, re-checked under its save lock
(another export may have written it meanwhile: refused, never replaced silently), renamed into place. Only the
plan's output is written; Hydra writes nothing (``conf/export.yaml``,
:class:`~vera_lightning.app.runs.run_dirs.RunDirCheck`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from vera_lightning import (
    dequantize_base,
    export_gguf_lora,
    export_lora,
    gguf_lora_problems,
    is_quantized,
    load_adapter,
    load_vera_checkpoint,
    publish,
    unload_vera,
)
from vera_lightning.app.commands.build import base_model_id
from vera_lightning.app.commands.export_output import check_before_publish
from vera_lightning.app.commands.export_plan import (
    DEFAULT_OUTPUTS,
    DTYPES,
    FIX_FORMAT,
    FORMATS,
    ExportPlan,
    check_format,
    export_problems,
    plan_export,
    unknown_keys,
)
from vera_lightning.app.models.load import build_model, build_tokenizer
from vera_lightning.app.runs.records import discard_job_log
from vera_lightning.app.tasks.module import build_module

__all__ = ["FORMATS", "DEFAULT_OUTPUTS", "ExportResult", "check_format", "export_problems", "plan_export", "export",
           "export_run", "run_export_plan"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        format: ``merged``, ``lora`` or ``gguf-lora``.
        output: The path written.
        rank: The LoRA rank written (``None`` for ``merged``).
        relative_error: Of ``ΔW`` at that rank (``0.0``: exact).
        seconds: Wall time of the whole export.
        bytes: Size of the output.
        dtype: The dtype of the weights or factors written (``float32``, or ``bfloat16`` with ``dtype=bf16``).
        rounding: With ``dtype=bf16``: the largest relative (Frobenius) error of a merged tensor against its float32
            value; ``None`` otherwise.
        rounding_tensor: The tensor with that error.
    """

    format: str
    output: Path
    rank: Optional[int]
    relative_error: float
    seconds: float
    bytes: int
    dtype: str = "float32"
    rounding: Optional[float] = None
    rounding_tensor: Optional[str] = None


def _all_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Cast every floating tensor of ``model`` to float32 (a ``from_pretrained`` may have kept a bf16 checkpoint's)."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        model.float()
    return model


def _load(plan: ExportPlan) -> tuple[torch.nn.Module, Any]:
    """The base, built as training built it but in float32, with the adapter loaded; ``(model, tokenizer)``."""
    model_cfg = {**plan.base.model, "compute_dtype": "fp32", "compile": False, "gradient_checkpointing": False}
    data = plan.base.data
    pl.seed_everything(plan.base.seed, workers=True, verbose=False)  # as training: a from_config base is redrawn
    tokenizer = build_tokenizer(model_cfg)
    model = build_model(model_cfg, tokenizer, num_labels=data.get("num_labels"), problem_type=data.get("problem_type"))
    if not is_quantized(model):
        _all_float32(model)
    try:
        if plan.adapter.kind == "adapter":
            load_adapter(model, plan.adapter.path)
        else:
            module = build_module(model_cfg["task"], model, {}, num_labels=data.get("num_labels"),
                                  metrics=data.get("metrics"), problem_type=data.get("problem_type"))
            load_vera_checkpoint(module, plan.checkpoint)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"adapter={str(plan.adapter.path)!r} does not fit the base from {plan.base.origin} "
                         f"({base_model_id(model_cfg)!r}):\n{str(err).strip()}\nPass the model= (and data=, seed=) "
                         "options it was trained with; nothing was written") from None
    return model.eval(), tokenizer


def _rounding(model: torch.nn.Module, dtype: torch.dtype) -> tuple[float, Optional[str]]:
    """The largest ``‖t_dtype - t‖_F / ‖t‖_F`` over ``model``'s floating tensors, and that tensor's name."""
    worst, name = 0.0, None
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            reference = tensor.double()
            norm = reference.norm().item()
            error = (tensor.to(dtype).double() - reference).norm().item() / norm if norm > 0 else 0.0
            if error > worst:
                worst, name = error, key
    return worst, name


def _write(plan: ExportPlan, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Write the plan's output (staged, checked under its lock, renamed into place); what was written."""
    check = functools.partial(check_before_publish, plan.format, plan.output, plan.overwrite)
    written: dict[str, Any] = {"dtype": "float32"}
    if plan.format == "gguf-lora":
        def fill(path: str) -> None:
            done = export_gguf_lora(model, path, rank=plan.rank)
            written.update(rank=done.rank, relative_error=done.relative_error)

        publish(plan.output, fill, file=True, check=check)
        return written
    if plan.format == "lora":
        def fill(path: str) -> None:
            done = export_lora(model, path, rank=plan.rank, base_model_name_or_path=base_model_id(plan.base.model))
            written.update(rank=done.rank, relative_error=done.relative_error)

        publish(plan.output, fill, check=check)
        return written
    if is_quantized(model):  # serve what was trained: the de-quantized base plus ΔW
        dequantize_base(model, torch.float32)
    merged = _all_float32(unload_vera(model, merge=True))  # ΔW added to float32 weights
    dtype = DTYPES[plan.dtype]
    if dtype != torch.float32:
        written["rounding"], written["rounding_tensor"] = _rounding(merged, dtype)
        merged = merged.to(dtype)
    written.update(rank=None, relative_error=0.0, dtype=_DTYPE_NAMES[dtype])

    def fill(path: str) -> None:
        merged.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)

    publish(plan.output, fill, check=check)
    return written


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_export_plan(plan: ExportPlan, say: Callable[[str], None] = print) -> ExportResult:
    """Carry out an accepted plan: load the base and the adapter, write the output; an :class:`ExportResult`.

    Raises:
        ValueError: If the adapter does not fit the base, or (``gguf-lora``, where the architecture could not be
            told before loading) the model cannot be written as a GGUF LoRA; nothing is written then.
        FileExistsError: If another process wrote the output meanwhile (see :func:`check_before_publish`).
    """
    start = time.perf_counter()
    for note in plan.notes:
        say(f"[export] {note}")
    model, tokenizer = _load(plan)
    if plan.format == "gguf-lora":
        problems = gguf_lora_problems(model)
        if problems:
            raise ValueError(f"format=gguf-lora cannot export adapter={str(plan.adapter.path)!r}: "
                             f"{'; '.join(problems)}. Use {FIX_FORMAT}; nothing was written")
    written = _write(plan, model, tokenizer)
    return ExportResult(plan.format, plan.output, written["rank"], written["relative_error"],
                        round(time.perf_counter() - start, 2), _size(plan.output), written["dtype"],
                        written.get("rounding"), written.get("rounding_tensor"))


def export_run(adapter: Any, fmt: Any, output: Optional[Any] = None, rank: Any = None, overwrite: Any = False,
               base: Optional[Mapping[str, Any]] = None, *, dtype: Any = "fp32", seed: Optional[int] = None,
               say: Callable[[str], None] = print) -> ExportResult:
    """Export ``adapter`` (a VeRA adapter directory, a ``.ckpt`` or a run directory) as ``fmt``: check, then write.

    Args:
        adapter: The adapter directory, slim ``.ckpt``, or training run directory (its ``adapter/``).
        fmt: ``"merged"``, ``"lora"`` or ``"gguf-lora"``.
        output: Target directory (``merged``, ``lora``) or ``.gguf`` file; ``None``: beside the adapter, in its run
            directory (:data:`DEFAULT_OUTPUTS`).
        rank: ``None``: exact; ``k``: the best rank-``k`` LoRA (``lora``, ``gguf-lora``).
        overwrite: ``True``: replace an earlier export of the same format there (nothing else is ever replaced).
        base: A mapping with ``model`` (and ``data``, ``seed``) configs of the base; ``None``: found from the
            training run or the adapter (:mod:`~vera_lightning.app.commands.export_base`). ``train.py`` passes its own.
        dtype: ``"fp32"`` (default) or ``"bf16"``: what ``merged`` writes (the merge is float32 either way).
        seed: The seed a ``from_config`` base is drawn with (``None``: the training run's).
        say: Where the one-line notes go.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ValueError: Listing every problem (option, value, fix) before anything is loaded or written.
        FileExistsError: If another process wrote the output while this one ran.
    """
    plan = plan_export(adapter, fmt, output, rank, overwrite, base, dtype=dtype, seed=seed)
    return run_export_plan(plan, say)


def export(cfg: DictConfig) -> ExportResult:
    """Run ``scripts/export.py``'s composed ``conf/export.yaml`` and print what was written.

    The only place the composed config is read: it becomes an :class:`ExportPlan` at once.
    """
    try:
        given = {"model": cfg.model, "data": cfg.get("data")} if cfg.get("model") else None
        plan = plan_export(cfg.adapter, cfg.format, cfg.get("output"), cfg.get("rank"), cfg.get("overwrite"),
                           base=given, dtype=cfg.get("dtype", "fp32"), seed=cfg.get("seed"), check_keys=True,
                           problems=unknown_keys(list(cfg.keys())))
        result = run_export_plan(plan)
    except BaseException:
        discard_job_log()  # a refused export leaves any job log as it was
        raise
    lines = ["", "VeRA export", f"  adapter           : {plan.adapter.path}",
             f"  base              : {plan.base.describe()}", f"  format            : {result.format}",
             f"  output            : {result.output} ({result.bytes / 2**20:.2f} MiB)",
             f"  dtype             : {result.dtype}" + (
                 f"  (cast after the float32 merge: largest relative error of a tensor {result.rounding:.3g}, "
                 f"{result.rounding_tensor})" if result.rounding is not None else "")]
    if result.rank is not None:
        lines.append(f"  LoRA rank         : {result.rank}" + (
            f"  (relative error of ΔW: {result.relative_error:.3g})" if plan.rank else "  (exact)"))
    lines += [f"  time              : {result.seconds:.1f} s", ""]
    print("\n".join(lines), flush=True)
    return result
