"""Data formats and their tokenisation: what a ``data/`` config reads, checked row by row.

* :mod:`.text_files`  the message for a file that is not UTF-8
* :mod:`.tables`      GLUE-style tables (text, optional pair, label), labels as class ids or floats
* :mod:`.sft`         prompt/response and chat rows for causal LMs, prompt formatting
* :mod:`.sft_tokens`  tokenising those rows: label masks, truncation rules
* :mod:`.packing`     padding, length-grouped batches, packing several examples per row
* :mod:`.datamodules` the LightningDataModules built from a ``data/`` config

Lowest floor of the app: imports nothing else of it.
"""
