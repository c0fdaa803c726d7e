"""``predict(cfg) -> output file`` for a composed ``conf/predict.yaml`` (``scripts/predict.py``).

* Classification: every input sentence gets the predicted class id and its softmax
  probability, written as a TSV (``input``, ``label``, ``probability``).
* Sentence pairs (``data.text_pair_field`` set, e.g. ``data=mrpc|rte|stsb``): the input must be a
  ``.tsv``/``.csv`` holding both columns; each pair is tokenised as in training
  (``[CLS] a [SEP] b [SEP]``, ``longest_first`` truncation) and the TSV gets ``input_pair`` too.
* Regression (``data.problem_type=regression``, e.g. ``data=stsb``): the TSV holds the predicted
  value (``prediction``) instead of a label and probability.
* Causal LM: every prompt gets a continuation from batched generation
  (:mod:`~vera_lightning.app.generation`, decoding settings in the ``generate`` group: greedy by
  default, beams, sampling with one seeded generator per prompt, ``stop_at_newline``), written as one
  JSON object per input row, in input order (``generation`` added to the row). The input is

  - a ``.csv``/``.tsv``/``.jsonl`` file: with prompt/response data (``data.format=sft``, e.g.
    ``data=e2e``) the rows hold the data group's prompt column(s) (``prompt_field``, the columns
    ``prompt_template`` names, or ``messages_field``), formatted exactly as in training
    (:func:`~vera_lightning.app.sft.format_prompt`: template, chat template, system prompt), and each
    output line is the input row plus ``generation``; with plain text data the ``data.text_field``
    column is the prompt (output: the row plus ``generation``);
  - any other file: one prompt per line (blank lines skipped). With prompt/response data each line
    fills ``data.prompt_field`` (or is the user turn of a ``messages_field`` conversation) and is
    formatted as a table row would be; with plain text data the line is the prompt as is. Output:
    ``prompt`` (the line) and ``generation``.

  ``adapter=null`` generates with the base model (zero-shot), with the same prompt formatting.

Rows are written and flushed as they are produced, with a progress bar on stderr. The model
comes from :func:`~vera_lightning.app.build.build_components` plus ``adapter=`` (see
:mod:`~vera_lightning.app.adapters`).
"""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, NamedTuple, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from vera_lightning.app import sft
from vera_lightning.app.adapters import attach_adapter, model_config_for, resolve_adapter
from vera_lightning.app.build import build_components, check_task
from vera_lightning.app.checks import undecodable_line
from vera_lightning.app.generation import GenerateSettings, generate_texts
from vera_lightning.app.tables import is_regression, read_table

__all__ = ["predict", "read_inputs", "read_prompt_input", "PromptInput", "TABLES"]

#: Input suffixes read as tables (the rest: one example per line).
TABLES = (".csv", ".tsv", ".tab", ".jsonl")

#: One input example: a text, or a ``(text, text_pair)`` pair.
Example = Union[str, tuple[str, str]]


def read_inputs(path: Path, text_field: str, pair_field: Optional[str] = None) -> list[Example]:
    """The examples of ``path``: ``.tsv``/``.csv`` column ``text_field`` (and ``pair_field``), else one per line.

    Returns:
        One entry per example: the text, or ``(text, text_pair)`` when ``pair_field`` is given.

    Raises:
        ValueError: If a pair task gets a plain text file, or a column is missing (naming the option).
    """
    table = path.suffix.lower() in (".tsv", ".tab", ".csv")
    if pair_field:
        if not table:
            raise ValueError(
                f"input={str(path)!r}: data.text_pair_field={pair_field!r} makes this a sentence-pair task, which "
                f"needs a .tsv/.csv input with a header holding the columns {text_field!r} and {pair_field!r}"
            )
        records = read_table(path, {"text_field": text_field, "text_pair_field": pair_field})
        return [(record["text"], record["text_pair"]) for record in records]
    if table:
        return [record["text"] for record in read_table(path, {"text_field": text_field})]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _records(path: Path) -> list[dict[str, Any]]:
    """Every row of a ``.csv``/``.tsv``/``.jsonl`` file (all columns)."""
    try:
        return _read_records(path)
    except UnicodeDecodeError as err:
        raise undecodable_line(path, err) from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if path.suffix.lower() == ".jsonl":
            rows = []
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}, row {number}: not a JSON object ({err})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}, row {number}: a JSONL row must be an object, "
                                         f"got {type(row).__name__}")
                    rows.append(row)
            return rows
        tsv = path.suffix.lower() in (".tsv", ".tab")
        return list(csv.DictReader(handle, delimiter="\t" if tsv else ",",
                                   quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL))


class PromptInput(NamedTuple):
    """A causal-LM input file: ``echo[i]`` is written with prompt ``i``'s generation.

    ``rows`` (prompt/response data): the rows to format with :func:`~vera_lightning.app.sft.format_prompt`
    once the tokenizer exists; ``prompts`` (plain text data): the prompt texts themselves.
    """

    echo: list[dict[str, Any]]
    rows: Optional[list[dict[str, Any]]]
    prompts: Optional[list[str]]


