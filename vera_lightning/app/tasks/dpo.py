"""``DpoModule``: DPO on preference pairs with a VeRA policy and a VeRA-aware reference (``objective=dpo``).

The loss and the rewards: :mod:`vera_lightning.app.tasks.dpo_loss`. The policy is the model's active adapter (the
one training, ``"default"``); the **reference** is one of two things, both over the same frozen base and shared
``A``/``B``, so policy and reference are one model:

* ``reference_adapter`` given (``train.py adapter=<an SFT run's adapter>``): a frozen copy of that adapter's λ's,
  loaded as the named adapter ``"reference"`` in :meth:`DpoModule.setup` (before a checkpoint's restore, which
  expects it), scored with :func:`vera_lightning.adapter_batch` (every row served by ``"reference"``, under
  ``no_grad``). The policy starts from the same adapter (:func:`~vera_lightning.app.tasks.finetune.prepare`), so at
  step 0 policy = reference.
* otherwise the base model: the adapter disabled (:func:`vera_lightning.disable_adapter`). A model without VeRA at
  all (``eval.py adapter=null``) is its own reference.

The reference is scored in eval mode (no dropout), either each step (``dpo.precompute_reference=false``) or once
for every training pair before training, kept in memory by pair index (``true``); both give the same numbers.
Log-probabilities are summed over the response tokens only (labels -100 elsewhere;
:func:`~vera_lightning.app.tasks.lm_loss.sequence_logps`), averaged per token for IPO.

Validation logs ``val/loss``, ``val/reward_accuracy``, ``val/reward_margin``, ``val/rewards_chosen``,
``val/rewards_rejected``, ``val/logps_chosen`` and ``val/logps_rejected`` (the policy's), each a mean over pairs.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torchmetrics import MeanMetric

from vera_lightning import adapter_batch, disable_adapter, find_adapter, load_adapter
from vera_lightning.app.tasks.dpo_loss import DpoSettings, dpo_loss
from vera_lightning.app.tasks.lm_loss import sequence_logps
from vera_lightning.app.tasks.module import VeraTaskModule

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

__all__ = ["REFERENCE_NAME", "DPO_METRICS", "DpoModule"]

log = logging.getLogger(__name__)

#: The named adapter holding the frozen reference λ's.
REFERENCE_NAME = "reference"
#: What validation logs (``val/<name>``), in this order.
DPO_METRICS = ("loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
               "logps_rejected")
_INPUTS = ("input_ids", "attention_mask", "labels")


class DpoModule(VeraTaskModule):
    """DPO over a VeRA policy (see the module docstring).

    Args:
        model: A causal LM (VeRA is injected by the callback, or loaded by ``eval.py``).
        dpo: The ``dpo`` settings (:class:`~vera_lightning.app.tasks.dpo_loss.DpoSettings`' fields).
        reference_adapter: The adapter directory whose λ's are the reference; ``None``: the base model.
        **optim: ``lr``, ``head_lr``, ``weight_decay``, ``warmup_ratio`` (see :class:`VeraTaskModule`).
    """

    def __init__(self, model: nn.Module, dpo: Mapping[str, Any], reference_adapter: Optional[str] = None,
                 **optim: float) -> None:
        super().__init__(model, **optim)
        self.settings = DpoSettings.from_dict(dict(dpo))
        self.reference_adapter = reference_adapter
        self.val_generation = None  # no generation metrics on preference data
        self.val_means = nn.ModuleDict({name: MeanMetric() for name in DPO_METRICS})
        self._precomputed: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def metric_names(self) -> list[str]:
        """The names validation logs (``optimized_metric`` must be one of them)."""
        return [f"val/{name}" for name in DPO_METRICS]

    @override
    def setup(self, stage: str) -> None:
        # with a reference adapter the model itself holds the adapter (train.py adapter= applies VeRA to it first;
        # eval.py loads the adapter into it), so the file's tensor names are the model's
        adapter = find_adapter(self)
        if self.reference_adapter and adapter is not None and REFERENCE_NAME not in adapter.names:
            load_adapter(self.model, self.reference_adapter, adapter_name=REFERENCE_NAME)  # added frozen, inactive

    def reference_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's per-row log-probabilities of ``inputs`` (no gradient, eval mode)."""
        adapter = find_adapter(self)
        rows = int(inputs["input_ids"].shape[0])
        if adapter is None:
            block: Any = nullcontext()
        elif self.reference_adapter:
            block = adapter_batch(self, [REFERENCE_NAME] * rows)
        else:
            block = disable_adapter(self)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), block:
                return sequence_logps(self.model, inputs, average=self.settings.loss_type == "ipo")
        finally:
            self.model.train(training)

    def precompute(self, loader: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (chosen, rejected) of ``count`` pairs from ``loader`` (batches with ``index``)."""
        chosen = torch.full((count,), float("nan"))
        rejected = torch.full((count,), float("nan"))
        for batch in loader:
            inputs = {k: batch[k].to(self.device) for k in _INPUTS}
            logps = self.reference_logps(inputs).cpu()
            n = batch["index"].shape[0]
            chosen[batch["index"]], rejected[batch["index"]] = logps[:n], logps[n:]
        if torch.isnan(chosen).any() or torch.isnan(rejected).any():
            raise RuntimeError("precompute: some pairs were not scored (their index is missing from the loader)")
        return chosen, rejected

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if not self.settings.precompute_reference or datamodule is None or self._precomputed is not None:
            return
        start = time.perf_counter()
        items = datamodule.splits["train"]
        size = int(datamodule.cfg.get("eval_batch_size") or datamodule.cfg.get("batch_size") or 8)
        self._precomputed = self.precompute(datamodule.ordered_loader("train", size), len(items))
        if self.trainer.is_global_zero:
            print(f"[vera] dpo: reference log-probs of {len(items)} training pairs precomputed in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)

    def pair_terms(self, batch: dict[str, torch.Tensor], precomputed: bool = False) -> dict[str, torch.Tensor]:
        """Per-pair losses, rewards and policy log-probs of a batch (``2B`` rows: chosen then rejected)."""
        inputs = {k: batch[k] for k in _INPUTS}
        n = int(batch["index"].shape[0])
        policy = sequence_logps(self.model, inputs, average=self.settings.loss_type == "ipo")
        if precomputed and self._precomputed is not None:
            index = batch["index"].cpu()
            ref = torch.cat([self._precomputed[0][index], self._precomputed[1][index]]).to(policy.device)
        else:
            ref = self.reference_logps(inputs)
        losses, chosen, rejected = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.settings)
        return {"loss": losses, "rewards_chosen": chosen, "rewards_rejected": rejected,
                "reward_accuracy": (chosen > rejected).float(), "reward_margin": chosen - rejected,
                "logps_chosen": policy[:n].detach(), "logps_rejected": policy[n:].detach()}

    @override
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pair_terms(batch)["loss"].mean()

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.pair_terms(batch, precomputed=True)
        n = int(batch["index"].shape[0])
        loss = terms["loss"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/reward_accuracy", terms["reward_accuracy"].mean(), batch_size=n)
        self.log("train/reward_margin", terms["reward_margin"].mean(), batch_size=n)
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        terms = self.pair_terms(batch)
        for name, metric in self.val_means.items():
            metric.update(terms[name].detach().float())
            self.log(f"val/{name}", metric, prog_bar=name in ("loss", "reward_accuracy"))
