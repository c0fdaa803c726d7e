"""scripts/export.py's export_run: merged and LoRA exports equal our outputs (OPT, GPT-2 Conv1D, LLaMA GQA with tied
embeddings, BERT with a head and biases), PEFT loads the LoRA, the GGUF LoRA is written for LLaMA, a training
run's adapter and .ckpt export alike, and every bad input is refused with one message before anything is written.

Also the shared helpers of the other export tests (test_export_plan.py, test_export_output.py, test_export_script.py,
test_export_precision.py): :func:`fake_run` and :func:`snapshot` (every file's name, mode and bytes under a tree).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.app import SMOKE, compose_app, run_script
from helpers.llm import CHATML, byte_bpe_tokenizer
from helpers.models import random_lambdas_
from omegaconf import OmegaConf

from vera_lightning import VeraConfig, apply_vera, load_adapter, save_adapter
from vera_lightning.app.commands.export import check_format, export_run
from vera_lightning.app.commands.train import train
from vera_lightning.app.models.load import build_model, build_tokenizer

pytestmark = pytest.mark.numerics
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

KINDS = {  # from_config fields, targets, task, VeRA options
    "opt": ({"model_type": "opt", "hidden_size": 32, "word_embed_proj_dim": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "ffn_dim": 64, "max_position_embeddings": 64, "dropout": 0.0},
            ["q_proj", "v_proj"], "causal_lm", {}),
    "gpt2": ({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "resid_pdrop": 0.0,
              "embd_pdrop": 0.0, "attn_pdrop": 0.0}, ["c_attn", "c_proj"], "causal_lm", {"fan_in_fan_out": True}),
    "llama": ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 64,
               "tie_word_embeddings": True}, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "causal_lm", {}),
    "bert": ({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0}, ["query", "value"], "classification",
             {"modules_to_save": ["classifier"], "bias": "vera_only"}),
}


def save_tokenizer(directory: Path) -> Path:
    """A small byte-level BPE tokenizer with a chat template, saved in ``directory`` (the tiny models' tokenizer)."""
    byte_bpe_tokenizer(chat=True).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: its relative name, mode and bytes (folders: mode only; links: their target)."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            found[str(path.relative_to(root))] = ("link", str(path.readlink()))
        elif path.is_dir():
            found[str(path.relative_to(root))] = ("dir", info.st_mode)
        else:
            found[str(path.relative_to(root))] = ("file", info.st_mode, path.read_bytes())
    return found


def changed(before: dict, after: dict) -> set[str]:
    """Names whose entry differs between two snapshots (added, removed or modified)."""
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def _base(model_cfg, data_cfg, seed):
    """The base exactly as the export (and training) builds it."""
    pl.seed_everything(seed, verbose=False)
    tokenizer = build_tokenizer(model_cfg)
    return build_model(model_cfg, tokenizer, num_labels=data_cfg.get("num_labels")).eval(), tokenizer


def fake_run(root: Path, kind: str, tokenizer_dir: Path, seed: int = 7, compute_dtype: str = "fp32"):
    """A run directory as training leaves it (adapter/ and .hydra/config.yaml); returns it and the adapted model.

    ``compute_dtype="bf16"``: the base was bf16 when the adapter was trained and saved (the record says so).
    """
    fields, targets, task, options = KINDS[kind]
    model_cfg = {"name": kind, "task": task, "name_or_path": None, "tokenizer": str(tokenizer_dir),
                 "from_config": fields, "target_modules": targets, "quantize": None, "compute_dtype": compute_dtype}
    data_cfg = {"num_labels": 2} if task == "classification" else {}
    model, _ = _base(model_cfg, data_cfg, seed)
    model = apply_vera(model, VeraConfig(r=8, target_modules=targets, **options))
    random_lambdas_(model)
    with torch.no_grad():  # a trained head and trained biases
        for name, p in model.named_parameters():
            if p.requires_grad and "vera_lambda" not in name:
                p.add_(0.1 * torch.randn_like(p))
    run = root / f"run-{kind}"
    save_adapter(model, run / "adapter", base_model_name_or_path=kind)
    (run / ".hydra").mkdir()
    OmegaConf.save({"model": model_cfg, "data": data_cfg, "seed": seed}, run / ".hydra" / "config.yaml")
    return run, model.eval()


def _logits(model, seed=0):
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _close(got, ours, rel=1e-5):
    assert (got - ours).abs().max().item() <= rel * ours.abs().max().item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_merged_export_loads_with_transformers_and_equals_ours(tmp_path, tokenizer_dir, kind):
    import transformers

    run, ours = fake_run(tmp_path, kind, tokenizer_dir)
    result = export_run(run / "adapter", "merged", tmp_path / "merged")
    assert (result.format, result.output, result.rank) == ("merged", tmp_path / "merged", None)
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no staging left behind
    auto = transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "merged").eval()
    assert "vera" not in " ".join(n for n, _ in loaded.named_parameters())
    _close(_logits(loaded), _logits(ours))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHATML
    if kind == "llama":  # SmolLM2's case: lm_head tied to embed_tokens stays tied, stored once
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        from safetensors import safe_open

        with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
            assert "lm_head.weight" not in set(handle.keys())


