"""``predict(cfg) -> output file`` for a composed ``conf/predict.yaml`` (``scripts/predict.py``).

* Classification: every input sentence gets the predicted class id and its softmax
  probability, written as a TSV (``input``, ``label``, ``probability``).
* Sentence pairs (``data.text_pair_field`` set, e.g. ``data=mrpc|rte|stsb``): the input must be a
  ``.tsv``/``.csv`` holding both columns; each pair is tokenised as in training
  (``[CLS] a [SEP] b [SEP]``, ``longest_first`` truncation) and the TSV gets ``input_pair`` too.
* Regression (``data.problem_type=regression``, e.g. ``data=stsb``): the TSV holds the predicted
  value (``prediction``) instead of a label and probability.
* Causal LM: every prompt gets a continuation from batched generation
  (:mod:`~vera_lightning.app.generation.generate`, decoding settings in the ``generate`` group: greedy by
  default, beams, sampling with one seeded generator per prompt, ``stop_at_newline``), written as one
  JSON object per input row, in input order (``generation`` added to the row). The input is

  - a ``.csv``/``.tsv``/``.jsonl`` file: with prompt/response data (``data.format=sft``, e.g.
    ``data=e2e``) the rows hold the data group's prompt column(s) (``prompt_field``, the columns
    ``prompt_template`` names, or ``messages_field``), formatted exactly as in training
    (:func:`~vera_lightning.app.data.sft.format_prompt`: template, chat template, system prompt), and each
    output line is the input row plus ``generation``; with plain text data the ``data.text_field``
    column is the prompt (output: the row plus ``generation``);
  - any other file: one prompt per line (blank lines skipped). With prompt/response data each line
    fills ``data.prompt_field`` (or is the user turn of a ``messages_field`` conversation) and is
    formatted as a table row would be; with plain text data the line is the prompt as is. Output:
    ``prompt`` (the line) and ``generation``.

  ``adapter=null`` generates with the base model (zero-shot), with the same prompt formatting.

Check everything, then act: :func:`~vera_lightning.app.commands.preflight.preflight` reads and checks the whole
input (:mod:`~vera_lightning.app.data.inputs`) and the output path, then every prompt is formatted, tokenised and
checked against the model's positions, all before the output is opened. Rows stream, in input order, to a
temporary file beside the output that is renamed into place once every row is written
(:func:`vera_lightning.replace_file`): ``overwrite=true`` replaces the old file only then, and a refused, failed or
interrupted run leaves no new file and the old one as it was. Each generated row says whether generation
ended on its own (``"finished": true``) or was cut at ``generate.max_new_tokens`` (``false``). Ctrl-C keeps the
rows finished so far in ``<output>.partial`` (in input order; generated rows with their 0-based input ``index``,
as a longest-first batch can finish later rows first) and says so. The model comes from
:func:`~vera_lightning.app.commands.build.build_components` plus ``adapter=`` (see
:mod:`~vera_lightning.app.commands.adapters`).
"""

from __future__ import annotations

import csv
import io
import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from vera_lightning import replace_file
from vera_lightning.app.commands.adapters import attach_adapter
from vera_lightning.app.commands.build import build_components
from vera_lightning.app.commands.planning import make_plan
from vera_lightning.app.commands.preflight import Checked, preflight
from vera_lightning.app.data import sft
from vera_lightning.app.data.inputs import Example, PromptInput
from vera_lightning.app.data.tables import is_regression
from vera_lightning.app.generation.generate import Generated, GenerateSettings, generate_results
from vera_lightning.app.models.precision import use_base_precision
from vera_lightning.app.runs.plan import RunPlan, plan_json
from vera_lightning.app.runs.records import command_record_name, discard_job_log, write_hydra_record

__all__ = ["predict", "run_prediction", "partial_path"]


def partial_path(output: Path) -> Path:
    """Where an interrupted run keeps its finished rows: ``<output>.partial`` (``.partial.<n>`` if taken)."""
    path, n = output.with_name(output.name + ".partial"), 1
    while path.exists():
        path, n = output.with_name(f"{output.name}.partial.{n}"), n + 1
    return path


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _tsv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", lineterminator="\n").writerow(values)
    return buffer.getvalue()


@torch.inference_mode()
def _classify(model: nn.Module, tokenizer: Any, examples: list[Example], plan: RunPlan,
              device: torch.device) -> Iterator[str]:
    """The TSV's lines: the header, then one line per example, in input order."""
    pairs = bool(examples) and isinstance(examples[0], tuple)
    regression = is_regression(plan.data)
    yield _tsv_line(["input"] + (["input_pair"] if pairs else []) + (["prediction"] if regression else
                                                                     ["label", "probability"]))
    max_length = int(plan.data.get("max_length") or 128)
    for chunk in _batches(examples, max(1, int(plan.option("batch_size", 32)))):
        texts = [e[0] for e in chunk] if pairs else chunk
        second = [e[1] for e in chunk] if pairs else None
        batch = tokenizer(texts, second, padding=True, truncation="longest_first", max_length=max_length,
                          return_tensors="pt").to(device)  # as in training (data.py)
        logits = model(**batch).logits.float()
        if regression:
            columns = [[f"{value:.6f}"] for value in logits[:, 0].tolist()]
        else:
            best, labels = logits.softmax(dim=-1).max(dim=-1)
            columns = [[label, f"{p:.6f}"] for label, p in zip(labels.tolist(), best.tolist())]
        for example, values in zip(chunk, columns):
            yield _tsv_line((list(example) if pairs else [example]) + values)


