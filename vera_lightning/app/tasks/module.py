"""LightningModules around a Hugging Face model: sequence classification/regression and causal LM.

Validation metrics of a sequence task come from the data config (``data.metrics``, logged as
``val/<name>``; built by :mod:`vera_lightning.app.tasks.task_metrics`), so a GLUE task names its own
(Matthews correlation for CoLA, Pearson/Spearman for STS-B); without one, classification logs
accuracy and macro F1 and regression Pearson and Spearman.

Both optimise with AdamW over the parameters that are trainable when the optimiser is
built (after :class:`VeraCallback` injected and froze in ``setup``), in two groups:
the VeRA scaling vectors at ``lr`` and everything else that trains (``modules_to_save``
heads, biases) at ``head_lr``, as the paper tunes the two separately. The learning rate
warms up linearly over ``warmup_ratio`` of the run and then decays linearly to zero.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torchmetrics import MeanMetric, Metric

from vera_lightning import vera_layers
from vera_lightning.app.generation.generate import GenerateSettings
from vera_lightning.app.generation.val_generation import ValidationGeneration
from vera_lightning.app.models.precision import use_base_precision
from vera_lightning.app.tasks.lm_loss import response_loss
from vera_lightning.app.tasks.task_metrics import build_metrics, default_metrics

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

__all__ = [
    "VeraTaskModule",
    "ClassificationModule",
    "RegressionModule",
    "CausalLMModule",
    "build_module",
    "linear_warmup",
]


def linear_warmup(warmup_steps: int, total_steps: int):
    """``LambdaLR`` factor: 0 → 1 over ``warmup_steps``, then linearly to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class VeraTaskModule(pl.LightningModule):
    """Shared optimiser/scheduler logic; subclasses define the metrics.

    Args:
        model: The Hugging Face model (VeRA is injected into it by the callback).
        lr: Learning rate of the VeRA λ vectors.
        head_lr: Learning rate of every other trainable parameter (heads in ``modules_to_save``, biases).
        weight_decay: AdamW weight decay (applied to both groups).
        warmup_ratio: Fraction of the optimisation steps spent warming up linearly.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        head_lr: float = 4e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__()
        problems = [f"optim.{k}={v!r}: must be > 0" for k, v in (("lr", lr), ("head_lr", head_lr)) if not v > 0]
        if not 0.0 <= warmup_ratio < 1.0:
            problems.append(f"optim.warmup_ratio={warmup_ratio!r}: must be in [0, 1)")
        if problems:
            raise ValueError("Invalid optimiser settings:\n  - " + "\n  - ".join(problems))
        self.model = model
        self.save_hyperparameters(ignore=["model", "metrics"])

    @override
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of ``batch`` (the model's own; a causal LM scores only the labelled rows)."""
        return self.model(**batch).loss

    def _base_precision(self) -> None:
        use_base_precision(self.model)  # a bf16 base: projection products in bf16, λ's float32 (idempotent)

    @override
    def on_fit_start(self) -> None:
        self._base_precision()

    @override
    def on_validation_start(self) -> None:
        self._base_precision()

    @override
    def on_predict_start(self) -> None:
        self._base_precision()

    def check_before_run(self) -> None:
        """The checks that need the model and the data, run before the run directory is written (idempotent).

        Called by :class:`~vera_lightning.app.runs.records.RunRecord` before it accepts a fresh run (Lightning runs the
        callbacks' ``setup`` before the module's), so a run refused here leaves its directory as it was.
        """

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: trainable λ's at ``lr``, other trainable parameters at ``head_lr``."""
        lambdas = {id(p): p for _, layer in vera_layers(self.model) for p in layer.adapter_params().values()}
        lambda_params = [p for p in lambdas.values() if p.requires_grad]
        others = [p for p in self.model.parameters() if p.requires_grad and id(p) not in lambdas]
        groups = []
        if lambda_params:
            groups.append({"params": lambda_params, "lr": self.hparams.lr, "name": "vera_lambdas"})
        if others:
            groups.append({"params": others, "lr": self.hparams.head_lr, "name": "heads"})
        if not groups:
            raise ValueError(
                "no trainable parameters: the model is fully frozen. Add VeraCallback to the Trainer (train() does) "
                "or check vera.target_modules / vera.modules_to_save"
            )
        return groups

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.param_groups(), weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_validation_epoch_start(self) -> None:
        # Fresh metric states in the current grad mode: states made under trainer.validate()'s
        # inference mode cannot be updated by the no-grad validation inside trainer.fit().
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss


