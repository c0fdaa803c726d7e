"""LightningModules and Trainer settings shared by the callback and checkpoint tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from helpers.models import tiny_opt
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


class TinyOptModule(pl.LightningModule):
    """A causal-LM LightningModule around a tiny OPT built from config (deterministic data)."""

    def __init__(self, lr: float = 1e-2, hidden: int = 32, with_scheduler: bool = False, shuffle: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_opt(hidden).train()
        self.lr, self.with_scheduler, self.shuffle = lr, with_scheduler, shuffle

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        if not self.with_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        ids = torch.randint(0, 96, (16, 8), generator=torch.Generator().manual_seed(0))
        data = TensorDataset(ids)
        if self.shuffle:  # a sampler with set_epoch: the order is a function of (seed, epoch), so resumable
            sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
            return DataLoader(data, batch_size=4, sampler=sampler)
        return DataLoader(data, batch_size=4, shuffle=False)

    def val_dataloader(self):
        ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(ids), batch_size=4)


def trainer_kwargs(tmp_path, **overrides):
    """A quiet CPU Trainer configuration."""
    kwargs = dict(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def fit(tmp_path, module, callbacks, ckpt_path=None, **kw) -> pl.Trainer:
    """Fit ``module`` with ``callbacks`` on a :func:`trainer_kwargs` Trainer; returns the Trainer."""
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every state-dict tensor."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