@pytest.mark.parametrize("kind", list(KINDS))
def test_lora_export_loads_in_peft_with_our_logits(tmp_path, tokenizer_dir, kind):
    import peft

    run, ours = fake_run(tmp_path, kind, tokenizer_dir)
    result = export_run(run / "adapter", "lora", tmp_path / "lora")
    assert (result.rank, result.relative_error) == (8, 0.0)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == 8
    assert saved["base_model_name_or_path"] == kind and saved["fan_in_fan_out"] is (kind == "gpt2")
    assert {t.rsplit(".", 1)[-1] for t in saved["target_modules"]} == set(KINDS[kind][1])
    fields, _, task, _ = KINDS[kind]
    model_cfg = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"))
    base, _ = _base(model_cfg["model"], model_cfg["data"], model_cfg["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    _close(_logits(theirs), _logits(ours))


def test_rank_k_lora_reports_its_error(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir)
    result = export_run(run / "adapter", "lora", tmp_path / "lora4", rank=4)
    assert result.rank == 4 and 0 < result.relative_error < 1
    assert json.loads((tmp_path / "lora4" / "adapter_config.json").read_text())["r"] == 4


def test_gguf_lora_export_of_llama(tmp_path, tokenizer_dir):
    gguf = pytest.importorskip("gguf", reason="the gguf package (the llm extra) writes GGUF files")
    run, _ = fake_run(tmp_path, "llama", tokenizer_dir)
    result = export_run(run / "adapter", "gguf-lora")  # default output: beside adapter/ in the run directory
    assert result.output == run / "adapter-lora.gguf" and result.rank == 8
    reader = gguf.GGUFReader(str(result.output))
    assert reader.fields["general.type"].contents() == "adapter"
    assert len(reader.tensors) == 2 * 2 * 5 and result.bytes == result.output.stat().st_size
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "adapter", "adapter-lora.gguf"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A real training run (tiny OPT) with its slim last.ckpt and the config Hydra would have saved."""
    run = tmp_path_factory.mktemp("smoke") / "run"
    cfg = compose_app("train", run, *SMOKE, "callbacks=default", "trainer.enable_checkpointing=true")
    train(cfg)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run, cfg


def test_training_runs_adapter_and_ckpt_export_alike(smoke_run, tmp_path):
    run, cfg = smoke_run
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    reference, _ = _base(model_cfg, {}, cfg.seed)
    load_adapter(reference, run / "adapter")
    ours = _logits(reference.eval())
    for name, source in (("from-dir", run / "adapter"), ("from-ckpt", run / "checkpoints" / "last.ckpt")):
        export_run(source, "merged", tmp_path / name)
        from transformers import AutoModelForCausalLM

        _close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()), ours)
    # train.py's end-of-run export passes its own config as the base (no .hydra under the compose API)
    result = export_run(run / "adapter", "lora", tmp_path / "lora", base=cfg)
    assert result.rank == cfg.vera.r


def refused(tmp_path, match, *args, **kwargs):
    """``export_run(*args, **kwargs)`` is refused with a message matching ``match`` and ``tmp_path`` is byte for byte
    as it was (names, modes, bytes)."""
    before = snapshot(tmp_path)
    with pytest.raises((ValueError, FileExistsError)) as caught:
        export_run(*args, **kwargs)
    assert caught.match(match)
    assert snapshot(tmp_path) == before  # nothing written
    return str(caught.value)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir)
    adapter = run / "adapter"
    refused(tmp_path, r"format='onnx' is not an export format; use one of \['merged', 'lora', 'gguf-lora'\]",
             adapter, "onnx", tmp_path / "x")
    refused(tmp_path, r"rank=9 is above the adapter's r=8.*rank=null, or 1 <= rank <= 8",
             adapter, "lora", tmp_path / "x", rank=9)
    refused(tmp_path, "rank=2: format=merged folds", adapter, "merged", tmp_path / "x", rank=2)
    refused(tmp_path, r"format=gguf-lora: the base is a 'opt' model.*Use format=lora",
             adapter, "gguf-lora", tmp_path / "x.gguf")
    refused(tmp_path, r"give a path ending in \.gguf", adapter, "gguf-lora", tmp_path / "x.bin")
    refused(tmp_path, r"adapter='.*nope': no such file", tmp_path / "nope", "lora", tmp_path / "x")
    message = refused(tmp_path, "Cannot export", adapter, "onnx", tmp_path / "x", rank=0)
    assert "format='onnx'" in message and "rank=0 must be a positive integer" in message
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    message = refused(tmp_path, r"output='.*taken' holds \['notes.txt'\], which format=lora does not write",
                       adapter, "lora", tmp_path / "taken", overwrite=True)
    assert "not even with overwrite=true" in message


def test_overwrite_replaces_only_an_earlier_export_of_the_same_format(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir)
    first = export_run(run / "adapter", "lora", tmp_path / "out", rank=2)
    message = refused(tmp_path, r"already holds an earlier lora export .*pass overwrite=true to replace that export",
                       run / "adapter", "lora", tmp_path / "out")
    assert "adapter_config.json" in message  # says what it would replace
    before = snapshot(tmp_path)
    export_run(run / "adapter", "lora", tmp_path / "out", overwrite=True)
    assert changed(before, snapshot(tmp_path)) == {"out/adapter_config.json", "out/adapter_model.safetensors"}
    assert json.loads((first.output / "adapter_config.json").read_text())["r"] == 8
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]
    refused(tmp_path, r"holds a lora export .*not a merged one", run / "adapter", "merged", tmp_path / "out",
             overwrite=True)


def test_not_vera_merged_dirs_and_baseless_ckpt_are_refused(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "opt", tokenizer_dir)
    export_run(run / "adapter", "lora", tmp_path / "lora")
    refused(tmp_path, r"is a LORA adapter, not VeRA \(peft_type='LORA'", tmp_path / "lora", "merged", tmp_path / "m")
    export_run(run / "adapter", "merged", tmp_path / "merged")
    message = refused(tmp_path, "is a model directory .*not a VeRA adapter", tmp_path / "merged", "lora",
                       tmp_path / "l")
    assert "merged model directory" not in message
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(FIXTURES / "slim_v0.1.0_epoch0_step4.ckpt", lone / "last.ckpt")
    refused(tmp_path, r"cannot tell its base model: a checkpoint holds no base model.*Pass the model options",
             lone / "last.ckpt", "merged", tmp_path / "m")
    bare = tmp_path / "bare"  # an adapter directory moved away from its run, recording an unknown base
    shutil.copytree(run / "adapter", bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    refused(tmp_path, "records no usable base_model_name_or_path", bare, "lora", tmp_path / "l")
    assert check_format("lora") == "lora"


def test_script_prints_one_message_without_traceback(tmp_path, tokenizer_dir):
    run, _ = fake_run(tmp_path, "llama", tokenizer_dir)
    bad = run_script("export", f"adapter={run / 'adapter'}", "format=onnx", "rank=99", f"output={tmp_path / 'o'}",
                     f"hydra.run.dir={tmp_path / 'h1'}", cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "format='onnx' is not an export format" in bad.stderr and "rank=99" in bad.stderr
    assert not (tmp_path / "o").exists()
    good = run_script("export", f"adapter={run / 'adapter'}", "format=gguf-lora", f"output={tmp_path / 'a.gguf'}",
                      f"hydra.run.dir={tmp_path / 'h2'}", cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "a.gguf").is_file() and "LoRA rank         : 8  (exact)" in good.stdout


@pytest.mark.slow
def test_llama_cpp_applies_the_gguf_lora_over_the_real_smollm2_base(tmp_path, monkeypatch):
    """llama.cpp (llama-cpp-python) loads the packaged SmolLM2 GGUF plus our GGUF LoRA; its logits move like ours.

    llama.cpp runs the Q4_1 base with 8-bit activations, whose rounding moves its logits by a norm of ~30 for any
    change of the residual stream, however small: the λ's are scaled so that our change (~200) is well above that
    and still nearly linear (measured: cosine 0.976, norms 205 and 180). The same adapter exported without the
    RoPE row order of q/k moves them less alike (0.892).
    """
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional export-test extra "
                                    "(pip install -e .[export-test], built from source)")
    import vera_lightning.io.gguf_lora as gguf_lora
    from vera_lightning import export_gguf_lora, vera_layers
    from vera_lightning.app.models.gguf_cache import gguf_source

    cfg = compose_app("train", tmp_path / "run", "model=smollm2", "model.compute_dtype=fp32")
    base_file = gguf_source(cfg.model.name_or_path)
    model, tokenizer = _base(OmegaConf.to_container(cfg.model, resolve=True), {}, 0)
    ids = tokenizer("The Eagle is a French restaurant by the riverside. It")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        model = apply_vera(model, VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
        random_lambdas_(model)
        for _, layer in vera_layers(model):
            layer.adapter_params()["vera_lambda_b"].mul_(0.35)
        after = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    export_gguf_lora(model, tmp_path / "adapter.gguf")
    monkeypatch.setattr(gguf_lora, "llama_rope_permute", lambda rows, heads: rows)
    export_gguf_lora(model, tmp_path / "unpermuted.gguf")

    def last_logits(**kwargs):
        llm = llama_cpp.Llama(model_path=str(base_file), n_ctx=128, verbose=False, logits_all=True, **kwargs)
        llm.eval(ids)
        return torch.tensor(llm.scores[len(ids) - 1], dtype=torch.float64)

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=0).item()

    theirs_before = last_logits()
    ours = after - before
    theirs = last_logits(lora_path=str(tmp_path / "adapter.gguf")) - theirs_before
    unpermuted = last_logits(lora_path=str(tmp_path / "unpermuted.gguf")) - theirs_before
    assert 100 < ours.norm() < 1000, ours.norm()
    assert cosine(ours, theirs) > 0.95 and 0.8 < theirs.norm() / ours.norm() < 1.25, (
        cosine(ours, theirs), ours.norm().item(), theirs.norm().item())
    assert cosine(ours, unpermuted) < cosine(ours, theirs) - 0.03, (cosine(ours, unpermuted), cosine(ours, theirs))


def test_train_with_export_writes_the_lora_beside_the_adapter(tmp_path):
    cfg = compose_app("train", tmp_path / "run", "experiment=smoke", "export=lora", "eval_before=false")
    train(cfg)
    config = json.loads((tmp_path / "run" / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == cfg.vera.r
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_train_with_an_unknown_export_format_is_refused_before_any_work(tmp_path):
    cfg = compose_app("train", tmp_path / "run", "experiment=smoke", "export=onnx")
    with pytest.raises(ValueError, match="onnx"):
        train(cfg)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
