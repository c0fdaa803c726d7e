"""benchmarks/gpu_check.sh without CUDA: one clear refusal, a non-zero exit, nothing run or written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself (make gpu-check)")
def test_refuses_at_once_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device here (")
    assert "this check needs a CUDA machine; nothing was run." in lines[0]
    assert done.stdout == "" and list(tmp_path.iterdir()) == []  # no results file, no log folder


def test_without_a_results_path_says_how_to_call_it(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: benchmarks/gpu_check.sh RESULTS.json" in done.stderr
    assert list(tmp_path.iterdir()) == []
