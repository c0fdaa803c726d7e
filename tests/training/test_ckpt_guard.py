"""vera_lightning/resume.py: a slim ``.ckpt`` is checked against the model it resumes into (the frozen
base, the projections) and an unreadable ``ckpt_path`` is named (issue 10, items 5, 12 and the
d_initial decision)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers.lightning import TinyOptModule, fit
from helpers.models import tiny_opt
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from vera_lightning import VeraCallback
from vera_lightning.core.lookup import vera_layers

TARGETS = ["q_proj", "v_proj"]


def _lambdas(module):
    return {f"{n}.{k}": p.detach().clone()
            for n, layer in vera_layers(module) for k, p in layer.adapter_params().items()}


# ---------------------------------------------------------------------- slim resume checks (item 5)
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Epoch-0 slim checkpoints of a run with projections and of a seed-only run."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, save_projection in (("with", True), ("seed", False)):
        saver = ModelCheckpoint(dirpath=root / name, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            callback = VeraCallback(r=16, target_modules=TARGETS, save_projection=save_projection)
        fit(root / f"run-{name}", TinyOptModule(with_scheduler=True), [callback, saver], max_epochs=1,
            enable_checkpointing=True)
        out[name] = root / name / "epoch=0.ckpt"
    return out


def _other_base():
    module = TinyOptModule(with_scheduler=True)
    torch.manual_seed(1)  # built differently: another seed
    module.model = tiny_opt().train()
    return module


def test_slim_ckpt_refuses_a_base_built_differently(tmp_path, ckpts):
    module = _other_base()
    with pytest.raises(ValueError, match=r"the frozen base differs from the one this checkpoint was trained on "
                                         r"\(\d+ of \d+ frozen tensors differ"):
        fit(tmp_path, module, [VeraCallback(r=16, target_modules=TARGETS)], ckpt_path=ckpts["with"], max_epochs=2)
    assert all(not p.any() for k, p in _lambdas(module).items() if k.endswith("_b"))  # nothing was loaded


class ScaleProjections(Callback):
    """Runs after VeraCallback.setup: the model's own draw differs from the trained one (another torch PRNG)."""

    def setup(self, trainer, pl_module, stage):
        with torch.no_grad():
            pl_module.vera_projections.vera_A.mul_(2)


def test_seed_only_ckpt_refuses_projections_that_differ(tmp_path, ckpts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callback = VeraCallback(r=16, target_modules=TARGETS, save_projection=False)
    with pytest.raises(ValueError, match=r"vera_A/vera_B differ from the ones this checkpoint was trained with"):
        fit(tmp_path, TinyOptModule(with_scheduler=True), [callback, ScaleProjections()], ckpt_path=ckpts["seed"],
            max_epochs=2)


def test_resume_with_another_d_initial_is_allowed(tmp_path, ckpts):
    """d_initial only sets λ_d's initial value; a resumed run takes λ_d from the checkpoint."""
    ref = TinyOptModule(with_scheduler=True)
    fit(tmp_path / "a", ref, [VeraCallback(r=16, target_modules=TARGETS)], ckpt_path=ckpts["with"], max_epochs=2)
    module = TinyOptModule(with_scheduler=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="VeraCallback")  # no "different VeraConfig" warning either
        fit(tmp_path / "b", module, [VeraCallback(r=16, target_modules=TARGETS, d_initial=0.5)],
            ckpt_path=ckpts["with"], max_epochs=2)
    expected, got = _lambdas(ref), _lambdas(module)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ---------------------------------------------------------------------- bad ckpt_path (item 12)
@pytest.mark.parametrize("kind", ["truncated", "empty", "fifo"])
def test_unreadable_ckpt_path_is_named(tmp_path, ckpts, kind):
    path = tmp_path / "bad.ckpt"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        data = ckpts["with"].read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"")
    match = {"truncated": r"ckpt_path='.*bad.ckpt' is truncated or corrupted", "empty": r"is empty \(0 bytes\)",
             "fifo": r"is not a regular file"}[kind]
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, TinyOptModule(with_scheduler=True), [VeraCallback(r=16, target_modules=TARGETS)],
            ckpt_path=path, max_epochs=2)
