"""What a run trains and how it is scored: the LightningModules and the fine-tuning methods.

* :mod:`.module`            sequence classification/regression and causal-LM LightningModules
* :mod:`.task_metrics`      the torchmetrics of a sequence task
* :mod:`.finetune`          ``finetune=vera|head|full``: what is injected, frozen and saved
* :mod:`.final_validation`  the metrics after training without validating twice

Imports :mod:`~vera_lightning.app.data`, :mod:`~vera_lightning.app.generation` and
:mod:`~vera_lightning.app.models` below it.
"""
