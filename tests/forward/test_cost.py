"""The cost model (vera_lightning/cost.py): formulas, memory rule, and the choice auto makes in a model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from bench_harness import saved_activation_bytes
from helpers.models import tiny_opt
from helpers.peft_oracle import peft_vera

from vera_lightning import VeraConfig, apply_vera, record_paths, set_vera_path
from vera_lightning.core.lookup import vera_layers
from vera_lightning.forward.cost import MACHINES, Machine, allowed_paths, best_path, path_costs, saved_bytes

FLOPS_ONLY = Machine(gemm=1e11, bandwidth=float("inf"), overhead=0.0, source="test")


def test_flop_terms_match_the_documented_formulas():
    n, d, outs, r = 1000, 768, [768, 768], 256
    big_o = sum(outs)
    costs = path_costs(n, d, outs, r, torch.float32, FLOPS_ONLY)
    macs = {k: v * FLOPS_ONLY.gemm / 2 for k, v in costs.items()}
    assert macs["lean"] == pytest.approx(3 * n * r * d + 3 * n * r * big_o)
    assert macs["save_h"] == pytest.approx(2 * n * r * d + 3 * n * r * big_o)
    assert macs["merged"] == pytest.approx(2 * big_o * r * d + n * r * (d + big_o))  # r=256: Q = gᵀ(x·A_sᵀ)
    assert macs["plain"] == pytest.approx(2 * len(outs) * n * r * d + 2 * n * r * big_o)
    big_r = path_costs(8192, d, outs, 1024, torch.float32, FLOPS_ONLY)["merged"] * FLOPS_ONLY.gemm / 2
    assert big_r == pytest.approx(2 * big_o * 1024 * d + 8192 * big_o * d + big_o * d * 1024)  # Q = (gᵀx)·A_sᵀ
    half = path_costs(n, d, outs, r, torch.bfloat16, FLOPS_ONLY)
    assert half["merged"] * FLOPS_ONLY.gemm / 2 == pytest.approx(macs["merged"] + 2 * n * big_o * d)


def test_merged_wins_exactly_past_the_flop_crossover():
    d, outs, r = 768, [768, 768], 1024
    big_o = sum(outs)
    lean = lambda n: 3 * n * r * (d + big_o)  # noqa: E731
    merged = lambda n: 2 * big_o * r * d + min(n * big_o * d + big_o * d * r, n * r * (d + big_o))  # noqa: E731
    crossover = next(n for n in range(1, 10**5) if merged(n) < lean(n))
    pick = lambda n: min(("lean", "merged"), key=path_costs(n, d, outs, r, torch.float32, FLOPS_ONLY).get)  # noqa: E731
    assert (pick(crossover - 1), pick(crossover)) == ("lean", "merged")
    assert 400 < crossover < 600  # about N = 4 x 128 (the README batch), in flops alone


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_choice_at_small_and_large_token_counts(device):
    """OPT-125m q,v at r=1024: low-rank at a few tokens, merged at thousands (the measured regimes)."""
    pick = lambda n, r=1024, outs=(768, 768): best_path(n, 768, list(outs), r, torch.float32, device)  # noqa: E731
    assert pick(16) in ("lean", "save_h")
    assert pick(8192) == "merged"
    assert pick(8192, outs=(768, 768, 768)) == "merged"
    assert pick(16, r=256) in ("lean", "save_h")


def test_memory_rule():
    d, outs = 768, [768, 768]
    assert allowed_paths(512, d, outs, 1024, torch.float32, "lean") == ["lean", "merged"]  # h (N·1024) > x (N·768)
    assert allowed_paths(512, d, outs, 256, torch.float32, "lean") == ["lean", "save_h", "merged"]
    assert allowed_paths(512, d, outs, 1024, torch.float32, "speed") == ["lean", "save_h", "merged", "plain"]
    saved = saved_bytes(512, d, outs, 1024, torch.float32)
    assert saved["lean"] == saved["merged"] == 512 * 768 * 4
    assert saved["lean"] / saved["plain"] <= 0.25  # the memory goal at r=1024 on q,v
    with pytest.raises(ValueError, match="memory='fast'"):
        allowed_paths(512, d, outs, 1024, torch.float32, "fast")


def test_every_device_has_constants():
    for name, machine in MACHINES.items():
        assert machine.gemm > 0 and machine.bandwidth > 0 and machine.overhead >= 0
        assert machine.source, name


def _adapted_opt(r=512):
    torch.manual_seed(0)
    base = tiny_opt(hidden=64).train()
    other = copy.deepcopy(base)
    ours = apply_vera(base, VeraConfig(r=r, target_modules=["q_proj", "v_proj"], init_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_vera(other, r=r, target_modules=["q_proj", "v_proj"])
    return ours, theirs


@pytest.mark.parametrize("batch,seq,expected", [(4, 2, {"lean"}), (8, 64, {"merged"})])
def test_auto_in_a_model_follows_the_leader_and_keeps_the_memory_goal(batch, seq, expected):
    ours, theirs = _adapted_opt()
    cache = ours.vera_projections.siblings
    ids = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the first forward teaches q (the leader) that v reads the same input
        with record_paths() as seen:
            ours(input_ids=ids, labels=ids).loss.backward()
    q, v = ours.model.decoder.layers[0].self_attn.q_proj, ours.model.decoder.layers[0].self_attn.v_proj
    assert cache.plans.current(q) == [v]
    assert {p.value for p in seen.values()} == expected and len(seen) == len(list(vera_layers(ours)))
    torch.manual_seed(0)
    floor = tiny_opt(hidden=64).train().requires_grad_(False)
    floor.get_input_embeddings().weight.requires_grad_(True)
    for model in (ours, theirs):
        model.get_input_embeddings().weight.requires_grad_(True)
    base = saved_activation_bytes(floor, ids)
    ours_extra = saved_activation_bytes(ours, ids) - base
    peft_extra = saved_activation_bytes(theirs, ids) - base
    assert 0 < ours_extra <= 0.25 * peft_extra


def test_memory_preference_is_validated_and_stored():
    ours, _ = _adapted_opt()
    with pytest.raises(ValueError, match=r"memory='less'.*\('lean', 'speed'\)"):
        set_vera_path(ours, "auto", memory="less")
    assert {layer.vera_memory for _, layer in vera_layers(ours)} == {"lean"}  # nothing changed
    set_vera_path(ours, "auto", memory="speed")
    assert {layer.vera_memory for _, layer in vera_layers(ours)} == {"speed"}


def test_calibration_script_smoke(tmp_path):
    """benchmarks/calibrate_cost.py --quick measures every path and fits usable constants."""
    from calibrate_cost import fit_machine, main

    out = tmp_path / "calib.json"
    result = main(["--quick", "--json", str(out)])
    assert out.is_file() and len(result["rows"]) == 2
    for row in result["rows"]:
        assert {"lean", "save_h", "merged", "plain", "peft"} <= set(row["extra_ms"])
        assert row["pick"] in ("lean", "save_h", "merged")
    # the fit recovers constants that generated the times
    truth = Machine(gemm=2e10, bandwidth=4e9, overhead=3e-5, source="truth")
    rows = [{"n": n, "in": 768, "outs": [768, 768], "r": r,
             "extra_ms": {p: 1e3 * t for p, t in path_costs(n, 768, [768, 768], r, torch.float32, truth).items()}}
            for n in (256, 2048, 8192) for r in (64, 1024)]
    fitted = fit_machine(rows, "test")
    assert fitted.gemm == pytest.approx(truth.gemm, rel=1e-6)
    assert fitted.bandwidth == pytest.approx(truth.bandwidth, rel=1e-6)
    assert fitted.overhead == pytest.approx(truth.overhead, rel=1e-6)
