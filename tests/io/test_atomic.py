"""vera_lightning/io/atomic.py and the save path: saves that never lose data (atomic, locked, cleaned up)
and reads that never mix versions or open what is not a regular file (issue 10, items 3, 4, 12).

Modules: vera_lightning/io/locks.py, vera_lightning/io/reads.py, vera_lightning/io/adapter_files.py (what an
adapter directory may hold: refused targets, the model card, named sub-adapters' folders kept).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers.files import CFG, WEIGHTS, filled_adapter, loaded_value
from helpers.models import MLP

from vera_lightning import VeraConfig, add_adapter, find_adapter, load_adapter, save_adapter
from vera_lightning.core.lookup import vera_layers
from vera_lightning.io import locks, reads


def _leftovers(parent: Path) -> list[str]:
    return sorted(e for e in os.listdir(parent) if e.startswith("."))


# ---------------------------------------------------------------------- README (item 3)
def test_directory_with_only_the_users_readme_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.md").write_text("my notes")
    with pytest.raises(ValueError, match=r"refuses to replace .*\['README.md'\], which are not adapter files"):
        save_adapter(filled_adapter(0.5), tmp_path / "a")
    assert os.listdir(tmp_path / "a") == ["README.md"] and (tmp_path / "a" / "README.md").read_text() == "my notes"


def test_model_card_of_an_adapter_directory_is_kept(tmp_path):
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("model card")  # as PEFT's save_pretrained writes one
    save_adapter(filled_adapter(0.25), tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "model card" and loaded_value(tmp_path / "a") == 0.25


# ---------------------------------------------------------------------- kills (item 4)
_KILLED_SAVE = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, "tests")
    from helpers.files import filled_adapter
    from vera_lightning import save_adapter
    from vera_lightning.io import atomic
    where = sys.argv[2]
    if where == "after-exchange":            # the swap happened; cleanup never runs
        real = atomic._exchange
        def exchange(a, b):
            real(a, b)
            os._exit(9)
        atomic._exchange = exchange
    elif where == "between-renames":         # fallback without RENAME_EXCHANGE, killed between its two renames
        atomic._exchange = lambda a, b: False
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if src.endswith(os.path.join("", "a")):
                os._exit(9)
        atomic.os.rename = rename
    save_adapter(filled_adapter(0.25), sys.argv[1])
""")


@pytest.mark.slow  # a subprocess importing torch + lightning: ~10-20 s on a loaded 2-core machine
@pytest.mark.parametrize("where", ["after-exchange", "between-renames"])
def test_killed_save_leaves_a_complete_adapter_and_the_next_save_cleans_up(tmp_path, where):
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "a"), where], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert _leftovers(tmp_path) == [".a.vera-tmp"]
    # readers see a complete adapter: the new one (swapped in) or the old one (parked mid-fallback)
    assert loaded_value(tmp_path / "a") == (0.25 if where == "after-exchange" else 0.5)
    save_adapter(filled_adapter(0.125), tmp_path / "a")
    assert _leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["a"]
    assert loaded_value(tmp_path / "a") == 0.125


