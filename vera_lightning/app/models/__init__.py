"""The model and tokenizer a ``model/`` config names, and the precision a run trains in.

* :mod:`.schema`              the ``model`` group's schema, checked when Hydra composes
* :mod:`.load`                Hugging Face models and tokenizers (hub id, local path, package, GGUF), quantized bases
* :mod:`.gguf_cache`          GGUF files shipped inside a Python package, converted once into a cache
* :mod:`.precision_choice`    the precision decided once (``compute_dtype`` for device, method, Trainer) or replayed
* :mod:`.precision_decision`  :class:`PrecisionDecision`, the record of that decision in the plan and the adapter
* :mod:`.precision`           the decided precision applied: dtype casts, quantization, ``model.compile``
* :mod:`.trained_float32`     trained tensors kept as float32 masters in a half-precision base

Imports nothing of the app's other sub-packages.
"""
