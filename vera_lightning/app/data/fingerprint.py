"""Fingerprints that key the tokenised-data cache (:mod:`vera_lightning.app.data.cache`).

A cache entry is reused only when every input of the tokenisation is the same:

* the **file's content** (:func:`file_digest`: SHA-256 of its bytes, never its size or modification time alone;
  memoised per process by path, size, modification and status-change times and inode, so a file is read once
  per run), or a Hugging
  Face dataset's own fingerprint (``format: hf``);
* the **tokenizer** (:func:`tokenizer_fingerprint`: its class, its whole serialised vocabulary, merges, normaliser and
  post-processor where it is a fast tokenizer, else its vocabulary, plus its special tokens and chat template);
* every **data setting that changes tokens** (:func:`token_settings`: all of ``DataSchema``'s keys except those
  listed in :data:`UNTOKENISED`, which only choose, batch or schedule rows);
* the versions of this code's encoding (:data:`CACHE_VERSION`), of ``transformers`` and of ``tokenizers``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["CACHE_VERSION", "UNTOKENISED", "file_digest", "tokenizer_fingerprint", "token_settings", "cache_key"]

#: Bumped whenever what is stored for a row changes (its columns, the encoding rules).
CACHE_VERSION = 1

#: Data settings that never change a row's tokens: which rows are drawn, how they are batched, where things are.
#: ``packing`` and ``group_by_length`` are passes over the cached lengths, so they are not part of the key either.
UNTOKENISED = frozenset({
    "name", "data_dir", "train_file", "val_file", "num_labels", "metrics", "batch_size", "eval_batch_size",
    "max_train_samples", "max_val_samples", "num_workers", "seed", "monitor", "monitor_mode", "group_by_length",
    "packing", "cache", "cache_dir", "streaming", "pad_to_multiple_of",
})

_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 4 MiB blocks), memoised per process while the file is unchanged (its
    status change time too, which a write always moves and ``touch``/``os.utime`` cannot set back)."""
    stat = os.stat(path)
    memo = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 over everything of a tokenizer that decides its tokens (see the module docstring)."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    parts = [type(tokenizer).__name__, transformers.__version__, tokenizers.__version__,
             str(getattr(tokenizer, "chat_template", None)),
             json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
             str(getattr(tokenizer, "padding_side", None)), str(getattr(tokenizer, "truncation_side", None))]
    for part in parts:
        digest.update(part.encode("utf-8") + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        digest.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def token_settings(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The data settings that change a row's tokens (every key not in :data:`UNTOKENISED`), sorted by name."""
    return {key: data_cfg[key] for key in sorted(data_cfg) if key not in UNTOKENISED}


def cache_key(source: str, tokenizer_fp: str, data_cfg: Mapping[str, Any]) -> str:
    """The cache entry's name: SHA-256 of the source's fingerprint, the tokenizer's, the token settings and the
    code version (a file read as both splits is one entry)."""
    payload = json.dumps({"version": CACHE_VERSION, "source": source, "tokenizer": tokenizer_fp,
                          "settings": token_settings(data_cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
