"""Batched generation for a list of prompt strings, configured by one ``generate:`` node (``conf/generate/``).

:func:`generate_texts` encodes every prompt first (checking it fits the model's positions, before any
work), then generates in batches of ``batch_size`` prompts of similar length, left-padded, with the KV
cache, and yields each prompt's continuation (decoded without special tokens and stripped) **in input
order**, as soon as every earlier prompt is done. Prompts are sorted by length (longest first) within
windows of :data:`SORT_WINDOW` batches, so padding stays small and the first results still come early.

Decoding (:class:`GenerateSettings`): greedy by default; ``num_beams`` > 1 for beam search;
``do_sample: true`` for sampling with ``temperature``, ``top_k`` (0: off) and ``top_p`` (1: off).
Generation always stops at the tokenizer's EOS and the model's own ``eos_token_id``(s) (a BERT-style
tokenizer without EOS: its SEP, as training ends each response); ``stop_at_newline: true`` also stops a
row at the first newline after its first non-blank character and cuts the text there.
:func:`generate_results` also says of each row whether it ended so (``finished``) or was cut at
``max_new_tokens``; :func:`generate_texts` gives the texts alone.

Seeds: with sampling, prompt ``i`` draws its tokens from its own ``torch.Generator`` seeded with
``seed + i`` (``i``: its index in the list given, or ``indices[i]``), so a sampled row is the same
whatever the batch size, the other prompts or their order, and is the row
``torch.manual_seed(seed + i); model.generate(prompt, do_sample=True, ...)`` gives alone (up to the
last bits of a padded forward pass). The global RNG is never touched, so generating during training
leaves the training run's random stream unchanged. Greedy and beam search use no randomness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["GenerateSettings", "register_schema", "Generated", "SORT_WINDOW", "stop_token_ids", "position_limit",
           "encode_prompts", "generate_texts", "generate_results", "SeededSampler", "NewlineStop"]

#: Prompts are length-sorted within windows of this many batches (results still come in input order).
SORT_WINDOW = 16


@dataclass(frozen=True)
class GenerateSettings:
    """The ``generate:`` config node (``conf/generate/default.yaml`` documents each key).

    ``val_prompts`` is read by validation only (:class:`~vera_lightning.app.tasks.module.CausalLMModule`):
    ``None`` every distinct prompt of the validation split, ``N`` a sample of ``N`` drawn with ``seed``
    (file order kept), 0 no generation metrics. ``progress`` shows a progress bar.
    """

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    stop_at_newline: bool = False
    batch_size: int = 16
    val_prompts: Optional[int] = None
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [("max_new_tokens", self.max_new_tokens >= 1, ">= 1"), ("num_beams", self.num_beams >= 1, ">= 1"),
                  ("temperature", self.temperature > 0, "> 0"), ("top_k", self.top_k >= 0, ">= 0 (0: off)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1: off)"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("val_prompts", self.val_prompts is None or self.val_prompts >= 0, "null (all), 0 (off) or > 0")]
        problems = [f"generate.{key}={getattr(self, key)!r}: must be {rule}" for key, ok, rule in checks if not ok]
        if self.do_sample and self.num_beams > 1:
            problems.append(f"generate.num_beams={self.num_beams} with generate.do_sample=true: beam sampling is not "
                            "supported; set generate.num_beams=1 (sampling) or generate.do_sample=false (beam search)")
        if problems:
            raise ValueError("Invalid generation settings:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_config(cls, node: Optional[Mapping[str, Any]]) -> "GenerateSettings":
        """Settings from a ``generate`` config node (``None``: the defaults), types checked, never cast.

        Composed configs are typed by Hydra already (:func:`register_schema`); this refuses what gets past it
        (``+generate.<key>=...``, a plain dict): ``2.7`` for an integer, the string ``"false"`` for a boolean.

        Raises:
            ValueError: Naming unknown keys (with the known ones), every value of the wrong type and every
                invalid value.
        """
        values = dict(node or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"generate: unknown key(s) {unknown}; the keys are {sorted(known)}")
        problems = [f"generate.{key}={value!r}: must be {_KINDS[key][1]}" for key, value in values.items()
                    if not _KINDS[key][0](value)]
        if problems:
            raise ValueError("Invalid generation settings:\n  - " + "\n  - ".join(problems))
        return cls(**{key: float(value) if _KINDS[key][1] == "a number" else value for key, value in values.items()})

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for logs and metrics files)."""
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: ``{key: (accepts, what it must be)}`` of :meth:`GenerateSettings.from_config`.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: (_is_int, "an integer") for key in ("max_new_tokens", "num_beams", "top_k", "seed", "batch_size")},
    **{key: (_is_number, "a number") for key in ("temperature", "top_p")},
    **{key: (lambda v: isinstance(v, bool), "true or false") for key in ("do_sample", "stop_at_newline", "progress")},
    "val_prompts": (lambda v: v is None or _is_int(v), "null or an integer"),
}


