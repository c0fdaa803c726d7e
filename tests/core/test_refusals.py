"""vera_lightning/states.py: states are part of the contract: merged, tied, eval mode, meta device,
targets VeRA cannot honour (issue 10, items 1, 2, 7, 9, 10, 12).

Each test reproduces one defect of issue 10 (it failed before the fix) and checks the decision
documented in docs/reliability.md.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import MLP, run, tiny_opt
from helpers.peft_oracle import peft_vera
from torch import nn

from vera_lightning import (
    VeraConfig,
    apply_vera,
    load_adapter,
    merge_vera,
    save_adapter,
    unload_vera,
    unmerge_vera,
)
from vera_lightning.core.lookup import vera_layers


def _trained(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in vera_layers(model):
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, before):
    return all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------------- merged
def test_load_adapter_into_merged_model_is_refused(tmp_path):
    cfg = VeraConfig(r=8, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    save_adapter(_trained(apply_vera(tiny_opt(), cfg), seed=2), tmp_path / "other")
    torch.manual_seed(0)
    base = tiny_opt()
    w0 = base.model.decoder.layers[0].self_attn.q_proj.weight.detach().clone()
    model = merge_vera(_trained(apply_vera(base, cfg)))
    before = _state(model)
    with pytest.raises(ValueError, match=r"load_adapter.* refused.*merged.*unmerge_vera\(model\) first"):
        load_adapter(model, tmp_path / "other")
    assert _same(model, before)
    unmerge_vera(model)  # the documented fix: unmerge, load, merge again
    load_adapter(model, tmp_path / "other")
    torch.testing.assert_close(model.model.decoder.layers[0].self_attn.q_proj.weight, w0, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- tied
def _tied_opt_with_adapted_head():
    torch.manual_seed(0)
    model = tiny_opt()
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # OPT ties them by default
    return _trained(apply_vera(model, VeraConfig(r=8, target_modules=["lm_head", "q_proj"])))


@pytest.mark.parametrize("op", ["merge", "unload"])
def test_merge_of_tied_head_is_refused_and_nothing_changes(op):
    model = _tied_opt_with_adapted_head()
    emb = model.model.decoder.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        adapted = run(model, "opt")
    with pytest.raises(ValueError, match=r"refused, no layer was changed: lm_head.weight is tied to "
                                         r"\['model.decoder.embed_tokens.weight'\].*untie first"):
        merge_vera(model) if op == "merge" else unload_vera(model, merge=True)
    assert torch.equal(model.model.decoder.embed_tokens.weight, emb)
    assert not any(layer.merged for _, layer in vera_layers(model))
    with torch.no_grad():
        assert torch.equal(run(model, "opt"), adapted)  # unmerged outputs are still the adapted ones


def test_untie_then_merge_keeps_the_adapted_outputs():
    model = _tied_opt_with_adapted_head()
    with torch.no_grad():
        adapted = run(model, "opt")
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # the fix the message gives
    model.config.tie_word_embeddings = False
    unload_vera(model, merge=True)
    with torch.no_grad():
        assert (run(model, "opt") - adapted).abs().max() < 1e-4


def test_weights_sharing_memory_count_as_tied_only_where_they_overlap():
    fused = torch.randn(8, 4)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[0].weight, net[1].weight = nn.Parameter(fused[:4]), nn.Parameter(fused[4:])  # disjoint views: fine
    merge_vera(_trained(apply_vera(net, VeraConfig(r=4, target_modules=["0"]))))
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[0].weight, net[1].weight = nn.Parameter(fused[:4]), nn.Parameter(fused[2:6])  # rows 2, 3 shared
    with pytest.raises(ValueError, match=r"0.weight is tied to \['1.weight'\]"):
        merge_vera(_trained(apply_vera(net, VeraConfig(r=4, target_modules=["0"]))))


# ---------------------------------------------------------------------- eval mode
@pytest.mark.parametrize("via", ["apply_vera", "load_adapter"])
def test_new_layers_take_the_mode_of_the_replaced_module(tmp_path, via):
    cfg = VeraConfig(r=8, target_modules=["q_proj", "v_proj"], vera_dropout=0.5)
    src = _trained(apply_vera(tiny_opt(), cfg))
    save_adapter(src, tmp_path / "a")
    model = tiny_opt().eval()
    apply_vera(model, cfg) if via == "apply_vera" else load_adapter(model, tmp_path / "a")
    _trained(model)
    assert all(not layer.training for _, layer in vera_layers(model))
    with torch.no_grad():
        assert torch.equal(run(model, "opt"), run(model, "opt"))  # no dropout in eval mode
    trained_mode = apply_vera(tiny_opt().train(), cfg)
    assert all(layer.training for _, layer in vera_layers(trained_mode))


# ---------------------------------------------------------------------- targets
class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


@pytest.mark.parametrize("targets", [["out_proj", "fc"], ".*(out_proj|fc)"])
def test_mha_out_proj_is_refused(targets):
    model = WithMHA()
    with pytest.raises(ValueError, match=r"\['attn.out_proj'\], the out_proj of nn.MultiheadAttention.*never calls it"):
        apply_vera(model, VeraConfig(r=4, target_modules=targets))
    assert type(model.attn.out_proj) is not nn.Module and not list(vera_layers(model))


def test_all_linear_skips_mha_out_proj():
    model = apply_vera(WithMHA(), VeraConfig(r=4, target_modules="all-linear"))
    assert [name for name, _ in vera_layers(model)] == ["fc"]


def test_non_linear_target_is_named_as_peft_refuses_it_too():
    with pytest.raises(ValueError, match=r"matches \['conv \(Conv2d\)'\], which VeRA cannot adapt"):
        apply_vera(WithMHA(), VeraConfig(r=4, target_modules=["fc", "conv"]))
    with pytest.raises(TypeError, match="not supported"):  # the oracle raises as well (a TypeError)
        peft_vera(WithMHA(), r=4, target_modules=["fc", "conv"])


def test_layers_to_transform_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0, 999\]: the model has no layer \[999\].*\[0, 1\]"):
        apply_vera(tiny_opt(), VeraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0, 999]))
    model = apply_vera(tiny_opt(), VeraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1]))
    assert [n for n, _ in vera_layers(model)] == ["model.decoder.layers.1.self_attn.q_proj"]


def test_second_adapter_on_a_submodule_is_refused(tmp_path):
    model = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"already holds VeRA modules of another adapter"):
        apply_vera(model.model.decoder.layers[0], VeraConfig(r=4, target_modules=["k_proj"]))
    # two adapters in sibling branches cannot be seen from either branch: refused when saving
    outer = nn.Sequential(apply_vera(MLP(), VeraConfig(r=4, target_modules=["fc1"])),
                          apply_vera(MLP(), VeraConfig(r=4, target_modules=["fc2"])))
    with pytest.raises(ValueError, match=r"save_adapter refused: Sequential holds 2 separate VeRA adapters"):
        save_adapter(outer, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- meta device
def test_meta_model_materialised_with_to_empty_gets_the_seed_projections():
    cfg = VeraConfig(r=8, target_modules=["q_proj", "v_proj"], d_initial=0.25)
    torch.manual_seed(0)
    ref = apply_vera(tiny_opt(), cfg)
    with torch.device("meta"):
        model = tiny_opt()
    apply_vera(model, cfg)
    model.to_empty(device="cpu")
    assert torch.equal(model.vera_projections.vera_A, ref.vera_projections.vera_A)
    assert torch.equal(model.vera_projections.vera_B, ref.vera_projections.vera_B)
    for (_, ours), (_, theirs) in zip(vera_layers(model), vera_layers(ref)):
        assert torch.equal(ours.vera_lambda_b, theirs.vera_lambda_b)
        assert torch.equal(ours.vera_lambda_d, theirs.vera_lambda_d)
    model.load_state_dict(ref.state_dict())  # the usual next step: the base weights
    with torch.no_grad():
        assert torch.equal(run(model, "opt"), run(ref, "opt"))


def test_meta_half_model_redraws_half_rounded_projections():
    cfg = VeraConfig(r=8, target_modules=["q_proj"])
    ref = apply_vera(tiny_opt().to(torch.bfloat16), cfg)
    with torch.device("meta"):
        model = tiny_opt().to(torch.bfloat16)
    apply_vera(model, cfg).to_empty(device="cpu")
    assert torch.equal(model.vera_projections.vera_A, ref.vera_projections.vera_A)


def test_load_adapter_into_meta_model_is_refused(tmp_path):
    save_adapter(_trained(apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj"]))), tmp_path / "a")
    with torch.device("meta"):
        model = tiny_opt()
    with pytest.raises(ValueError, match=r"meta device.*to_empty\(device='cpu'\).*load the base weights"):
        load_adapter(model, tmp_path / "a")
    assert not list(vera_layers(model))


# ---------------------------------------------------------------------- projections that do not fit
def test_huge_r_names_r_and_the_memory_it_needs():
    model = MLP()
    with pytest.raises(ValueError, match=r"r=1000000000: the shared projections vera_A \(1000000000 x 40\).* need "
                                         r"[0-9.]+ [GTP]iB of float32, but this machine has"):
        apply_vera(model, VeraConfig(r=10**9, target_modules=["fc1", "fc2"]))
    assert not list(vera_layers(model))


# ---------------------------------------------------------------------- merge -> unmerge rounding
@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_unmerge_restores_weights_up_to_one_rounding_step(dtype):
    """Decision (docs/reliability.md): no copy of W0 is kept; merge adds ΔW and unmerge subtracts it
    in the weight's dtype, so W0 comes back within one unit in the last place of max(|W0|, |W0 + ΔW|)."""
    torch.manual_seed(0)
    model = _trained(apply_vera(tiny_opt().to(dtype), VeraConfig(r=16, target_modules=["q_proj", "v_proj"])))
    before = {n: layer.weight.detach().clone() for n, layer in vera_layers(model)}
    merge_vera(model)
    merged = {n: layer.weight.detach().clone() for n, layer in vera_layers(model)}
    unmerge_vera(model)
    eps = torch.finfo(dtype).eps
    for name, layer in vera_layers(model):
        w0, w = before[name].float(), layer.weight.detach().float()
        big = torch.maximum(w0.abs(), merged[name].float().abs()).clamp_min(torch.finfo(dtype).tiny)
        ulp = eps * torch.exp2(torch.floor(torch.log2(big)))
        assert bool(((w - w0).abs() <= ulp).all()), name
