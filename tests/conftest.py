"""Fixtures shared by the whole suite (helpers live in the ``helpers`` package, not here)."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

import pytest
import torch
from helpers.models import TINY_MODELS


def pytest_configure(config: pytest.Config) -> None:
    # Never download in a test: transformers and the Hub client stay offline for the whole session.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # "auto" measures paths by default; the suite asserts the cost model's choices and must not depend on
    # timing or write ~/.cache: tuning off (tests/forward/test_autotune.py turns it on with configure_autotune)
    os.environ.setdefault("VERA_LIGHTNING_AUTOTUNE", "0")
    os.environ.setdefault("VERA_LIGHTNING_AUTOTUNE_CACHE", "off")
    # the tokenised-data cache (data.cache_dir null -> $VERA_DATA_CACHE) in a folder of this session, never ~/.cache
    if "VERA_DATA_CACHE" not in os.environ:
        os.environ["VERA_DATA_CACHE"] = config._vera_data_cache = tempfile.mkdtemp(prefix="vera-test-data-cache-")
        os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(config._vera_data_cache, "hf-datasets"))


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_vera_data_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def twin():
    """``twin(kind)`` -> (base, copy) of the same tiny model."""

    def make(kind: str):
        torch.manual_seed(0)
        base = TINY_MODELS[kind][0]()
        return base, copy.deepcopy(base)

    return make


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Benchmark entry points called in-process set torch's thread count; no test leaks it to the next
    (a different thread count changes reduction order, and with it the last bits of trained values)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
