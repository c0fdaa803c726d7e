"""The validation metrics of a sequence task: torchmetrics objects built from ``data.metrics`` or the defaults.

``data.metrics`` maps a name to a Hydra node (``{_target_: torchmetrics class, **kwargs}``) logged as
``val/<name>``; without one, classification gets accuracy and macro F1 and regression (one label)
Pearson and Spearman. Generation metrics (BLEU, ROUGE-L, chrF) are :mod:`vera_lightning.app.generation.textmetrics`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from hydra.utils import instantiate
from torchmetrics import Metric, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

__all__ = ["default_metrics", "build_metrics"]


def default_metrics(num_labels: int) -> dict[str, Metric]:
    """Accuracy and macro F1 for ``num_labels`` classes; Pearson and Spearman for regression (1)."""
    if num_labels == 1:
        return {"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()}
    return {
        "acc": MulticlassAccuracy(num_classes=num_labels, average="micro"),
        "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
    }


def build_metrics(specs: Optional[Mapping[str, Any]]) -> Optional[dict[str, Metric]]:
    """Instantiate ``data.metrics`` (``{name: {_target_: ..., **kwargs}}``); ``None`` for none given.

    Raises:
        ValueError: Naming the ``data.metrics.<name>`` entry that fails to build or is not a torchmetrics
            ``Metric``.
    """
    if not specs:
        return None
    metrics = {}
    for name, spec in specs.items():
        try:
            metric = instantiate(spec)
        except Exception as error:  # hydra wraps import and argument errors alike
            raise ValueError(f"data.metrics.{name}={spec!r} could not be built: {error}") from None
        if not isinstance(metric, Metric):
            raise ValueError(
                f"data.metrics.{name}: {type(metric).__name__} is not a torchmetrics Metric; give a _target_ "
                "such as torchmetrics.classification.BinaryF1Score"
            )
        metrics[str(name)] = metric
    return metrics
