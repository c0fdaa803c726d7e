"""The export plan (vera_lightning/app/commands/export_plan.py), its base (vera_lightning/app/commands/export_base.py)
and its adapter (vera_lightning/app/commands/export_adapter.py): typed options, every problem in one message before
anything is loaded, the base and seed checked against the training run's record, a run directory resolved to its
adapter, and export_problems for train.py's preflight.

Every refusal is checked as an invariant: the temporary tree is byte for byte the same afterwards (names, modes,
bytes), and the model is never built (export._load is replaced by a failure).
"""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
from helpers.app import compose_app
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from test_export import KINDS, fake_run, refused, save_tokenizer, snapshot

from vera_lightning.app.commands import export as export_module
from vera_lightning.app.commands.export import export_run
from vera_lightning.app.commands.export_base import base_architecture
from vera_lightning.app.commands.export_plan import ExportPlan, export_problems, plan_export, register_export_schema


def earlier_gguf_lora(path):
    """A GGUF file whose header says LoRA adapter, as export_gguf_lora writes (no tensors)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()



@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def forbid_loading(monkeypatch) -> None:
    """From now on in the test, building the model fails: a refusal must come before it."""

    def load(plan):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(export_module, "_load", load)


@pytest.fixture
def no_load(monkeypatch):
    forbid_loading(monkeypatch)


def _model_cfg(run):
    return OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"))["model"]


@pytest.mark.parametrize("value", ["no", "off", "false", "true", 1, 0, None])
def test_overwrite_must_be_a_boolean(tmp_path, tokenizer_dir, monkeypatch, value):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir)
    export_run(run / "adapter", "lora", tmp_path / "out")
    forbid_loading(monkeypatch)
    (tmp_path / "out" / "notes.txt").write_text("kept")  # with overwrite read as true, this would be replaced
    message = refused(tmp_path, rf"overwrite={value!r}: must be true or false", run / "adapter", "lora",
                      tmp_path / "out", overwrite=value)
    assert "write overwrite=false or overwrite=true" in message


def test_every_problem_comes_in_one_message(tmp_path, tokenizer_dir, no_load):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir)
    earlier_gguf_lora(tmp_path / "earlier.gguf")  # an earlier gguf-lora export (its header says so)
    message = refused(tmp_path, "Cannot export", run / "adapter", "gguf-lora", tmp_path / "earlier.gguf",
                      rank=2.5, overwrite="no", dtype="fp16")
    for part in ("overwrite='no'", "dtype='fp16'", "rank=2.5 must be a positive integer",
                 "the base is a 'opt' model", "already holds an earlier gguf-lora export"):
        assert part in message, part
    assert "Traceback" not in message


def test_the_plan_is_one_frozen_record_of_what_will_happen(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "llama", tokenizer_dir)
    plan = plan_export(run / "adapter", "merged")
    assert isinstance(plan, ExportPlan)
    assert (plan.adapter.path, plan.format, plan.output, plan.overwrite, plan.dtype, plan.r) == (
        run / "adapter", "merged", run / "merged", False, "fp32", 8)
    assert (plan.base.seed, plan.base.model["name"], plan.run_dir) == (7, "llama", run)
    assert "its training run" in plan.base.origin
    with pytest.raises(AttributeError):
        plan.output = tmp_path  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.base.model["name"] = "other"  # type: ignore[index]


def test_a_run_directory_resolves_to_its_adapter_in_one_line(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir)
    said = []
    result = export_run(run, "lora", tmp_path / "lora", say=said.append)
    assert said == [f"[export] adapter={str(run)!r} is a training run: exporting its adapter ({run / 'adapter'})"]
    assert json.loads((result.output / "adapter_config.json").read_text())["peft_type"] == "LORA"
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    message = refused(tmp_path, r"adapter='.*stuff' is a directory holding \['notes.txt'\], not a VeRA adapter",
                      tmp_path / "stuff", "lora", tmp_path / "l")
    assert "merged model" not in message and "or the run directory itself" in message


def test_a_from_config_base_drawn_with_another_seed_is_refused(tmp_path, tokenizer_dir, no_load):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir, seed=7)
    given = {"model": _model_cfg(run), "data": {}}
    message = refused(tmp_path, r"seed=42: the adapter's training run drew its from_config base with seed=7",
                      run / "adapter", "merged", tmp_path / "m", base=given, seed=42)
    assert "Pass seed=7" in message
    refused(tmp_path, r"seed=42 \(given without model=\): the adapter's training run drew .* seed=7",
            run / "adapter", "merged", tmp_path / "m", seed=42)
    other = {**given["model"], "from_config": {**given["model"]["from_config"], "ffn_dim": 32}}
    refused(tmp_path, r"model=opt is not the base the adapter's training run used", run / "adapter", "merged",
            tmp_path / "m", base={"model": other})


def test_model_without_seed_takes_the_runs_seed_and_exports_the_same_model(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir, seed=7)
    export_run(run / "adapter", "merged", tmp_path / "own")
    result = export_run(run / "adapter", "merged", tmp_path / "given", base={"model": _model_cfg(run)})
    plan = plan_export(run / "adapter", "merged", tmp_path / "x", base={"model": _model_cfg(run)})
    assert "seed 7" in plan.base.source
    assert (result.output / "model.safetensors").read_bytes() == (tmp_path / "own" / "model.safetensors").read_bytes()


def test_a_run_without_its_record_asks_for_model_and_seed(tmp_path, tokenizer_dir, no_load):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir, seed=7)
    model_cfg = _model_cfg(run)
    shutil.rmtree(run / ".hydra")  # the adapter records base_model_name_or_path='opt', a from_config model's name
    message = refused(tmp_path, r"records base_model_name_or_path='opt', not a model folder but a model's name",
                      run / "adapter", "lora", tmp_path / "l")
    assert "model=opt seed=N" in message and "Hugging Face" not in message
    refused(tmp_path, r"model=opt is a from_config .* Pass the training run's seed: seed=N", run / "adapter", "lora",
            tmp_path / "l", base={"model": model_cfg})


def test_a_run_without_its_record_exports_with_model_and_seed(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir, seed=7)
    export_run(run / "adapter", "merged", tmp_path / "own")
    model_cfg = _model_cfg(run)
    shutil.rmtree(run / ".hydra")
    result = export_run(run / "adapter", "merged", tmp_path / "given", base={"model": model_cfg}, seed=7)
    assert (result.output / "model.safetensors").read_bytes() == (tmp_path / "own" / "model.safetensors").read_bytes()


def test_export_problems_for_trains_preflight():
    opt = {"name": "tiny_opt", "task": "causal_lm", "from_config": KINDS["opt"][0]}
    llama = {"name": "llama", "task": "causal_lm", "from_config": KINDS["llama"][0]}
    assert export_problems("lora", opt, "vera") == [] and export_problems("gguf-lora", llama, "vera") == []
    assert export_problems("onnx", opt, "vera") == ["export='onnx' is not an export format; use one of "
                                                    "['merged', 'lora', 'gguf-lora']"]
    (arch,) = export_problems("gguf-lora", opt, "vera")
    assert "export=gguf-lora: the base is a 'opt' model" in arch and "export=lora" in arch
    (head,) = export_problems("merged", opt, "head")
    assert "export=merged with finetune=head" in head and "Drop export= or use finetune=vera" in head
    assert len(export_problems("gguf-lora", llama, "vera", modules_to_save=["score"], bias="all")) == 2


def test_architectures_are_read_without_loading_the_model():
    assert base_architecture({"from_config": {"model_type": "opt"}}) == ("opt", "opt")
    minilm = OmegaConf.to_container(compose_app("train", "/tmp/x", "model=minilm").model, resolve=True)
    assert base_architecture(minilm) == ("bert", "BertModel")
    smollm2 = OmegaConf.to_container(compose_app("train", "/tmp/x", "model=smollm2").model, resolve=True)
    assert base_architecture(smollm2)[0] == "llama"
    assert base_architecture({"name_or_path": "nobody/nothing-here"}) is None  # a hub id not cached: known once loaded


def test_the_schema_refuses_unknown_keys_and_wrong_types_at_compose(tmp_path):
    register_export_schema()
    cfg = compose_app("export", tmp_path, "adapter=a", "format=lora", "overwrite=no", "rank=abc")
    assert (cfg.overwrite, cfg.rank, cfg.seed, cfg.dtype) == ("no", "abc", None, "fp32")  # checked by the plan
    for wrong in ("output_dir=x", "seed=abc", "dtype=[1]"):
        with pytest.raises(ConfigCompositionException):
            compose_app("export", tmp_path, "adapter=a", "format=lora", wrong)
    assert snapshot(tmp_path) == {}


def test_keys_added_past_the_schema_are_refused_with_the_rest(tmp_path, tokenizer_dir, no_load):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir)
    register_export_schema()
    cfg = compose_app("export", tmp_path / "h", f"adapter={run / 'adapter'}", "format=lora",
                      f"output={tmp_path / 'l'}", "+rnak=4", "overwrite=off")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as caught:
        export_module.export(cfg)
    assert "unknown option(s) rnak" in str(caught.value) and "overwrite='off'" in str(caught.value)
    assert snapshot(tmp_path) == before
