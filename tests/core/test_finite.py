"""vera_lightning/guards.py: adapter files refused when they cannot be trusted (stripped checksum,
non-floating or other dtypes, NaN/inf λ's), and the NaN/inf guard that stops training before anything
is written (issue 10, items 6, 10, 12)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers.files import WEIGHTS, filled_adapter, loaded_value
from helpers.lightning import TinyOptModule, fit
from helpers.models import MLP
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vera_lightning import VeraCallback, load_adapter, save_adapter
from vera_lightning.core.finite import NonFiniteError
from vera_lightning.core.lookup import vera_layers

TARGETS = ["q_proj", "v_proj"]


# ---------------------------------------------------------------------- what is read (items 10, 12)
def _rewrite(path, tensors=None, metadata=None):
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    data = load_file(str(path))
    save_file(tensors(data) if tensors else data, str(path), metadata=metadata(meta) if metadata else meta)


def test_our_file_with_a_stripped_checksum_is_refused(tmp_path):
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    path = tmp_path / "a" / WEIGHTS
    _rewrite(path, tensors=lambda t: {k: v + (k.endswith("lambda_b") * 1e-3) for k, v in t.items()},
             metadata=lambda m: {k: v for k, v in m.items() if "content" not in k})
    with pytest.raises(ValueError, match=r"written by vera_lightning .* lacks \['vera_lightning.content_sha256'\]"):
        load_adapter(MLP(), tmp_path / "a")


def test_file_without_our_metadata_is_checked_as_a_peft_file(tmp_path):
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    _rewrite(tmp_path / "a" / WEIGHTS, metadata=lambda m: {"format": "pt"})  # what PEFT writes
    assert loaded_value(tmp_path / "a") == 0.5


def test_tensors_in_other_dtypes_warn_or_are_refused(tmp_path):
    save_adapter(filled_adapter(0.5), tmp_path / "a")
    path = tmp_path / "a" / WEIGHTS
    _rewrite(path, tensors=lambda t: {k: v.half() for k, v in t.items()}, metadata=lambda m: {"format": "pt"})
    with pytest.warns(UserWarning, match=r"stored in another floating dtype .*vera_lambda_b \(torch.float16 -> "
                                         r"torch.float32\)"):
        assert loaded_value(tmp_path / "a") == 0.5
    _rewrite(path, tensors=lambda t: {k: v.long() for k, v in t.items()})
    model = MLP()
    with pytest.raises(ValueError, match=r"non-floating dtype: .*vera_lambda_b \(torch.int64\)"):
        load_adapter(model, tmp_path / "a")
    assert not list(vera_layers(model))


def test_non_finite_lambdas_are_never_saved_or_loaded(tmp_path):
    model = filled_adapter(0.5)
    with torch.no_grad():
        model.fc2.vera_lambda_b[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"save_adapter\(.*\) refused, nothing was written: NaN/inf in "
                                             r"\['base_model.model.fc2.vera_lambda_b'\]"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    save_adapter(filled_adapter(0.5), tmp_path / "b")
    _rewrite(tmp_path / "b" / WEIGHTS, tensors=lambda t: {k: v * float("inf") for k, v in t.items()},
             metadata=lambda m: {"format": "pt"})
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in .*fc1.vera_lambda_b"):
        load_adapter(MLP(), tmp_path / "b")


# ---------------------------------------------------------------------- NaN/inf guard (item 6)
class NanAt(TinyOptModule):
    """Returns a NaN loss from training step ``step`` on (the λ's turn NaN at the next optimizer step)."""

    def __init__(self, step: int, **kw):
        super().__init__(**kw)
        self.nan_step = step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.nan_step else loss


def test_nan_loss_stops_training_at_the_epoch_end_and_writes_nothing(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    callback = VeraCallback(r=16, target_modules=TARGETS, adapter_dir=str(tmp_path / "adapters"))
    with pytest.raises(NonFiniteError, match=r"non-finite values at the end of training epoch 0: the training loss was "
                                             r"NaN/inf .*trainable tensors hold NaN/inf.*the adapter was not saved"):
        fit(tmp_path, NanAt(2), [callback, saver], max_epochs=2, enable_checkpointing=True)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "adapters").exists()


def test_mid_epoch_checkpoints_stop_at_the_first_non_finite_step(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    callback = VeraCallback(r=16, target_modules=TARGETS, adapter_dir=str(tmp_path / "adapters"))
    with pytest.raises(NonFiniteError, match=r"before writing the checkpoint at step 3"):
        fit(tmp_path, NanAt(2), [callback, saver], max_epochs=1, enable_checkpointing=True)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step=1.ckpt", "step=2.ckpt"]
    assert sorted(os.listdir(tmp_path / "adapters")) == ["epoch=0-step=1", "epoch=0-step=2"]


def test_warn_mode_goes_on_but_never_writes_a_nan_adapter(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    callback = VeraCallback(r=16, target_modules=TARGETS, adapter_dir=str(tmp_path / "adapters"), on_nonfinite="warn")
    with pytest.warns(UserWarning, match=r"non-finite values .*on_nonfinite='warn': training goes on"):
        trainer = fit(tmp_path, NanAt(2), [callback, saver], max_epochs=2, enable_checkpointing=True)
    assert trainer.global_step == 8 and sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert not (tmp_path / "adapters").exists()


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match=r"on_nonfinite='ignore': must be one of \['raise', 'warn'\]"):
        VeraCallback(r=16, on_nonfinite="ignore")


def test_finite_training_is_not_disturbed(tmp_path):
    callback = VeraCallback(r=16, target_modules=TARGETS, adapter_dir=str(tmp_path / "adapters"))
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(tmp_path, TinyOptModule(), [callback, saver], max_epochs=1, enable_checkpointing=True)
    assert os.listdir(tmp_path / "adapters") == ["epoch=0-step=4"]
