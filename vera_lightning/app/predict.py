"""``predict(cfg) -> output file`` for a composed ``conf/predict.yaml`` (``scripts/predict.py``).

* Classification: every input sentence gets the predicted class id and its softmax
  probability, written as a TSV (``input``, ``label``, ``probability``).
* Sentence pairs (``data.text_pair_field`` set, e.g. ``data=mrpc|rte|stsb``): the input must be a
  ``.tsv``/``.csv`` holding both columns; each pair is tokenised as in training
  (``[CLS] a [SEP] b [SEP]``, ``longest_first`` truncation) and the TSV gets ``input_pair`` too.
* Regression (``data.problem_type=regression``, e.g. ``data=stsb``): the TSV holds the predicted
  value (``prediction``) instead of a label and probability.
* Causal LM: every prompt line goes through ``model.generate`` (``generate.max_new_tokens``,
  greedy or sampling; with sampling, prompt ``i`` is drawn after
  ``torch.manual_seed(generate.seed + i)``, so each line is reproducible on its own) and the
  continuation is written as one JSON object per line (``prompt``, ``generation``).

Rows are written and flushed as they are produced, with a progress bar on stderr. The model
comes from :func:`~vera_lightning.app.build.build_components` plus ``adapter=`` (see
:mod:`~vera_lightning.app.adapters`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from vera_lightning.app.adapters import attach_adapter, model_config_for, resolve_adapter
from vera_lightning.app.build import build_components, check_task
from vera_lightning.app.tables import is_regression, read_table

__all__ = ["predict", "read_inputs", "generation_kwargs"]

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


def generation_kwargs(settings: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments for a ``generate`` config node (``seed`` is applied per prompt)."""
    kwargs: dict[str, Any] = {"max_new_tokens": int(settings.get("max_new_tokens", 32)),
                              "do_sample": bool(settings.get("do_sample", False)),
                              "pad_token_id": tokenizer.pad_token_id}
    if kwargs["max_new_tokens"] < 1:
        raise ValueError(f"generate.max_new_tokens={kwargs['max_new_tokens']}: must be >= 1")
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(settings.get("temperature", 1.0)), top_k=int(settings.get("top_k", 50)),
                      top_p=float(settings.get("top_p", 1.0)))
    return kwargs


def _output_path(cfg: DictConfig, task: str, input_path: Path) -> Path:
    default = "predictions.tsv" if task == "classification" else "predictions.jsonl"
    output = Path(str(cfg.output)).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir) / default
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


@torch.inference_mode()
def _generate(model: nn.Module, tokenizer: Any, prompts: list[str], cfg: DictConfig, device: torch.device,
              handle: IO[str], bar: tqdm) -> None:
    settings = OmegaConf.to_container(cfg.generate, resolve=True) if cfg.get("generate") else {}
    kwargs = generation_kwargs(settings, tokenizer)
    seed = int(settings.get("seed", cfg.seed))
    for index, prompt in enumerate(prompts):
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        encoded = {k: encoded[k] for k in ("input_ids", "attention_mask")}  # no token_type_ids for a decoder
        if kwargs["do_sample"]:
            torch.manual_seed(seed + index)
        out = model.generate(**encoded, **kwargs)
        text = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        handle.write(json.dumps({"prompt": prompt, "generation": text}, ensure_ascii=False) + "\n")
        handle.flush()
        bar.update(1)


def predict(cfg: DictConfig) -> Path:
    """Write predictions for ``cfg.input`` and return the output path.

    Raises:
        FileNotFoundError: If ``input`` or ``adapter`` does not exist.
        FileExistsError: If the output exists and ``overwrite`` is false.
        ValueError: If the adapter does not fit the model, or the input is empty.
    """
    input_path = Path(str(cfg.input)).expanduser()
    if not input_path.is_file():
        raise FileNotFoundError(f"input={str(cfg.input)!r}: no such file (one example or prompt per line)")
    source = resolve_adapter(cfg.adapter) if cfg.get("adapter") else None
    task = check_task(cfg)
    output = _output_path(cfg, task, input_path)
    pair_field = cfg.data.get("text_pair_field") if task == "classification" else None
    texts = read_inputs(input_path, str(cfg.data.get("text_field") or "sentence"), pair_field)
    if not texts:
        raise ValueError(f"input={str(cfg.input)!r} holds no examples (empty lines are skipped)")

    model_cfg = model_config_for(source, cfg.model)
    parts = build_components(cfg, model_cfg=model_cfg)
    described = attach_adapter(parts, source, model_cfg or cfg.model)
    device = _device(cfg)
    model = parts.model.to(device).eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"[vera] predicting with {described}: {len(texts)} examples -> {output}", flush=True)
    run = _classify if task == "classification" else _generate
    with output.open("w", encoding="utf-8", newline="") as handle, tqdm(
        total=len(texts), desc="predict", unit="ex", disable=not cfg.get("progress", True)
    ) as bar:
        run(model, parts.tokenizer, texts, cfg, device, handle, bar)
    return output
