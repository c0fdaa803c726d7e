"""The entry points' work: settings checked, components built, then train / evaluate / predict.

* :mod:`.checks`    startup checks of a composed config
* :mod:`.build`     one place that builds tokenizer, model, data and module from a config
* :mod:`.adapters`  what ``adapter=PATH`` names (adapter dir, slim .ckpt, merged model) and loading it
* :mod:`.cli`       the error boundary of the entry points
* :mod:`.train`     ``train(cfg) -> metrics``
* :mod:`.evaluate`  ``evaluate(cfg) -> metrics``
* :mod:`.predict`   ``predict(cfg) -> output file``

Top floor of the app: may import every sub-package below it.
"""