def test_leftovers_of_0_1_0_saves_are_restored_or_removed(tmp_path):
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / ".a.tmp-x1y2.old")  # 0.1.0 killed between its renames
    (tmp_path / ".a.tmp-x1y2").mkdir()
    save_adapter(filled_adapter(0.25), tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == ["a"] and loaded_value(tmp_path / "a") == 0.25


_SAVE_LOOP = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    from helpers.files import filled_adapter
    from vera_lightning import save_adapter
    models = [filled_adapter(0.5), filled_adapter(0.25)]
    print("ready", flush=True)
    for i in range(int(sys.argv[2])):
        save_adapter(models[i % 2], sys.argv[1])
""")


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_loadable_adapter(tmp_path):
    import random

    rng = random.Random(0)
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(tmp_path / "a"), "100000"],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert loaded_value(tmp_path / "a") in (0.5, 0.25)
    save_adapter(filled_adapter(0.125), tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == ["a"]


# ---------------------------------------------------------------------- concurrency (item 4)
@pytest.mark.slow
def test_two_processes_saving_to_one_directory_serialise(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(tmp_path / "a"), "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["a"] and loaded_value(tmp_path / "a") in (0.5, 0.25)


def test_threads_saving_to_one_directory_serialise(tmp_path):
    errors: list[BaseException] = []
    models = [filled_adapter(0.5), filled_adapter(0.25)]

    def work(k):
        try:
            for i in range(8):
                save_adapter(models[(i + k) % 2], tmp_path / "a")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and sorted(os.listdir(tmp_path)) == ["a"]
    assert loaded_value(tmp_path / "a") in (0.5, 0.25)


def test_reader_racing_a_writer_always_reads_one_complete_version(tmp_path):
    models = [filled_adapter(0.5), filled_adapter(0.25)]
    save_adapter(models[0], tmp_path / "a")
    stop, errors, seen = threading.Event(), [], set()

    def writer():
        i = 0
        while not stop.is_set():
            save_adapter(models[i % 2], tmp_path / "a")
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(60):
            try:
                seen.add(loaded_value(tmp_path / "a"))
            except Exception as err:  # noqa: BLE001 - any error is the failure
                errors.append(err)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and seen <= {0.5, 0.25}


def test_a_save_landing_between_the_readers_two_reads_is_not_a_checksum_mismatch(tmp_path, monkeypatch):
    """Deterministic version of the race: a writer replaces the adapter right after the reader has read
    the first part (0.1.0: the header's checksum; now: adapter_config.json) and before the tensors."""
    import safetensors.torch

    models = [filled_adapter(0.5), filled_adapter(0.25)]
    save_adapter(models[0], tmp_path / "a")
    fired = []

    def writer_strikes():
        if not fired:
            fired.append(True)
            save_adapter(models[1], tmp_path / "a")

    real_load_file, real_read_one = safetensors.torch.load_file, reads._read_one

    def load_file(*args, **kwargs):  # how 0.1.0 read the tensors, after reading the header separately
        writer_strikes()
        return real_load_file(*args, **kwargs)

    def read_one(dir_fd, name, *args):  # how the reader reads each file now
        if name == WEIGHTS:
            writer_strikes()
        return real_read_one(dir_fd, name, *args)

    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    monkeypatch.setattr(reads, "_read_one", read_one)
    assert loaded_value(tmp_path / "a") == 0.25 and fired  # the version published while it was read


def test_lock_held_too_long_is_a_clear_timeout(tmp_path):
    (tmp_path / "a").mkdir()
    with locks.locked(str(tmp_path / "a")):
        with pytest.raises(TimeoutError, match=r"another process has been saving into .* nothing was written"):
            with locks.locked(str(tmp_path / "a"), timeout=0.1):
                pass


# ---------------------------------------------------------------------- I/O errors (item 12)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_full_or_read_only_names_the_path_and_says_nothing_changed(tmp_path, monkeypatch, code):
    import vera_lightning.io.adapter_files as adapter_files

    save_adapter(filled_adapter(0.5), tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS).read_bytes()

    def fail(tensors, filename, metadata=None):
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(adapter_files, "write_safetensors", fail)
    with pytest.raises(OSError, match=rf"could not write '{tmp_path}/a': {os.strerror(code)}\. Nothing was changed: "
                                      r"'.*/a' still holds the previous adapter"):
        save_adapter(filled_adapter(0.25), tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a"]
    with pytest.raises(OSError, match=r"Nothing was changed: '.*/b' was not created"):
        save_adapter(filled_adapter(0.25), tmp_path / "b")
    assert sorted(os.listdir(tmp_path)) == ["a"]


@pytest.mark.parametrize("path", ["", "   "])
def test_empty_directory_name_is_refused(path):
    with pytest.raises(ValueError, match=r"save_adapter: directory=.* is empty; give the directory to write"):
        save_adapter(filled_adapter(0.5), path)


# ---------------------------------------------------------------------- what is read (items 10, 12)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_weights_that_are_not_a_regular_file_are_named(tmp_path, kind):
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    path = tmp_path / "a" / WEIGHTS
    path.unlink()
    {"fifo": lambda: os.mkfifo(path), "dev-zero": lambda: path.symlink_to("/dev/zero"),
     "directory": lambda: path.mkdir()}[kind]()
    what = {"fifo": "a FIFO", "dev-zero": "a character device", "directory": "a directory"}[kind]
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors is {what}, not a regular file"):
        load_adapter(MLP(), tmp_path / "a")


def test_config_and_weights_come_from_one_version(tmp_path):
    """The header's checksum and the tensors are parsed from the same bytes (no second open)."""
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    files = reads.read_files(str(tmp_path / "a"), ["adapter_config.json", WEIGHTS, "missing.bin"])
    assert json.loads(files["adapter_config.json"])["peft_type"] == "VERA"
    assert files[WEIGHTS] == (tmp_path / "a" / WEIGHTS).read_bytes() and files["missing.bin"] is None


# ---------------------------------------------------------------------- named adapters' folders (issue 23, item 12)
def _named_adapters(values: dict[str, float]):
    """An MLP holding the adapters ``values`` names (the first the primary), each λ equal to its value."""
    names = list(values)
    model = filled_adapter(values[names[0]])
    for name in names[1:]:
        add_adapter(model, name, VeraConfig(**CFG))
    adapter = find_adapter(model)
    with torch.no_grad():
        for name in names[1:]:
            for _, layer in vera_layers(model):
                for attr in adapter.lambda_names(name):
                    getattr(layer, attr).fill_(values[name])
    return model


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too), by relative path: what a refused save must leave alone."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _peft_root(root: Path, model) -> None:
    """The documented multi-adapter layout: the primary adapter in ``root``, the others in ``root/<name>``."""
    save_adapter(model, root)
    for name in ("b", "c"):
        save_adapter(model, root / name, adapter_name=name)
    (root / "README.md").write_text("model card")  # as PEFT's save_pretrained writes one


def test_resaving_the_primary_adapter_keeps_its_named_adapters_folders(tmp_path):
    root = tmp_path / "root"
    _peft_root(root, _named_adapters({"default": 0.5, "b": 0.25, "c": 0.125}))
    subs = {k: v for k, v in _tree(root).items() if "/" in k}
    assert sorted(subs) == [f"{n}/{f}" for n in ("b", "c") for f in ("adapter_config.json", WEIGHTS)]

    save_adapter(_named_adapters({"default": 0.75, "b": 0.0, "c": 0.0}), root)  # refused before: "not adapter files"
    after = _tree(root)
    assert loaded_value(root) == 0.75 and after["README.md"] == b"model card"
    assert {k: v for k, v in after.items() if "/" in k} == subs  # byte for byte
    assert sorted(os.listdir(root)) == ["README.md", "adapter_config.json", WEIGHTS, "b", "c"]
    assert _leftovers(tmp_path) == [] and _leftovers(root) == []
    assert loaded_value(root / "b") == 0.25 and loaded_value(root / "c") == 0.125
    model = load_adapter(_named_adapters({"default": 0.0, "b": 0.0}), root, adapter_name="b")  # PEFT's root layout
    assert {float(layer.vera_lambda_b_b[0]) for _, layer in vera_layers(model)} == {0.25}
    save_adapter(_named_adapters({"default": 0.0, "b": 0.375}), root / "b", adapter_name="b")  # and the folders too
    assert loaded_value(root / "b") == 0.375 and loaded_value(root) == 0.75


def test_a_root_holding_only_named_adapters_takes_the_primary(tmp_path):
    model = _named_adapters({"default": 0.5, "b": 0.25})
    save_adapter(model, tmp_path / "root" / "b", adapter_name="b")
    save_adapter(model, tmp_path / "root")
    assert loaded_value(tmp_path / "root") == 0.5 and loaded_value(tmp_path / "root" / "b") == 0.25


@pytest.mark.parametrize("foreign", ["notes.txt", "data/train.tsv", "b/notes.txt", "ckpt.d/adapter_config.json",
                                     "link"])
def test_foreign_files_beside_named_adapters_are_still_refused(tmp_path, foreign):
    root = tmp_path / "root"
    _peft_root(root, _named_adapters({"default": 0.5, "b": 0.25, "c": 0.125}))
    if foreign == "link":  # a symlink to a user's adapter folder is not ours to copy
        save_adapter(filled_adapter(0.5), tmp_path / "elsewhere")
        (root / "link").symlink_to(tmp_path / "elsewhere")
    else:
        (root / foreign).parent.mkdir(exist_ok=True)
        (root / foreign).write_text("mine")
    before = _tree(root)
    shown = foreign.split("/")[0]
    with pytest.raises(ValueError, match=rf"refuses to replace .*\['{shown}'\], which are not adapter files .*nor "
                                         r"named adapters' folders .*nothing was changed"):
        save_adapter(_named_adapters({"default": 0.75, "b": 0.0, "c": 0.0}), root)
    assert _tree(root) == before and _leftovers(tmp_path) == []


def test_a_killed_named_adapter_save_is_cleaned_when_the_root_is_saved(tmp_path):
    root = tmp_path / "root"
    _peft_root(root, _named_adapters({"default": 0.5, "b": 0.25, "c": 0.125}))
    (root / ".b.vera-tmp" / "new").mkdir(parents=True)  # what a save of root/b killed mid-way leaves
    (root / ".b.vera-tmp" / "new" / WEIGHTS).write_bytes(b"half")
    save_adapter(filled_adapter(0.75), root)
    assert sorted(os.listdir(root)) == ["README.md", "adapter_config.json", WEIGHTS, "b", "c"]
    assert loaded_value(root) == 0.75 and loaded_value(root / "b") == 0.25


def test_named_adapter_saves_racing_a_root_save_are_never_lost(tmp_path):
    root = tmp_path / "root"
    _peft_root(root, _named_adapters({"default": 0.5, "b": 0.25, "c": 0.125}))
    primaries = [filled_adapter(0.5), filled_adapter(0.75)]
    subs = [_named_adapters({"default": 0.0, "b": v}) for v in (0.25, 0.375, 0.0625)]
    errors: list[BaseException] = []

    def work(save):
        try:
            save()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def roots():
        for i in range(8):
            save_adapter(primaries[i % 2], root)

    def named():
        for i in range(9):
            save_adapter(subs[i % 3], root / "b", adapter_name="b")

    threads = [threading.Thread(target=work, args=(f,)) for f in (roots, named)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert loaded_value(root) == 0.75 and loaded_value(root / "b") == 0.0625  # the last save of each
    assert loaded_value(root / "c") == 0.125 and _leftovers(root) == [] and _leftovers(tmp_path) == []


def test_a_lock_on_a_directory_swapped_while_waiting_is_taken_on_the_new_one(tmp_path):
    """A save of ``root/b`` that waited while ``root`` was replaced locks the new ``root`` (what later saves lock)."""
    root = tmp_path / "root"
    root.mkdir()
    waiting, holding, release = threading.Event(), threading.Event(), threading.Event()

    def second_writer():
        waiting.set()
        with locks.locked(str(root / "b")):
            holding.set()
            release.wait(10)

    with locks.locked_subfolders(str(root)):
        thread = threading.Thread(target=second_writer)
        thread.start()
        waiting.wait(10)
        time.sleep(0.1)  # it waits on the lock of the old root
        os.rename(root, tmp_path / "old")
        root.mkdir()  # root replaced (as a save of it swaps in a new version)
    try:
        assert holding.wait(10)
        with pytest.raises(TimeoutError):  # the new root's lock is the one held
            with locks.locked(str(root / "c"), timeout=0.1):
                pass
    finally:
        release.set()
        thread.join()
