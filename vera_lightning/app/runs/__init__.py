"""Run directories and what is recorded in them: the plan, checks, resume, records, trackers, sweep summary.

* :mod:`.plan`         :class:`RunPlan`: one command's settings resolved once; ``plan.json``, recorded and replayed
* :mod:`.run_dirs`     what a run directory holds, the checks before a run may use it, resuming
* :mod:`.resume_data`  a resume continues on the data it started with (the run's ``data`` settings)
* :mod:`.records`      what a training run writes into its directory, once it has passed every check
* :mod:`.checkpoints`  the run's checkpoint files (``best.ckpt``, ``last.ckpt``), one name per file
* :mod:`.trackers`     config and adapter artifacts for MLflow / W&B
* :mod:`.sweep`        the multirun summary (a Hydra callback)

Imports the floors below it only.
"""
