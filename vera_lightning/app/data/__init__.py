"""Data formats and their tokenisation: what a ``data/`` config reads, checked row by row.

* :mod:`.schema`      the ``data`` group's schema, checked when Hydra composes
* :mod:`.text_files`  reading users' text files line by line, the message for bytes that are not UTF-8
* :mod:`.tables`      GLUE-style tables (text, optional pair, label), labels as class ids or floats
* :mod:`.sft_rows`    reading and checking prompt/response and chat rows for causal LMs
* :mod:`.sft`         prompt formatting, prompt token ids, references, length limits
* :mod:`.sft_tokens`  tokenising those rows: label masks, truncation rules
* :mod:`.packing`     padding, length-grouped batches, packing several examples per row
* :mod:`.inputs`      what ``predict.py`` reads from ``input=FILE``, checked before any model is built
* :mod:`.datamodules` the LightningDataModules built from a ``data/`` config

Lowest floor of the app: imports nothing else of it.
"""