def _row(echo: dict[str, Any], result: Generated) -> dict[str, Any]:
    return {**echo, "generation": result.text, "finished": result.finished}


def _write_partial(output: Path, lines: list[str], early: dict[int, str], total: int) -> None:
    """Keep what an interrupted run finished in :func:`partial_path` and say so on stderr."""
    if not lines and not early:
        print(f"[vera] interrupted: no row was finished; {output} was not written", flush=True)
        return
    target = partial_path(output)
    with replace_file(target) as handle:
        handle.writelines(lines)
        handle.writelines(early[i] for i in sorted(early))
    done = len(lines) + len(early)
    print(f"[vera] interrupted: {output} was not written (an existing one is unchanged); the {done} of {total} rows "
          f"finished so far are in {target}, in input order", flush=True)


def _generate(model: nn.Module, tokenizer: Any, source: PromptInput, plan: RunPlan, settings: GenerateSettings,
              output: Path, overwrite: bool, accept: Callable[[], None]) -> None:
    data_cfg = plan.data
    if source.rows is not None:  # prompt/response data: the prompt exactly as training formats it
        prompts = [sft.format_prompt(data_cfg, tokenizer, row) for row in source.rows]
        encode = partial(sft.prompt_token_ids, data_cfg, tokenizer)
    else:
        prompts, encode = source.prompts, None
    early: dict[int, Generated] = {}
    results = generate_results(model, tokenizer, prompts, settings, encode=encode,  # every prompt checked here
                               progress=bool(plan.option("progress", True)) and settings.progress, desc="predict",
                               finished_early=early)
    accept()
    lines: list[str] = []
    try:
        with replace_file(output, overwrite=overwrite) as handle:  # opened only once every prompt passed
            for echo, result in zip(source.echo, results):
                lines.append(json.dumps(_row(echo, result), ensure_ascii=False) + "\n")
                handle.write(lines[-1])
                handle.flush()
    except KeyboardInterrupt:
        indexed = [json.dumps({**json.loads(line), "index": i}, ensure_ascii=False) + "\n"
                   for i, line in enumerate(lines)]
        later = {i: json.dumps({**_row(source.echo[i], r), "index": i}, ensure_ascii=False) + "\n"
                 for i, r in early.items()}
        _write_partial(output, indexed, later, len(source.echo))
        raise


def _predict_classes(model: nn.Module, tokenizer: Any, inputs: list[Example], plan: RunPlan, output: Path,
                     overwrite: bool, count: int) -> None:
    lines: list[str] = []
    try:
        with replace_file(output, overwrite=overwrite) as handle, \
                tqdm(total=count, desc="predict", unit="ex", disable=not plan.option("progress", True)) as bar:
            for line in _classify(model, tokenizer, inputs, plan, torch.device(plan.device.torch_device)):
                lines.append(line)
                handle.write(line)
                bar.update(1 if len(lines) > 1 else 0)
    except KeyboardInterrupt:
        _write_partial(output, lines if len(lines) > 1 else [], {}, count)
        raise


def predict(cfg: DictConfig) -> Path:
    """Write predictions for ``cfg.input`` and return the output path.

    ``cfg`` is read once, into the command's :class:`~vera_lightning.app.runs.plan.RunPlan`: with an adapter from a
    training run the model runs in the precision that run recorded, in the same form validation used (a bf16 base:
    the bf16 training form), and the record folder ``.hydra-predict-<time>/plan.json`` says which.

    Raises:
        FileNotFoundError: If ``input`` or ``adapter`` does not exist.
        FileExistsError: If the output exists and ``overwrite`` is false, or ``hydra.run.dir`` holds a training run.
        ValueError: If the adapter does not fit the model, the input is empty or lacks a column, a prompt is too
            long for ``generate.max_new_tokens``, the output is a directory or has the wrong suffix, or a
            ``generate`` setting is invalid.
        OSError: If the output cannot be written (a full disk): no file is left and the old one is unchanged.
    """
    try:
        return run_prediction(make_plan(cfg, "predict"))
    except BaseException:
        discard_job_log()  # a refused run leaves Hydra's job log as it was
        raise


def run_prediction(plan: RunPlan) -> Path:
    """Predict as ``plan`` says (see :func:`predict`)."""
    checked: Checked = preflight(plan)
    output, overwrite = checked.output, bool(plan.option("overwrite", False))
    print(f"[vera] {plan.describe_precision()}", flush=True)
    parts = build_components(plan, model_cfg=checked.model_cfg, tokenizer=checked.tokenizer,
                             datamodule=checked.datamodule)
    described = attach_adapter(parts, checked.adapter, checked.model_cfg)
    use_base_precision(parts.model)  # a bf16 base: the form validation used (bf16 projections, float32 λ's)
    model = parts.model.to(plan.device.torch_device).eval()
    run_dir = plan.run_dir

    def accept() -> None:  # every check passed: this run's record (and its plan), in a folder of its own
        write_hydra_record(plan.record, run_dir, False, command_record_name(run_dir, "predict"), plan=plan_json(plan))

    if checked.task == "classification":
        print(f"[vera] predicting with {described}: {checked.count} examples -> {output}", flush=True)
        accept()
        _predict_classes(model, parts.tokenizer, checked.inputs, plan, output, overwrite, checked.count)
    else:
        print(f"[vera] predicting with {described}: {checked.count} prompts -> {output}", flush=True)
        _generate(model, parts.tokenizer, checked.inputs, plan, checked.generate, output, overwrite, accept)
    return output