def read_prompt_input(path: Path, data_cfg: Mapping[str, Any]) -> PromptInput:
    """Read a causal-LM input file (see the module docstring), checking it before any model is built.

    Raises:
        ValueError: Naming the file, row and option for a missing column or empty text, or a text file
            whose lines cannot fill ``data.prompt_template``.
    """
    table = path.suffix.lower() in TABLES
    if data_cfg.get("format") == "sft":
        if table:
            rows = sft.read_rows(path, data_cfg, responses=False)
            return PromptInput(rows, rows, None)
        messages, field = data_cfg.get("messages_field"), data_cfg.get("prompt_field")
        lines = read_inputs(path, "text")
        rows = [{messages: [{"role": "user", "content": line}]} if messages else {field: line} for line in lines]
        if rows and not messages:
            try:  # a template naming other columns cannot be filled from a line: say so before any work
                sft.format_prompt({**data_cfg, "chat_template": False}, None, rows[0])
            except ValueError as err:
                raise ValueError(f"input={str(path)!r}: each line of a text file fills data.prompt_field={field!r} "
                                 f"only, but {err}; give a .csv/.tsv/.jsonl holding those columns") from None
        return PromptInput([{"prompt": line} for line in lines], rows, None)
    column = str(data_cfg.get("text_field") or "text")
    if not table:
        lines = read_inputs(path, column)
        return PromptInput([{"prompt": line} for line in lines], None, lines)
    rows = _records(path)
    empty = [number for number, row in enumerate(rows, start=1) if not str(row.get(column) or "").strip()]
    if empty:
        raise ValueError(f"{path}, row {empty[0]}: no text in column {column!r} (data.text_field); the row has "
                         f"{sorted(rows[empty[0] - 1])}")
    return PromptInput(rows, None, [row[column] for row in rows])


def _output_path(cfg: DictConfig, task: str, input_path: Path) -> Path:
    default = "predictions.tsv" if task == "classification" else "predictions.jsonl"
    output = Path(str(cfg.output)).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir) / default
    if output.is_dir():
        raise ValueError(f"output={str(output)!r} is a directory; give a file path, "
                         f"e.g. output={str(output / default)!r}")
    if output.resolve() == input_path.resolve():
        raise ValueError(f"output={str(output)!r} is the input file; choose another output path")
    if output.exists() and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"output={str(output)!r} already exists and is never replaced silently; choose another path or pass "
            "overwrite=true"
        )
    return output


def _device(cfg: DictConfig) -> torch.device:
    wanted = str(cfg.trainer.get("accelerator", "cpu"))
    if wanted in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def _classify(model: nn.Module, tokenizer: Any, examples: list[Example], cfg: DictConfig, device: torch.device,
              handle: IO[str], bar: tqdm) -> None:
    writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
    pairs = bool(examples) and isinstance(examples[0], tuple)
    regression = is_regression(cfg.data)
    writer.writerow(["input"] + (["input_pair"] if pairs else []) + (["prediction"] if regression else
                                                                       ["label", "probability"]))
    max_length = int(cfg.data.get("max_length", 128))
    for chunk in _batches(examples, max(1, int(cfg.get("batch_size", 32)))):
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
            writer.writerow((list(example) if pairs else [example]) + values)
        handle.flush()
        bar.update(len(chunk))


def _generate(model: nn.Module, tokenizer: Any, source: PromptInput, cfg: DictConfig, settings: GenerateSettings,
              handle: IO[str]) -> None:
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if source.rows is not None:  # prompt/response data: the prompt exactly as training formats it
        prompts = [sft.format_prompt(data_cfg, tokenizer, row) for row in source.rows]
        encode = partial(sft.prompt_token_ids, data_cfg, tokenizer)
    else:
        prompts, encode = source.prompts, None
    texts = generate_texts(model, tokenizer, prompts, settings, encode=encode,
                           progress=bool(cfg.get("progress", True)) and settings.progress, desc="predict")
    for row, text in zip(source.echo, texts):
        handle.write(json.dumps({**row, "generation": text}, ensure_ascii=False) + "\n")
        handle.flush()


def predict(cfg: DictConfig) -> Path:
    """Write predictions for ``cfg.input`` and return the output path.

    Raises:
        FileNotFoundError: If ``input`` or ``adapter`` does not exist.
        FileExistsError: If the output exists and ``overwrite`` is false.
        ValueError: If the adapter does not fit the model, the input is empty or lacks a column, the
            output is a directory, or a ``generate`` setting is invalid.
    """
    input_path = Path(str(cfg.input)).expanduser()
    if not input_path.is_file():
        raise FileNotFoundError(f"input={str(cfg.input)!r}: no such file (one example or prompt per line)")
    source = resolve_adapter(cfg.adapter) if cfg.get("adapter") else None
    task = check_task(cfg)
    output = _output_path(cfg, task, input_path)
    if task == "classification":
        pair_field = cfg.data.get("text_pair_field")
        inputs: Any = read_inputs(input_path, str(cfg.data.get("text_field") or "sentence"), pair_field)
        count = len(inputs)
    else:
        settings = GenerateSettings.from_config(OmegaConf.to_container(cfg.get("generate") or {}, resolve=True))
        inputs = read_prompt_input(input_path, OmegaConf.to_container(cfg.data, resolve=True))
        count = len(inputs.echo)
    if not count:
        raise ValueError(f"input={str(cfg.input)!r} holds no examples (empty lines are skipped)")

    model_cfg = model_config_for(source, cfg.model)
    parts = build_components(cfg, model_cfg=model_cfg)
    described = attach_adapter(parts, source, model_cfg or cfg.model)
    model = parts.model.to(_device(cfg)).eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"[vera] predicting with {described}: {count} examples -> {output}", flush=True)
    with output.open("w", encoding="utf-8", newline="") as handle:
        if task == "classification":
            with tqdm(total=count, desc="predict", unit="ex", disable=not cfg.get("progress", True)) as bar:
                _classify(model, parts.tokenizer, inputs, cfg, _device(cfg), handle, bar)
        else:
            _generate(model, parts.tokenizer, inputs, cfg, settings, handle)
    return output
