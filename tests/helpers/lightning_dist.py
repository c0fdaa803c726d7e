"""LightningModule and callbacks for the 2-process Lightning tests (importable for ddp_spawn)."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from vera_lightning import VeraConfig, apply_vera

CONFIG = dict(r=32, target_modules=["0", "2"], init_weights=False)
N_SAMPLES = 64


class RegressionModule(pl.LightningModule):
    """A small MLP regression; VeRA is applied in ``__init__`` when ``pre_inject``."""

    def __init__(self, per_rank_batch: int = 4, pre_inject: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        if pre_inject:
            apply_vera(self, VeraConfig(**CONFIG))
        self.per_rank_batch = per_rank_batch
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(torch.randn(N_SAMPLES, 16, generator=g), torch.randn(N_SAMPLES, 8, generator=g))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    def train_dataloader(self):
        # rank r takes samples r, r+2, ...: with equal per-rank batches DDP's averaged gradient
        # equals a single process's gradient over the union (samples 0..2B-1 at step 0, ...)
        sampler = None
        if self.trainer.world_size > 1:
            sampler = DistributedSampler(self.data, shuffle=False)
        return DataLoader(self.data, batch_size=self.per_rank_batch, shuffle=False, sampler=sampler)


class PerturbRank1(pl.Callback):
    """Makes rank 1's projections different before VeraCallback.setup runs."""

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.vera_projections.vera_A.mul_(-3.0)
                pl_module.vera_projections.vera_B.add_(1.0)


def counting_allreduce_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    Recorder.bytes["allreduce"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


class Recorder(pl.Callback):
    """Records, per rank, projection agreement, bytes sent per step and the final λ's."""

    bytes = {"allreduce": 0, "broadcast": 0}

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.result: dict = {"per_step": []}

    def setup(self, trainer, pl_module, stage):
        import torch.nn.parallel.distributed as ddp_module

        real = ddp_module.dist._broadcast_coalesced

        def counting(group, tensors, *args, **kwargs):
            Recorder.bytes["broadcast"] += sum(t.numel() * t.element_size() for t in tensors)
            return real(group, tensors, *args, **kwargs)

        ddp_module.dist._broadcast_coalesced = counting

    def on_fit_start(self, trainer, pl_module):
        wrapper = trainer.strategy.model
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
            wrapper.register_comm_hook(None, counting_allreduce_hook)  # Lightning only does so on CUDA
        same = True
        if dist.is_initialized():
            for buf in (pl_module.vera_projections.vera_A, pl_module.vera_projections.vera_B):
                gathered = [torch.zeros_like(buf) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, buf.contiguous())
                same = same and all(torch.equal(g, gathered[0]) for g in gathered)
        self.result["projections_same_at_fit_start"] = same

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Recorder.bytes.update(allreduce=0, broadcast=0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.result["per_step"].append(dict(Recorder.bytes))

    def on_train_end(self, trainer, pl_module):
        self.result["lambdas"] = {n: p.detach().tolist() for n, p in pl_module.named_parameters()
                                  if "vera_lambda" in n}
        self.result["trainable_bytes"] = sum(p.numel() * p.element_size() for p in pl_module.parameters()
                                             if p.requires_grad)
        self.result["projection_bytes"] = sum(b.numel() * b.element_size()
                                              for b in pl_module.vera_projections.buffers())
        self.result["ddp_ignored"] = sorted(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(self.result, fh)
        if dist.is_initialized():
            # let gloo's threads drop the comm hook's Python callbacks while the GIL is free, so that
            # DDP's teardown cannot deadlock on them (see dist_workers.finish)
            dist.barrier()
