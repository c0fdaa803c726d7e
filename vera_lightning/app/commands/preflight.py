"""``preflight(plan)``: every check of a :class:`~vera_lightning.app.runs.plan.RunPlan` that needs no training.

Check everything, then act: an entry point builds its plan (:func:`~vera_lightning.app.commands.planning.make_plan`:
keys, values, device, precision, inputs and outputs) and calls :func:`preflight` before it builds a model or writes a
byte, and works from what it returns (:class:`Checked`). In order:

1. **Settings**: the model and data tasks, the ``generate`` settings
   (:class:`~vera_lightning.app.generation.generate.GenerateSettings`, sampling vs beams); for ``train`` the
   strategy, the ``vera`` config, ``finetune`` and ``ckpt_path`` (a resume: the ``data`` settings its run recorded,
   :func:`~vera_lightning.app.runs.resume_data.check_resume_data`).
2. **Where it writes**: ``train`` may use its run directory (:func:`~vera_lightning.app.runs.run_dirs.check_run_dir`);
   ``eval`` and ``predict`` never write into a training run's directory
   (:func:`~vera_lightning.app.runs.run_dirs.check_command_dir`); ``predict``'s output file: not a directory, not
   the input, not an existing file without ``overwrite=true``, a ``.jsonl`` for a causal LM.
3. **Inputs, in full**: ``adapter=`` resolved; the tokenizer built (cheap; the model is not); the data files the
   command reads parsed and validated row by row and tokenised (``datamodule.setup``: columns, roles and their
   order, the chat template applied, special-token text, truncation counted, a missing file), or ``predict``'s
   input file read and checked.

What needs the model (positions against ``generate.max_new_tokens``, an adapter that does not fit) is checked right
after the model is built, still before anything is written.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vera_lightning import VeraConfig
from vera_lightning.app.commands.adapters import (
    AdapterSource,
    model_config_for,
    resolve_adapter,
    start_adapter_check,
)
from vera_lightning.app.commands.build import check_task, make_datamodule, vera_config_from
from vera_lightning.app.commands.checks import check_train_strategy
from vera_lightning.app.commands.export_plan import DEFAULT_OUTPUTS
from vera_lightning.app.commands.planning import check_outputs
from vera_lightning.app.data import sft_rows
from vera_lightning.app.data.datamodules import TextDataModule
from vera_lightning.app.data.inputs import PromptInput, read_inputs, read_prompt_input
from vera_lightning.app.generation.generate import GenerateSettings
from vera_lightning.app.models.load import build_tokenizer
from vera_lightning.app.runs.plan import RunPlan
from vera_lightning.app.runs.resume_data import check_resume_data
from vera_lightning.app.runs.run_dirs import (
    check_command_dir,
    check_run_dir,
    is_training_run,
    previous_run,
    resolve_ckpt_path,
    slurm_checkpoint,
)
from vera_lightning.app.tasks.finetune import check_method

__all__ = ["COMMANDS", "Checked", "preflight", "prediction_output"]

#: The commands and the Lightning stage whose data each reads (``None``: its own input file).
COMMANDS = {"train": "fit", "eval": "validate", "predict": None}


@dataclass
class Checked:
    """What :func:`preflight` found, for the command to act on (nothing here is checked again)."""

    command: str
    task: str
    model_cfg: Any
    tokenizer: Any
    datamodule: TextDataModule
    generate: Optional[GenerateSettings] = None
    vera_config: Optional[VeraConfig] = None
    method: str = "vera"
    ckpt_path: Optional[str] = None
    resuming: bool = False
    adapter: Optional[AdapterSource] = None
    #: predict: the output file, and the examples (classification) or prompts (causal LM) of ``input``.
    output: Optional[Path] = None
    inputs: Any = None
    count: int = 0


def prediction_output(plan: RunPlan, input_path: Path) -> Path:
    """``predict``'s output file, checked (nothing is opened).

    Raises:
        ValueError: If it is a directory, the input file, or not a ``.jsonl`` for a causal LM (which writes JSON
            lines) or a ``.tsv``/``.txt`` for classification (tab-separated lines).
        FileExistsError: If it exists and ``overwrite`` is not true.
    """
    task = plan.task
    default = "predictions.tsv" if task == "classification" else "predictions.jsonl"
    given = plan.option("output")
    output = Path(str(given)).expanduser() if given else plan.run_dir / default
    if output.is_dir():
        raise ValueError(f"output={str(output)!r} is a directory; give a file path, "
                         f"e.g. output={str(output / default)!r}")
    if output.exists() and output.resolve() == input_path.resolve():
        raise ValueError(f"output={str(output)!r} is the input file; choose another output path")
    if task == "causal_lm" and output.suffix.lower() != ".jsonl":
        raise ValueError(f"output={str(output)!r}: a causal LM writes JSON lines (each input row plus its "
                         f"generation); name the file .jsonl, e.g. output={str(output.with_suffix('.jsonl'))!r}")
    if task == "classification" and output.suffix.lower() not in (".tsv", ".txt"):
        raise ValueError(f"output={str(output)!r}: classification writes tab-separated lines with a header "
                         f"row; name the file .tsv, e.g. output={str(output.with_suffix('.tsv'))!r}")
    problems = check_outputs([output], [Path(p) for p in plan.inputs if Path(p) != input_path], "output")
    for parent in (output.parent, *output.parent.parents):
        if is_training_run(parent):
            records = ", ".join(previous_run(parent))
            problems.append(f"output={str(output)!r} lies inside the training run {parent} ({records}); predict never "
                            "writes into a training run. Choose a path outside it")
            break
    if problems:
        raise ValueError(problems[0])
    if output.exists() and not plan.option("overwrite", False):
        raise FileExistsError(
            f"output={str(output)!r} already exists and is never replaced silently; choose another path or pass "
            "overwrite=true to replace that predictions file (the old file is replaced only once every prediction is "
            "written)"
        )
    existing = next(p for p in (output.parent, *output.parent.parents) if p.exists())  # made if missing
    if not os.access(existing, os.W_OK):
        raise PermissionError(errno.EACCES, f"output={str(output)!r}: the folder {str(existing)!r} cannot be "
                              "written (read-only or not yours); choose another output path")
    return output


def _predict_inputs(plan: RunPlan) -> tuple[Any, int]:
    given = str(plan.option("input"))
    input_path = Path(given).expanduser()
    if input_path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"input={given!r} is a folder; give a file (one example or prompt per "
                                "line, or a .csv/.tsv/.jsonl of rows)")
    if not input_path.is_file():
        raise FileNotFoundError(f"input={given!r}: no such file (one example or prompt per line)")
    data_cfg = plan.data
    if plan.task == "classification":
        inputs: Any = read_inputs(input_path, str(data_cfg.get("text_field") or "sentence"),
                                  data_cfg.get("text_pair_field"))
        count = len(inputs)
    else:
        inputs = read_prompt_input(input_path, data_cfg)
        count = len(inputs.echo)
    if not count:
        raise ValueError(f"input={given!r} holds no examples (empty lines are skipped)")
    return inputs, count


def _check_eval_dir(plan: RunPlan) -> None:
    """``eval``/``predict``'s run directory: not a training run, not inside one, not an input or inside one."""
    check_command_dir(plan.run_dir, plan.command)
    for parent in plan.run_dir.parents:
        if is_training_run(parent):
            raise FileExistsError(
                f"hydra.run.dir={str(plan.run_dir)!r} lies inside the training run {parent} "
                f"({', '.join(previous_run(parent))}); {plan.command}.py never writes into a training run, so nothing "
                f"was written. Leave hydra.run.dir unset (a new outputs/{plan.command}/<date>/<time>/) or give a "
                "directory of its own"
            )
    problems = check_outputs([plan.run_dir], [Path(p) for p in plan.inputs], "hydra.run.dir")
    if problems:
        raise ValueError(problems[0])


