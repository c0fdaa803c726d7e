"""Generation, its settings and its metrics.

* :mod:`.generate`        batched ``model.generate`` for a list of prompts, one ``generate:`` node's settings
* :mod:`.textmetrics`     BLEU, ROUGE-L, chrF against several references
* :mod:`.val_generation`  generation metrics at validation (prompts picked, sharded over ranks, scored)

Imports only :mod:`vera_lightning.app.data` below it.
"""
