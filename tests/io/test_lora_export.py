"""export_lora: PEFT's LoRA reproduces our outputs; rank-k is the best approximation; refusals."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from helpers.models import run
from helpers.named import multi_adapter_model

from vera_lightning import export_lora, find_adapter, set_adapter
from vera_lightning.core.lookup import vera_layers
from vera_lightning.io.lora_export import lora_factors

pytestmark = pytest.mark.numerics


def _peft_lora(pristine, directory):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(directory))


def _delta(layer, name):
    """``ΔW`` (out x in) of one layer in float64, formed explicitly (the reference)."""
    lam_b, lam_d = (getattr(layer, a).detach().double() for a in find_adapter(layer).lambda_names(name))
    a_s, b_s = (t.double() for t in layer.sliced_projections())
    return (lam_b[:, None] * b_s) @ (lam_d[:, None] * a_s)


CASES = {  # kind, fields, adapter exported
    "opt-primary": ("opt", {}, "default"),
    "opt-named": ("opt", {}, "task_c"),
    "gpt2-conv1d-named": ("gpt2", {"fan_in_fan_out": True}, "task_b"),
    "bert-head-and-biases": ("bert", {"modules_to_save": ["classifier"], "bias": "vera_only"}, "default"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_export_loads_in_peft_with_our_outputs(tmp_path, case):
    kind, fields, name = CASES[case]
    names = ("default",) if fields.get("modules_to_save") else ("default", "task_b", "task_c")
    pristine, model, _ = multi_adapter_model(kind, names=names, **fields)
    with torch.no_grad():  # a trained head and trained biases
        for n, p in model.named_parameters():
            if p.requires_grad and "vera_lambda" not in n:
                p.add_(0.1 * torch.randn_like(p))
    set_adapter(model, name)
    report = export_lora(model, tmp_path / "lora", adapter_name=name, base_model_name_or_path="tiny")
    assert (report.rank, report.relative_error, report.directory) == (8, 0.0, str(tmp_path / "lora"))
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == 8 and saved["use_rslora"] is False
    theirs = _peft_lora(pristine, tmp_path / "lora")
    scalings = {m.scaling["default"] for m in theirs.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {1.0}
    with torch.no_grad():
        a, b, base = run(model, kind), run(theirs, kind), run(pristine, kind)
    assert (a - b).abs().max().item() <= 1e-5 and (a - base).abs().max().item() > 1e-2


def test_factors_are_diag_lambda_times_projections():
    _, model, _ = multi_adapter_model("opt")
    layer = next(layer for _, layer in vera_layers(model))
    lam_b, lam_d = layer.lambdas()
    a_s, b_s = layer.sliced_projections()
    lora_a, lora_b, tail, total = lora_factors(lam_b, lam_d, a_s, b_s)
    assert torch.equal(lora_a, lam_d[:, None] * a_s) and torch.equal(lora_b, lam_b[:, None] * b_s)
    assert (tail, total) == (0.0, 0.0)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_is_the_best_approximation_from_thin_factors(tmp_path, k):
    pristine, model, _ = multi_adapter_model("mlp")  # fc3 is 24 -> 5: rank 5 < r, padded with zeros at k=8
    report = export_lora(model, tmp_path / "lora", adapter_name="task_b", rank=k)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    tails = totals = 0.0
    for name, layer in vera_layers(model):
        delta = _delta(layer, "task_b")
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        ours = (tensors[f"base_model.model.{name}.lora_B.weight"].double()
                @ tensors[f"base_model.model.{name}.lora_A.weight"].double())
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (k, layer.in_features)
        assert (ours - best).norm() <= 1e-6 * delta.norm()
        tail, total = s[k:].square().sum().item(), s.square().sum().item()
        assert report.layer_errors[name] == pytest.approx((tail / total) ** 0.5, rel=1e-6, abs=1e-9)
        tails, totals = tails + tail, totals + total
    assert report.relative_error == pytest.approx((tails / totals) ** 0.5, rel=1e-6, abs=1e-9)
    assert report.rank == k and (report.relative_error == pytest.approx(0.0, abs=1e-7)) == (k == 8)
    theirs = _peft_lora(pristine, tmp_path / "lora")
    with torch.no_grad():
        approx = run(theirs, "mlp")
    set_adapter(model, "task_b")
    with torch.no_grad():
        exact = run(model, "mlp")
    if k == 8:
        assert (approx - exact).abs().max().item() <= 1e-5
    else:
        assert (approx - exact).abs().max().item() > 1e-4  # really truncated


def test_refusals_write_nothing(tmp_path):
    _, model, _ = multi_adapter_model("opt")
    for rank in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match=r"rank=.* must be an integer with 1 <= rank <= r=8"):
            export_lora(model, tmp_path / "a", rank=rank)
    with pytest.raises(ValueError, match="no VeRA adapter named 'nope'"):
        export_lora(model, tmp_path / "a", adapter_name="nope")
    layer = next(layer for _, layer in vera_layers(model))
    with torch.no_grad():
        layer.vera_lambda_d_task_b[0] = float("nan")
    with pytest.raises(ValueError, match="adapter 'task_b' has NaN/inf λ's .*nothing was written"):
        export_lora(model, tmp_path / "a", adapter_name="task_b")
    with pytest.raises(ValueError, match="carries no VeRA adapter"):
        export_lora(torch.nn.Linear(2, 2), tmp_path / "a")
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refuses to replace"):
        export_lora(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "notes.txt").read_text() == "mine"
