"""Two CPU processes (gloo): projection broadcast, DDP traffic per step, FSDP2 in fp32 and bf16."""

from __future__ import annotations

import json
import socket

import helpers.dist_workers as W
import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed
WORLD = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path, *args):
    mp.spawn(fn, args=(WORLD, _port(), str(tmp_path), *args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    steps = 3
    return {
        ignore: _spawn(W.ddp_bytes_worker, tmp_path_factory.mktemp(f"ddp{ignore}"), ignore, steps)
        for ignore in (True, False)
    }, steps


def test_broadcast_makes_different_projections_identical(ddp_runs):
    runs, _ = ddp_runs
    for rank_result in runs[True]:
        assert rank_result["differed_before"] is True
        assert rank_result["same_after_broadcast"] is True


def test_ddp_sends_only_trainable_gradients_and_bn_stats_per_step(ddp_runs):
    runs, steps = ddp_runs
    ours = runs[True][0]
    assert len(ours["per_step"]) == steps
    for step in ours["per_step"]:
        assert step["allreduce"] == ours["trainable_bytes"]       # λ gradients only
        assert step["broadcast"] == ours["bn_buffer_bytes"]       # BatchNorm keeps its normal sync
    assert ours["startup"]["broadcast"] < ours["projection_bytes"]  # DDP init did not send them either
    # what plain DDP (and PEFT + DDP) pays: the projections before every forward
    plain = runs[False][0]
    for step in plain["per_step"]:
        assert step["broadcast"] == ours["bn_buffer_bytes"] + plain["projection_bytes"]


def test_ddp_lambdas_identical_across_ranks_and_equal_single_process(ddp_runs):
    runs, steps = ddp_runs
    r0, r1 = runs[True]
    assert r0["lambdas"] == r1["lambdas"]
    reference = W.single_process_bnnet_lambdas(steps, WORLD)
    for name, values in reference.items():
        torch.testing.assert_close(torch.tensor(r0["lambdas"][name]), torch.tensor(values), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_fsdp2_lambda_gradients_match_single_process(tmp_path, bf16):
    results = _spawn(W.fsdp2_worker, tmp_path, bf16)
    assert all(r["projections_plain"] for r in results)
    reference = W.single_process_opt_grads(WORLD, bf16)
    tol = {"rtol": 2e-2, "atol": 2e-3} if bf16 else {"rtol": 1e-4, "atol": 1e-6}
    for name, values in reference.items():
        got = torch.tensor(results[0]["grads"][name])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, torch.tensor(values), **tol)
    assert results[0]["grads"] == results[1]["grads"]
