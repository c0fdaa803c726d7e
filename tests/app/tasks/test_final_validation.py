"""``final_metrics``: the validation inside ``fit`` is reused only when it saw the final weights."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vera_lightning.app.tasks.final_validation import ValidationMemo, final_metrics


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.validations = 0

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y))
        self.log("val/mae", (self.net(x) - y).abs().mean())

    def on_validation_epoch_end(self) -> None:
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


class ShiftAtTrainEnd(pl.Callback):
    """Changes the weights after the last validation (as stochastic weight averaging does)."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.net.bias += 1.0


def fit(*callbacks, **trainer_kwargs):
    memo, module, data = ValidationMemo(), Regressor(), Data()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=2, callbacks=[memo, *callbacks],
                         **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer, module, data, memo


def validated(trainer, module, data):
    return {k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()}


def test_the_validation_at_the_last_step_is_reused_and_equals_a_fresh_one():
    trainer, module, data, memo = fit()
    assert module.validations == 2  # the sanity check and the end of the epoch
    metrics, reused = final_metrics(trainer, module, data, memo)
    assert reused and module.validations == 2  # nothing ran again
    assert set(metrics) == {"val/loss", "val/mae"}
    assert metrics == pytest.approx(validated(trainer, module, data), rel=1e-6)


def test_weights_changed_after_the_last_validation_are_validated_again():
    trainer, module, data, memo = fit(ShiftAtTrainEnd())
    metrics, reused = final_metrics(trainer, module, data, memo)
    assert not reused and module.validations == 3
    assert metrics["val/loss"] != pytest.approx(memo.metrics["val/loss"])  # the memo described the old weights


def test_no_validation_at_the_last_step_means_a_fresh_one():
    trainer, module, data, memo = fit(val_check_interval=3)  # validates after batch 3 of 4 only
    assert memo.step == 3 and trainer.global_step == 4
    metrics, reused = final_metrics(trainer, module, data, memo)
    assert not reused and metrics == pytest.approx(validated(trainer, module, data), rel=1e-6)


def test_only_the_sanity_check_ran_means_a_fresh_one():
    trainer, module, data, memo = fit(limit_val_batches=2, check_val_every_n_epoch=2)
    assert memo.step is None
    _, reused = final_metrics(trainer, module, data, memo)
    assert not reused