def preflight(plan: RunPlan) -> Checked:
    """Run every check of ``plan.command`` (``train``, ``eval`` or ``predict``) that needs no model (see the module).

    Returns:
        What the command acts on; nothing has been written and no model built.

    Raises:
        ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError: The first problem found, or
            every invalid setting at once, naming the option, the value and the fix.
    """
    command = plan.command
    if command not in COMMANDS:
        raise ValueError(f"preflight: command={command!r}: must be one of {list(COMMANDS)}")
    task = check_task(plan.model, plan.data)
    data_cfg = plan.data
    output_dir = plan.run_dir
    found: dict[str, Any] = {}
    if command == "train":
        check_train_strategy(plan.trainer)
        found["vera_config"] = vera_config_from(plan.vera)
        if plan.adapter is not None:  # adapter=: training starts from it, so it must fit the run's vera settings
            start_adapter_check(plan.adapter["path"], found["vera_config"])
        found["method"] = method = check_method(plan.method)
        found["ckpt_path"] = ckpt_path = resolve_ckpt_path(plan.option("ckpt_path"), output_dir)
        found["resuming"] = resuming = ckpt_path is not None or slurm_checkpoint(output_dir) is not None
        if resuming:  # the data the run recorded in .hydra/config.yaml: the same, or refused naming both values
            check_resume_data(output_dir, data_cfg, plan.option("ckpt_path") or "slurm-requeue")
        if rank_zero_only.rank == 0:  # trainer=ddp re-runs the script per rank: rank 0 checks, the others join
            export = plan.option("export")
            check_run_dir(output_dir, resuming=resuming, overwrite=bool(plan.option("overwrite", False)),
                          method=method, export_output=DEFAULT_OUTPUTS.get(str(export)) if export else None)
    else:
        _check_eval_dir(plan)
        found["adapter"] = resolve_adapter(plan.adapter["path"]) if plan.adapter else None
    if task == "causal_lm" and (data_cfg.get("format") == "sft" or command == "predict"):
        found["generate"] = GenerateSettings.from_config(dict(plan.generate or {}))
    if command == "predict":
        found["inputs"], found["count"] = _predict_inputs(plan)
        found["output"] = prediction_output(plan, Path(str(plan.option("input"))).expanduser())

    model_cfg = model_config_for(found.get("adapter"), plan.model) or plan.model
    tokenizer = build_tokenizer(model_cfg)
    datamodule = make_datamodule(data_cfg, tokenizer)  # checks the folder, the columns, the rows of sft files
    if COMMANDS[command] is not None:
        datamodule.setup(COMMANDS[command])  # every row of the splits read, validated and tokenised (cached)
    inputs = found.get("inputs")
    if isinstance(inputs, PromptInput) and inputs.rows is not None:
        sft_rows.check_special_text(inputs.rows, data_cfg, tokenizer, f"input={str(plan.option('input'))!r}")
    return Checked(command=command, task=task, model_cfg=model_cfg, tokenizer=tokenizer, datamodule=datamodule,
                   **found)
