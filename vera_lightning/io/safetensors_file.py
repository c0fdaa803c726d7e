"""Safetensors files with the same bytes for the same content.

``safetensors`` serialises the header's ``__metadata__`` from a hash map whose order changes from one
process to the next, so saving the same tensors and metadata twice gave two different files. An export
run again with ``overwrite=true``, or an adapter saved twice, must give the same bytes (users hash
them), so :func:`write_safetensors` rewrites the header with its keys sorted. The header keeps its
length (the same keys and values), so the tensor offsets and the 8-byte alignment are unchanged.
"""

from __future__ import annotations

import json
import struct
from typing import Optional

import torch

__all__ = ["canonical_header", "write_safetensors"]


def canonical_header(data: bytes) -> bytes:
    """``data`` (a whole safetensors file) with its JSON header's keys in sorted order, padded with spaces
    to the original header length; the tensor bytes after it are untouched.

    Raises:
        ValueError: If ``data`` is not a safetensors file.
    """
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError(f"not a safetensors file: header length {size} exceeds the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > size:  # never: the same keys and values in another order
        raise ValueError(f"the sorted header ({len(text)} bytes) is longer than the original ({size})")
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size:]


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None) -> None:
    """Save ``tensors`` (and string ``metadata``) to ``path`` as safetensors, byte-identical for equal input.

    The caller owns atomicity (write into a staging folder and publish it); this writes ``path`` directly.
    """
    from safetensors.torch import save

    with open(path, "wb") as fh:
        fh.write(canonical_header(save(tensors, metadata=metadata)))