class ClassificationModule(VeraTaskModule):
    """Sequence classification: logs ``val/loss`` and ``val/<name>`` per metric (torchmetrics).

    Every metric is updated with the predicted class ids and the labels.

    Args:
        model: An ``AutoModelForSequenceClassification`` model.
        num_labels: Number of classes.
        metrics: ``{name: Metric}``, logged as ``val/<name>`` (the first on the progress bar);
            ``None``: :func:`default_metrics`.
        **optim: ``lr``, ``head_lr``, ``weight_decay``, ``warmup_ratio`` (see :class:`VeraTaskModule`).
    """

    def __init__(
        self, model: nn.Module, num_labels: int, metrics: Optional[Mapping[str, Metric]] = None, **optim: float
    ) -> None:
        super().__init__(model, **optim)
        self.val_metrics = nn.ModuleDict(dict(metrics) if metrics else default_metrics(num_labels))
        self.val_loss = MeanMetric()

    @property
    def metric_names(self) -> list[str]:
        """The names this module logs at validation (``optimized_metric`` must be one of them)."""
        return ["val/loss", *(f"val/{name}" for name in self.val_metrics)]

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics compare with the labels: the class ids."""
        return logits.argmax(dim=-1)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        preds = self.predictions(out.logits)
        for i, (name, metric) in enumerate(self.val_metrics.items()):
            metric.update(preds, batch["labels"])
            self.log(f"val/{name}", metric, prog_bar=i == 0)
        self.val_loss.update(out.loss, weight=batch["labels"].numel())
        self.log("val/loss", self.val_loss)


class RegressionModule(ClassificationModule):
    """Sequence regression (one output, MSE loss: ``problem_type="regression"``); metrics get the scores.

    Args:
        model: An ``AutoModelForSequenceClassification`` model with ``num_labels=1``.
        metrics: ``{name: Metric}``; ``None``: Pearson and Spearman correlation.
        **optim: See :class:`VeraTaskModule`.
    """

    def __init__(self, model: nn.Module, metrics: Optional[Mapping[str, Metric]] = None, **optim: float) -> None:
        super().__init__(model, num_labels=1, metrics=metrics, **optim)

    @override
    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float()


class CausalLMModule(VeraTaskModule):
    """Causal language modelling: logs ``val/loss`` (mean token NLL) and ``val/ppl`` = exp(loss).

    With ``generate`` settings and a datamodule whose ``generation_examples("val")`` is not empty
    (prompt/response data, ``data.format: sft``), every validation run (not the sanity check) also
    generates for the validation prompts and logs ``val/bleu``, ``val/rougeL`` and ``val/chrf`` (0–100,
    every reference of a prompt counts: :mod:`~vera_lightning.app.generation.textmetrics`); which prompts, and how
    ranks share them under DDP: :class:`~vera_lightning.app.generation.val_generation.ValidationGeneration`.

    Args:
        model: A causal LM.
        generate: A ``generate`` config node (:class:`~vera_lightning.app.generation.generate.GenerateSettings`);
            ``None``: no generation metrics.
        **optim: See :class:`VeraTaskModule`.
    """

    def __init__(self, model: nn.Module, generate: Optional[Mapping[str, Any]] = None, **optim: float) -> None:
        super().__init__(model, **optim)
        self.val_nll = MeanMetric()
        settings = GenerateSettings.from_config(generate) if generate is not None else None
        #: Generation metrics at validation (None without ``generate`` settings or with ``val_prompts: 0``).
        self.val_generation = ValidationGeneration(settings) if settings and settings.val_prompts != 0 else None

    @property
    def metric_names(self) -> list[str]:
        """The names this module logs at validation."""
        extra = self.val_generation.metric_names if self.val_generation is not None else []
        return ["val/loss", "val/ppl", *extra]

    @override
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return response_loss(self.model, batch)

    @override
    def check_before_run(self) -> None:
        """Every validation prompt plus ``generate.max_new_tokens`` fits the model's positions."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.val_generation is not None and datamodule is not None:
            self.val_generation.prepare(datamodule, self.model)

    @override
    def setup(self, stage: str) -> None:
        self.check_before_run()  # already done for a fresh app run (RunRecord.setup); a resume or eval gets it here

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # the training loss's form: the vocabulary projection on scored rows only (a bf16 model's full float32
        # logits for a validation batch of 16 x 192 would take ~0.6 GB beside their bf16 copy)
        loss = self.loss(batch)
        tokens = int((batch["labels"][:, 1:] != -100).sum())  # next-token labels: shifted by one
        self.val_nll.update(loss, weight=max(tokens, 1))
        self.log("val/loss", self.val_nll, prog_bar=True)

    @override
    def on_validation_epoch_end(self) -> None:
        # compute() already reduced over ranks, so every rank logs the same value
        self.log("val/ppl", torch.exp(self.val_nll.compute()).clamp(max=math.exp(50)), sync_dist=True)
        if self.val_generation is None or self.trainer.sanity_checking:
            return
        trainer = self.trainer
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        full = None
        if isinstance(trainer.strategy, FSDPStrategy):  # generate() runs outside FSDP's forward: unshard first
            full = FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
        scores = self.val_generation.run(self.model, trainer.global_rank, trainer.world_size, progress=show,
                                         full_params=full)
        for name, value in scores.items():
            self.log(name, value, sync_dist=True)  # equal on every rank already


def build_module(
    task: str,
    model: nn.Module,
    optim: Mapping[str, Any],
    num_labels: Optional[int] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    problem_type: Optional[str] = None,
    generate: Optional[Mapping[str, Any]] = None,
):
    """The LightningModule for ``task`` (``"classification"`` or ``"causal_lm"``).

    Args:
        task: The data config's task.
        model: The Hugging Face model.
        optim: ``lr``, ``head_lr``, ``weight_decay``, ``warmup_ratio``.
        num_labels: Classes (1 with ``problem_type="regression"``).
        metrics: ``data.metrics`` specs (``{name: {_target_: ...}}``); ``None``: :func:`default_metrics`.
        problem_type: ``"regression"`` builds a :class:`RegressionModule`.
        generate: The ``generate`` config node for a causal LM's generation metrics (pass it for
            prompt/response data only); ``None``: ``val/loss`` and ``val/ppl`` only.
    """
    kwargs = {k: float(optim[k]) for k in ("lr", "head_lr", "weight_decay", "warmup_ratio") if k in optim}
    if task == "classification":
        built = build_metrics(metrics)
        if problem_type == "regression":
            return RegressionModule(model, metrics=built, **kwargs)
        return ClassificationModule(model, num_labels=int(num_labels), metrics=built, **kwargs)
    if task == "causal_lm":
        if generate is not None and not isinstance(generate, dict):
            generate = (OmegaConf.to_container(generate, resolve=True) if OmegaConf.is_config(generate)
                        else dict(generate))
        return CausalLMModule(model, generate=generate, **kwargs)
    raise ValueError(f"task={task!r}: must be 'classification' or 'causal_lm'")
