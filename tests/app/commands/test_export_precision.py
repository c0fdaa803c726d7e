"""format=merged merges on a float32 base and writes float32, whatever precision the run trained in (issue 36, W1);
dtype=bf16 casts after the float32 merge and reports the rounding it costs. The oracle is PEFT's VeRA over the float32
base with the same adapter."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from test_export import _base, _logits, fake_run, save_tokenizer

from vera_lightning.app.commands.export import export_run

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _peft_over_float32_base(run):
    import peft
    from omegaconf import OmegaConf

    record = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"))
    base, _ = _base({**record["model"], "compute_dtype": "fp32"}, record["data"], record["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_a_bf16_trained_adapter_merges_in_float32_like_peft_over_the_float32_base(tmp_path, tokenizer_dir, kind):
    from transformers import AutoModelForCausalLM

    run, trained = fake_run(tmp_path, kind, tokenizer_dir, compute_dtype="bf16")  # base bf16 while trained and saved
    assert next(p for n, p in trained.named_parameters() if "vera" not in n).dtype == torch.bfloat16
    result = export_run(run / "adapter", "merged", tmp_path / "merged")
    assert result.dtype == "float32" and result.rounding is None
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in _tensors(tmp_path / "merged").values()} == {torch.float32}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    theirs = _logits(_peft_over_float32_base(run))
    ours = _logits(merged)
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()


def test_dtype_bf16_casts_after_the_float32_merge_and_reports_the_rounding(tmp_path, tokenizer_dir, capsys):
    run, _ = fake_run(tmp_path, "llama", tokenizer_dir)
    full = _tensors(export_run(run / "adapter", "merged", tmp_path / "fp32").output)
    result = export_run(run / "adapter", "merged", tmp_path / "bf16", dtype="bf16")
    half = _tensors(result.output)
    assert result.dtype == "bfloat16" and {t.dtype for t in half.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    errors = {k: ((half[k].double() - full[k].double()).norm() / full[k].double().norm()).item() for k in full}
    worst = max(errors, key=errors.get)
    assert 1e-4 < result.rounding < 1e-2 and result.rounding == pytest.approx(errors[worst], rel=1e-6)
    assert result.rounding_tensor == worst
    sizes = [(tmp_path / name / "model.safetensors").stat().st_size for name in ("bf16", "fp32")]
    assert 0.45 < sizes[0] / sizes[1] < 0.55
