"""The entry points' work: config -> plan -> checks -> build -> work -> publish (train, evaluate, predict, export).

* :mod:`.configs`         :func:`register_configs`: the schemas Hydra checks when it composes
* :mod:`.options`         the keys each command and group accepts (an unknown ``+key`` is refused)
* :mod:`.checks`          startup checks of a composed config's values
* :mod:`.planning`        :func:`make_plan`: the :class:`~vera_lightning.app.runs.plan.RunPlan` of a composed config
* :mod:`.preflight`       every check of a plan that needs no training, before anything is built or written
* :mod:`.build`           one place that builds tokenizer, model, data and module from a plan
* :mod:`.adapters`        what ``adapter=PATH`` names (adapter dir, slim .ckpt, merged model) and loading it
* :mod:`.cli`             the error boundary of the entry points
* :mod:`.train`           ``train(cfg) -> metrics``
* :mod:`.evaluate`        ``evaluate(cfg) -> metrics``
* :mod:`.predict`         ``predict(cfg) -> output file``
* :mod:`.export`          ``export(cfg) -> ExportResult``: merged model, PEFT LoRA or GGUF LoRA
* :mod:`.export_plan`     export's typed options and its plan, resolved and checked before anything is loaded
* :mod:`.export_base`     the base an export merges onto or names, checked against the adapter's training run
* :mod:`.export_output`   export's output rules: never an input or foreign files, the check under the lock
* :mod:`.export_adapter`  what ``adapter=`` names for an export, resolved without loading a model

Top floor of the app: may import every sub-package below it.
"""
