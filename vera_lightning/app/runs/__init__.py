"""Run directories and what is recorded in them: checks, resume, records, trackers, sweep summaries.

* :mod:`.run_dirs`  what a run directory holds, the checks before a run may use it, resuming
* :mod:`.records`   what a training run writes into its directory, once it has passed every check
* :mod:`.trackers`  config and adapter artifacts for MLflow / W&B
* :mod:`.sweep`     the multirun summary (a Hydra callback)

Imports the floors below it only.
"""
