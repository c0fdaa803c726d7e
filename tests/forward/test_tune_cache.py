"""vera_lightning/forward/tune_cache.py (TuneFile): concurrent writers of the autotune file keep every entry.

The choices themselves (what is measured, when the file is read) are tested in tests/forward/test_autotune.py.
"""

from __future__ import annotations

import json
import multiprocessing
import sys

import pytest

from vera_lightning.forward.tune_cache import FORMAT, TuneFile

WRITERS, STORES = 6, 30


def _writer(path: str, worker: int, start) -> None:
    start.wait()  # all writers begin together, so their read-merge-writes overlap
    cache = TuneFile(path)
    for i in range(STORES):
        assert cache.store("machine", f"w{worker} k{i}", {"path": "lean", "ms": {"lean": float(i)}})


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock is POSIX")
def test_concurrent_writers_never_lose_each_others_entries(tmp_path):
    path = tmp_path / "autotune.json"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(str(path), w, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["format"] == FORMAT
    assert sorted(doc["machines"]["machine"]) == sorted(f"w{w} k{i}" for w in range(WRITERS) for i in range(STORES))
    assert TuneFile(path).load("machine")["w5 k29"] == {"path": "lean", "ms": {"lean": 29.0}}
    # the lock is a sidecar beside the file; no temporary file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".autotune.json.lock", "autotune.json"]


def test_an_unwritable_directory_warns_once_and_keeps_choices_in_the_process(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("mine\n", encoding="utf-8")
    cache = TuneFile(blocker / "autotune.json")
    with pytest.warns(RuntimeWarning, match="cannot write the cache file .*not-a-dir/autotune.json"):
        assert cache.store("machine", "k", {"path": "lean"}) is False
    assert cache.writable is False and cache.store("machine", "k2", {"path": "lean"}) is False
    assert blocker.read_text(encoding="utf-8") == "mine\n"
