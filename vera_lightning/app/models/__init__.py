"""The model and tokenizer a ``model/`` config names.

* :mod:`.load`        Hugging Face models and tokenizers (hub id, local path, packaged folder, GGUF), quantized bases
* :mod:`.gguf_cache`  GGUF files shipped inside a Python package, converted once into a cache

Imports nothing of the app's other sub-packages.
"""
