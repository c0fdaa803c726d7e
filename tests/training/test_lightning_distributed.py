"""VeraCallback under Lightning's DDP (2 CPU processes, gloo, ddp_spawn) and FSDP (GPU only)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning_dist import CONFIG, PerturbRank1, Recorder, RegressionModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from vera_lightning import VeraCallback, VeraConfig

pytestmark = pytest.mark.distributed


def _trainer(tmp_path, callbacks, max_epochs=1, devices=2):
    strategy = DDPStrategy(start_method="spawn") if devices > 1 else "auto"
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=max_epochs,
                      callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), deterministic=True, use_distributed_sampler=False)


def _ranks(out_dir):
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def _single_process_lambdas(tmp_path, max_epochs=1):
    module = RegressionModule(per_rank_batch=8)  # one process, the same global batches
    trainer = _trainer(tmp_path, [VeraCallback(VeraConfig(**CONFIG))], max_epochs=max_epochs, devices=1)
    trainer.fit(module)
    return {n: p.detach() for n, p in module.named_parameters() if "vera_lambda" in n}


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_fit")
    trainer = _trainer(out, [PerturbRank1(), VeraCallback(VeraConfig(**CONFIG)), Recorder(str(out))])
    trainer.fit(RegressionModule(per_rank_batch=4))
    return _ranks(out), out


def test_projections_broadcast_at_setup_despite_different_ranks(ddp_fit):
    ranks, _ = ddp_fit
    assert all(r["projections_same_at_fit_start"] for r in ranks)
    assert ranks[0]["ddp_ignored"] == ["vera_projections.vera_A", "vera_projections.vera_B"]


def test_lambdas_identical_across_ranks_and_equal_single_process(ddp_fit, tmp_path):
    ranks, _ = ddp_fit
    assert ranks[0]["lambdas"] == ranks[1]["lambdas"]
    reference = _single_process_lambdas(tmp_path)
    for name, value in reference.items():
        assert not torch.equal(value, torch.tensor(ranks[0]["lambdas"][name]).new_zeros(value.shape))
        torch.testing.assert_close(torch.tensor(ranks[0]["lambdas"][name]), value, rtol=0, atol=1e-6)


def test_bytes_per_step_are_the_trainable_gradients_only(ddp_fit):
    ranks, _ = ddp_fit
    steps = ranks[0]["per_step"]
    assert len(steps) == 8
    for step in steps:
        assert step["allreduce"] == ranks[0]["trainable_bytes"]
        assert step["broadcast"] == 0  # no buffer but the (ignored) projections in this model
    assert ranks[0]["projection_bytes"] > 10 * ranks[0]["trainable_bytes"]


def test_resumed_ddp_run_from_slim_checkpoint_continues_identically(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    _trainer(straight, [VeraCallback(VeraConfig(**CONFIG)), Recorder(str(straight))],
             max_epochs=2).fit(RegressionModule())
    first = tmp_path / "first"
    first.mkdir()
    ckpt = ModelCheckpoint(dirpath=str(first), save_last=True)
    _trainer(first, [VeraCallback(VeraConfig(**CONFIG)), ckpt], max_epochs=1).fit(RegressionModule())
    last = first / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert not any(k.endswith(".weight") and "vera" not in k for k in saved["state_dict"])  # slim
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    _trainer(resumed, [VeraCallback(VeraConfig(**CONFIG)), Recorder(str(resumed))],
             max_epochs=2).fit(RegressionModule(), ckpt_path=str(last))
    a, b = _ranks(straight), _ranks(resumed)
    assert a[0]["lambdas"] == b[0]["lambdas"] and b[0]["lambdas"] == b[1]["lambdas"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning FSDP/ModelParallel needs CUDA")
def test_lightning_fsdp_trains_lambdas(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    module = RegressionModule()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if "vera_lambda" in n}
    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=FSDPStrategy(use_orig_params=True),
                         max_epochs=1, callbacks=[VeraCallback(VeraConfig(**CONFIG))], logger=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module)
    after = {n: p.detach().cpu() for n, p in module.named_parameters() if "vera_lambda" in n}
    assert any(not torch.equal(before[n], after[n]) for n in before)
