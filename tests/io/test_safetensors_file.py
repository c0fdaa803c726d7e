"""vera_lightning/io/safetensors_file.py: the same tensors and metadata give the same bytes in every process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from vera_lightning.io.safetensors_file import canonical_header, write_safetensors

METADATA = {f"key{i}": f"value {i} é" for i in range(12)}

WRITE = """
import sys, torch
from vera_lightning.io.safetensors_file import write_safetensors
g = torch.Generator().manual_seed(0)
t = {f"t{i}": torch.randn(3, i + 1, generator=g) for i in range(6)} | {"h": torch.ones(5, dtype=torch.bfloat16)}
write_safetensors(t, sys.argv[1], metadata={f"key{i}": f"value {i} é" for i in range(12)})
"""


def test_two_processes_write_the_same_bytes(tmp_path):
    # safetensors' own save orders __metadata__ by a per-process hash; ours must not depend on it
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", WRITE, str(tmp_path / name)], check=True)
    first = (tmp_path / "a").read_bytes()
    assert (tmp_path / "b").read_bytes() == first
    assert (tmp_path / "c").read_bytes() == first


def test_the_file_reads_back_as_written(tmp_path):
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int64),
               "h": torch.ones(2, dtype=torch.bfloat16)}
    write_safetensors(tensors, str(tmp_path / "f.safetensors"), metadata=METADATA)
    back = load_file(str(tmp_path / "f.safetensors"))
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(back[name], value) and back[name].dtype == value.dtype
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as fh:
        assert fh.metadata() == METADATA


def test_the_header_keeps_its_length_and_the_data_its_bytes():
    data = save({"x": torch.randn(7), "y": torch.randn(2, 2)}, metadata=METADATA)
    out = canonical_header(data)
    assert len(out) == len(data) and out[:8] == data[:8]
    size = int.from_bytes(data[:8], "little")
    assert out[8 + size:] == data[8 + size:]  # tensor bytes untouched
    assert canonical_header(out) == out  # idempotent


def test_a_file_that_is_not_safetensors_is_named():
    with pytest.raises(ValueError, match="header length"):
        canonical_header(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match="shorter"):
        canonical_header(b"abc")