def register_schema(store: Any) -> None:
    """Store :class:`GenerateSettings`' fields, typed, as the ``generate/schema`` node of Hydra's ``ConfigStore``.

    The schema is derived from :class:`GenerateSettings` (the one owner of the keys, their types and defaults;
    a mutable copy, as Hydra merges the YAML onto it). ``conf/generate/*.yaml`` start with
    ``defaults: [schema, _self_]``, so an unknown key or a value of the wrong type (``max_new_tokens=2.7``) fails
    when the config is composed, with Hydra's message naming the key. The rules between keys (sampling vs beams,
    ranges) are checked by :class:`GenerateSettings` when an entry point reads its settings.
    """
    schema = make_dataclass("GenerateSchema", [(f.name, f.type, field(default=f.default))
                                               for f in fields(GenerateSettings)])
    schema.__module__ = __name__
    store.store(group="generate", name="schema", node=schema)


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The ids that end a generation: the model's ``eos_token_id``(s) and the tokenizer's EOS (else its SEP)."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        ids += [value] if isinstance(value, int) else list(value or [])
        if ids:
            break
    own = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    if own is not None:
        ids.append(own)
    return list(dict.fromkeys(int(i) for i in ids))


def position_limit(model: nn.Module) -> Optional[int]:
    """The model's positions (``max_position_embeddings`` or ``n_positions``), None when it has no limit."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompts(prompts: Sequence[str], tokenizer: Any, model: nn.Module, settings: GenerateSettings,
                   encode: Optional[Callable[[str], list[int]]] = None) -> list[list[int]]:
    """Token ids of every prompt, checked to leave room for ``max_new_tokens`` in the model's positions.

    Args:
        encode: Maps a prompt to its ids; default: ``tokenizer(prompt)["input_ids"]`` (special tokens
            added, as plain-text training data has them).

    Raises:
        ValueError: If a prompt has no tokens, or the longest prompt plus ``generate.max_new_tokens``
            exceeds the model's positions (naming both numbers and what to change).
    """
    encode = encode or (lambda text: list(tokenizer(text)["input_ids"]))
    ids = [list(encode(prompt)) for prompt in prompts]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"prompt(s) {empty[:5]} have no tokens (e.g. {prompts[empty[0]]!r}); remove empty prompts")
    limit = position_limit(model)
    if ids and limit is not None:
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        need = len(ids[longest]) + settings.max_new_tokens
        if need > limit:
            room = limit - len(ids[longest])
            fix = (f"Lower generate.max_new_tokens to at most {room}, shorten the prompts "
                   "(data.prompt_template, the input file), or use a model with more positions" if room > 0 else
                   "The prompt alone does not fit: shorten it (the input file, data.prompt_template) or use a model "
                   "with more positions")
            raise ValueError(
                f"prompt {longest} has {len(ids[longest])} tokens and "
                f"generate.max_new_tokens={settings.max_new_tokens}: "
                f"{need} positions, but the model has {limit} (config.max_position_embeddings). {fix}")
    return ids


class SeededSampler(LogitsProcessor):
    """Samples each row with its own generator (temperature, top-k, top-p), for ``generate(do_sample=False)``.

    Returns scores that are 0 at the drawn token and -inf elsewhere, so greedy selection takes it.
    Row ``b`` draws as ``torch.multinomial`` does for a batch of one after ``torch.manual_seed(seeds[b])``.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float) -> None:
        self.seeds = list(seeds)
        self.generators: Optional[list[torch.Generator]] = None
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        drawn = torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, drawn, 0.0)


