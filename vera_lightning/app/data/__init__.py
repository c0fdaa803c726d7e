"""Data formats and their tokenisation: what a ``data/`` config reads, checked row by row.

* :mod:`.schema`      the ``data`` group's schema, checked when Hydra composes
* :mod:`.text_files`  reading users' text files line by line, the message for bytes that are not UTF-8
* :mod:`.tables`      GLUE-style tables (text, optional pair, label), labels as class ids or floats
* :mod:`.sft_rows`    reading and checking prompt/response and chat rows for causal LMs
* :mod:`.sft`         prompt formatting, prompt token ids, references, length limits
* :mod:`.sft_tokens`  tokenising those rows: label masks, truncation rules
* :mod:`.packing`     padding, length-grouped batches, packing several examples per row
* :mod:`.fingerprint` what keys the tokenised-data cache: a file's content, the tokenizer, the settings
* :mod:`.cache`       the tokenised-data cache: entries built once, renamed into place, under a lock
* :mod:`.arrow_splits` a split's checked rows and tokens as memory-mapped Arrow tables (``datasets``)
* :mod:`.arrow_items` lazy views of those tables for the DataLoader (per batch, packed rows, rows)
* :mod:`.inputs`      what ``predict.py`` reads from ``input=FILE``, checked before any model is built
* :mod:`.datamodules` the LightningDataModules built from a ``data/`` config

Lowest floor of the app: imports nothing else of it.
"""
