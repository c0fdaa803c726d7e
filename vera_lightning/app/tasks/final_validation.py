"""The metrics after training without validating twice.

``train`` reports the validation metrics of the trained model. When ``fit`` already validated at its
last step (``val_check_interval: 1.0`` at the end of the last epoch, the usual case), running
``trainer.validate`` again repeats the same work: for generation data that is a whole second pass of
generation. :class:`ValidationMemo` keeps the metrics of the last validation inside ``fit`` together
with the step and a fingerprint of the model's parameters; :func:`final_metrics` reuses them only when
nothing changed since (same step, same parameters: a callback that swaps weights at the end of
training, such as stochastic weight averaging, changes the fingerprint), and validates otherwise.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch

__all__ = ["ValidationMemo", "final_metrics", "validation_metrics"]


def _fingerprint(module: torch.nn.Module) -> tuple[float, ...]:
    """A cheap digest of every parameter's values (sum and sum of squares in float64)."""
    with torch.no_grad():
        sums = [(float(p.detach().double().sum()), float(p.detach().double().square().sum()))
                for p in module.parameters()]
    return tuple(v for pair in sums for v in pair)


class ValidationMemo(pl.Callback):
    """Remembers the ``val/...`` metrics of the last validation run inside ``fit`` (not the sanity check)."""

    def __init__(self) -> None:
        self.step: Optional[int] = None
        self.metrics: dict[str, float] = {}
        self.fingerprint: Optional[tuple[float, ...]] = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.step = trainer.global_step
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.fingerprint = _fingerprint(pl_module)

    def reusable(self, trainer: pl.Trainer, module: pl.LightningModule) -> Optional[dict[str, float]]:
        """The remembered metrics if they describe ``module`` as it is now, else ``None``."""
        if self.step is None or not self.metrics or self.step != trainer.global_step:
            return None
        if _fingerprint(module) != self.fingerprint:
            return None
        return dict(self.metrics)


def validation_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics ``trainer.validate`` returned (its one dataloader's), as floats."""
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def final_metrics(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any,
                  memo: Optional[ValidationMemo]) -> tuple[dict[str, float], bool]:
    """``(metrics, reused)``: the trained model's validation metrics, validating only when ``memo`` cannot answer."""
    remembered = memo.reusable(trainer, module) if memo is not None else None
    if remembered is not None:
        return remembered, True
    return validation_metrics(trainer.validate(module, datamodule=datamodule, verbose=False)), False