class NewlineStop(StoppingCriteria):
    """Stops a row once its generated text holds a newline after its first non-blank character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pieces: dict[int, str] = {}
        self.texts: Optional[list[str]] = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.texts is None:
            self.texts = [""] * input_ids.shape[0]
        for b, token in enumerate(input_ids[:, -1].tolist()):
            if token not in self.pieces:
                self.pieces[token] = self.tokenizer.decode([token], skip_special_tokens=True)
            self.texts[b] += self.pieces[token]
        return torch.tensor(["\n" in text.lstrip() for text in self.texts], device=input_ids.device)


class Generated(NamedTuple):
    """One prompt's continuation: its text, and whether generation ended on its own (an end-of-text token, or a
    newline with ``stop_at_newline``) rather than being cut at ``generate.max_new_tokens``."""

    text: str
    finished: bool


def _finish(text: str, settings: GenerateSettings) -> str:
    text = text.strip()
    return text.split("\n", 1)[0].rstrip() if settings.stop_at_newline else text


def _generate_batch(model: nn.Module, tokenizer: Any, rows: list[list[int]], seeds: list[int],
                    settings: GenerateSettings, stops: list[int]) -> list[Generated]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):  # left padding: every prompt ends where generation starts
        input_ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "num_beams": settings.num_beams,
                              "do_sample": False, "use_cache": True, "pad_token_id": pad, "eos_token_id": stops}
    if settings.do_sample:
        kwargs["logits_processor"] = LogitsProcessorList(
            [SeededSampler(seeds, settings.temperature, settings.top_k, settings.top_p)])
    if settings.stop_at_newline and settings.num_beams == 1:
        kwargs["stopping_criteria"] = StoppingCriteriaList([NewlineStop(tokenizer)])
    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
    results = []
    for seq in out:
        new = seq[width:].tolist()
        raw = tokenizer.decode(new, skip_special_tokens=True)
        # ended on its own: a stop token among the new ones (a cut row never has one: padding follows only a
        # finished row), or the first newline when stop_at_newline cuts there
        finished = any(token in stops for token in new) or (settings.stop_at_newline and "\n" in raw.strip())
        results.append(Generated(_finish(raw, settings), finished))
    return results


def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], settings: GenerateSettings, *,
                   encode: Optional[Callable[[str], list[int]]] = None, indices: Optional[Sequence[int]] = None,
                   progress: Optional[bool] = None, desc: str = "generate") -> Iterator[str]:
    """The texts of :func:`generate_results` (same arguments), in input order."""
    results = generate_results(model, tokenizer, prompts, settings, encode=encode, indices=indices,
                               progress=progress, desc=desc)
    return (result.text for result in results)


def generate_results(model: nn.Module, tokenizer: Any, prompts: Sequence[str], settings: GenerateSettings, *,
                     encode: Optional[Callable[[str], list[int]]] = None, indices: Optional[Sequence[int]] = None,
                     progress: Optional[bool] = None, desc: str = "generate",
                     finished_early: Optional[dict[int, Generated]] = None) -> Iterator[Generated]:
    """Continuations of ``prompts`` (:class:`Generated`), yielded in input order as soon as every earlier one is done.

    Prompts are encoded and checked now (errors come before any generation); the returned iterator
    generates lazily. The model is in eval mode (and torch in inference mode) while a batch generates,
    restored after each batch.

    Args:
        model: A causal LM (``generate``).
        tokenizer: Its tokenizer (``pad_token_id``, ``decode``).
        prompts: The exact prompt texts.
        settings: Decoding settings.
        encode: Prompt text to token ids (default: the tokenizer with its special tokens).
        indices: The index of each prompt for its sampling seed (``seed + index``; default 0, 1, ...).
            Give the global indices when generating a shard of a larger list.
        progress: Show a tqdm bar (default: ``settings.progress``).
        desc: The bar's label.
        finished_early: A dict that holds, at every moment, the results already generated but not yet
            yielded (``{position in prompts: result}``; a later prompt of a longest-first batch done before an
            earlier one): what an interrupted caller can still keep.

    Raises:
        ValueError: See :func:`encode_prompts`.
    """
    ids = encode_prompts(prompts, tokenizer, model, settings, encode)
    seeds = [settings.seed + int(i) for i in (indices if indices is not None else range(len(ids)))]
    stops = stop_token_ids(model, tokenizer)
    if not stops:
        raise ValueError("neither the model (eos_token_id) nor the tokenizer (eos_token) names an end-of-text token; "
                         "set the tokenizer's eos_token")
    show = settings.progress if progress is None else progress
    done: dict[int, Generated] = finished_early if finished_early is not None else {}

    def run() -> Iterator[Generated]:
        emitted, window = 0, settings.batch_size * SORT_WINDOW
        with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not show) as bar:
            for start in range(0, len(ids), window):
                order = sorted(range(start, min(start + window, len(ids))), key=lambda i: -len(ids[i]))
                for first in range(0, len(order), settings.batch_size):
                    batch = order[first:first + settings.batch_size]
                    was_training = model.training
                    try:  # eval mode and inference mode per batch: nothing leaks to the caller between yields
                        model.eval()
                        with torch.inference_mode():
                            results = _generate_batch(model, tokenizer, [ids[i] for i in batch],
                                                      [seeds[i] for i in batch], settings, stops)
                    finally:
                        model.train(was_training)
                    done.update(zip(batch, results))
                    bar.update(len(batch))
                    while emitted in done:
                        yield done.pop(emitted)
                        emitted += 1

    return run()
