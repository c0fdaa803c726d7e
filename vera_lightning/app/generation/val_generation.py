"""Generation metrics at validation: pick the prompts, shard them over ranks, generate, score.

:class:`ValidationGeneration` is what :class:`~vera_lightning.app.tasks.module.CausalLMModule` runs at the end of
each validation epoch (``scripts/train.py``) and of ``trainer.validate`` (``scripts/eval.py``) for
prompt/response data:

* **Prompts**: the datamodule's ``generation_examples("val")``, the distinct prompts of the whole
  validation file (``data.max_val_samples`` limits the loss, not these), each with every reference.
  ``generate.val_prompts``: ``null`` all of them, ``N`` a sample of ``N`` drawn with ``generate.seed``
  (file order kept; the same prompts at every validation run), ``0`` none (the module then skips this).
* **Prompt tokens**: exactly as training has them before the response
  (:func:`vera_lightning.app.data.sft.prompt_token_ids`); all are encoded and checked against the model's
  positions in :meth:`ValidationGeneration.prepare` (the module's ``setup``), before any training.
* **DDP**: rank ``r`` of ``W`` generates for prompts ``r, r + W, r + 2W, ...`` (sampling seeds follow
  the global index, so a sampled row is the same on any number of ranks); each metric's ``compute()``
  sums the ranks' statistics (torchmetrics' sync), so every rank logs the score of the whole sample,
  equal to one process's. Under FSDP the full parameters are gathered on every rank for generation.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

from vera_lightning.app.data import sft
from vera_lightning.app.data.datamodules import subsample
from vera_lightning.app.generation.generate import GenerateSettings, encode_prompts, generate_results
from vera_lightning.app.generation.textmetrics import METRIC_NAMES, generation_metrics

__all__ = ["ValidationGeneration"]


class ValidationGeneration(nn.Module):
    """The validation prompts, their metrics (``val/bleu``, ``val/rougeL``, ``val/chrf``) and last generations.

    An ``nn.Module`` so the metric states follow the LightningModule to its device.

    Args:
        settings: Decoding settings and ``val_prompts``.
    """

    def __init__(self, settings: GenerateSettings) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = nn.ModuleDict(generation_metrics())
        #: The ``{"prompt", "references"}`` generated for (set by :meth:`prepare`).
        self.examples: list[dict[str, Any]] = []
        #: This rank's ``{"prompt", "references", "generation", "finished"}`` of the last :meth:`run` (``finished``:
        #: false when ``generate.max_new_tokens`` cut the generation).
        self.generations: list[dict[str, Any]] = []
        self.tokenizer: Any = None
        self.encode: Any = None

    @property
    def metric_names(self) -> list[str]:
        """``val/<name>`` for each metric."""
        return [f"val/{name}" for name in METRIC_NAMES]

    def prepare(self, datamodule: Any, model: nn.Module) -> None:
        """Pick the prompts of ``datamodule`` and check they fit ``model`` (idempotent).

        Raises:
            ValueError: If a prompt plus ``generate.max_new_tokens`` exceeds the model's positions.
        """
        if self.examples or not hasattr(datamodule, "generation_examples"):
            return
        examples = datamodule.generation_examples("val")
        if examples and self.settings.val_prompts is not None:
            examples = subsample(examples, self.settings.val_prompts, self.settings.seed, "generate.val_prompts")
        self.tokenizer = datamodule.tokenizer
        self.encode = partial(sft.prompt_token_ids, datamodule.cfg, datamodule.tokenizer)
        encode_prompts([e["prompt"] for e in examples], self.tokenizer, model, self.settings, self.encode)
        self.examples = examples

    def run(self, model: nn.Module, rank: int = 0, world_size: int = 1, progress: bool = False,
            full_params: Optional[Any] = None) -> dict[str, torch.Tensor]:
        """Generate for this rank's share of the prompts and return ``{"val/<name>": score}`` (all ranks').

        Every rank must call this (the metrics synchronise); ``{}`` when there are no prompts.

        Args:
            model: The causal LM.
            rank: This process's global rank.
            world_size: The number of processes.
            progress: Show a progress bar (``generate.progress`` must allow it too).
            full_params: A context manager gathering sharded parameters (FSDP), or None.
        """
        if not self.examples:
            return {}
        shard = list(range(rank, len(self.examples), world_size))
        prompts = [self.examples[i]["prompt"] for i in shard]
        with full_params if full_params is not None else nullcontext():
            results = list(generate_results(model, self.tokenizer, prompts, self.settings, encode=self.encode,
                                            indices=shard, progress=progress and self.settings.progress,
                                            desc="val generate"))
        texts = [result.text for result in results]
        self.generations = [{**self.examples[i], "generation": result.text, "finished": result.finished}
                            for i, result in zip(shard, results)]
        references = [self.examples[i]["references"] for i in shard]
        scores = {}
        for name, metric in self.metrics.items():
            metric.update(texts, references)  # also with no prompt on this rank: its zero statistics join the sum
            scores[f"val/{name}"] = metric.compute().float()  # summed over ranks by torchmetrics
            metric.reset()
        return scores
