"""vera_lightning/app/commands/checks.py: the app refuses bad values at startup, naming the key, the value
and the fix, before any work or any file is written (issue 10, items 6, 8, 12 and the
max_steps/max_length/devices decisions).

Modules: vera_lightning/app/commands/build.py, vera_lightning/app/data/text_files.py.
"""

from __future__ import annotations

import importlib

import pytest
from helpers.app import compose_app
from omegaconf import OmegaConf

from vera_lightning.app.commands.checks import check_run_config
from vera_lightning.app.commands.train import train
from vera_lightning.app.data.datamodules import read_split


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)`` -> the real conf/train.yaml composed, writing under ``tmp_path / "run"``."""
    return lambda *overrides: compose_app("train", tmp_path / "run", *overrides)


def _refused(make_cfg, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train(make_cfg(*overrides))
    assert not (tmp_path / "run").exists()  # refused before any work: not even the run directory


@pytest.mark.parametrize("data", ["sst2", "table"])
def test_data_without_data_dir_is_refused_not_trained_on_the_demo_set(make_cfg, tmp_path, data):
    cfg = make_cfg(f"data={data}")
    assert OmegaConf.is_missing(cfg.data, "data_dir")  # the ??? marker survives the composition
    _refused(make_cfg, tmp_path, [f"data={data}"],
             rf"data.data_dir is required with data={data} \(it is \?\?\? there\): add data.data_dir=\.\.\.")


def test_demo_configs_still_default_to_the_built_in_data(make_cfg):
    cfg = make_cfg()
    assert cfg.data.name == "demo_sentiment" and cfg.data.data_dir is None
    assert set(make_cfg("data=sst2", "data.data_dir=/x").data) == set(cfg.data)  # same keys as the demo config


@pytest.mark.parametrize("overrides,match", [
    (["seed=abc"], r"seed='abc': must be an integer"),
    (["optim.lr=abc"], r"optim.lr='abc': must be a finite number > 0"),
    (["optim.head_lr=-1"], r"optim.head_lr=-1: must be a finite number > 0"),
    (["trainer.max_steps=0"], r"trainer.max_steps=0: must be -1 .* 0 would train nothing"),
    (["trainer.max_epochs=0"], r"trainer.max_epochs=0: must be a positive integer"),
    (["data.max_length=0"], r"data.max_length=0: must be a positive integer"),
    (["overwrite=yes please"], r"overwrite='yes please': must be true or false"),
    (["vera.d_initial=nan"], r"d_initial=nan: must be a number, finite"),
    (["vera.d_initial=1e308"], r"d_initial=1e\+308: must be a number, finite"),
    (["vera.projection_prng_key=18446744073709551616"], r"projection_prng_key=18446744073709551616: .*\[-2\*\*63"),
    (["callbacks=early_stopping", "trainer.limit_val_batches=0"],  # else a traceback after the first epoch
     r"trainer.limit_val_batches=0 validates nothing, but callbacks.early_stopping stops on val/loss: "
     r"let validation run \(drop trainer.limit_val_batches=0\) or leave callbacks=early_stopping out"),
])
def test_bad_values_name_the_key(make_cfg, tmp_path, overrides, match):
    _refused(make_cfg, tmp_path, ["experiment=smoke", *overrides], match)


def test_several_problems_are_reported_at_once(make_cfg):
    with pytest.raises(ValueError, match=r"(?s)seed='abc'.*optim.lr='x'"):
        check_run_config(make_cfg("seed=abc", "optim.lr=x"))


def test_three_cpu_devices_are_allowed(make_cfg):
    """Decision: trainer.devices=3 on CPU is a valid 3-process DDP run (gloo); nothing refuses it."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    cfg = make_cfg("trainer.devices=3")
    check_run_config(cfg)
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.num_devices == 3 and isinstance(trainer.strategy, DDPStrategy)


@pytest.mark.parametrize("fmt,suffix", [("table", ".tsv"), ("text", ".txt")])
def test_non_utf8_file_names_the_file_and_line(tmp_path, fmt, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(("sentence\tlabel\n" if fmt == "table" else "") .encode() + b"good\t1\nna\xefve caf\xe9\t0\n")
    cfg = {"format": fmt, "data_dir": str(tmp_path), "train_file": path.name, "task": "classification",
           "text_field": "sentence", "label_field": "label"}
    line = 3 if fmt == "table" else 2
    with pytest.raises(ValueError, match=rf"train{suffix}:{line}: not UTF-8 \(byte 0xef at column 3\)"):
        read_split(cfg, "train")


@pytest.mark.parametrize("suffix,row", [(".tsv", "no label here"), (".csv", "no label, here")])
def test_a_row_with_too_few_columns_is_named_with_its_line_not_as_a_bad_label(tmp_path, suffix, row):
    sep = "\t" if suffix == ".tsv" else ","
    (tmp_path / f"train{suffix}").write_text(f"sentence{sep}label\ngood{sep}1\n{row.replace(', ', ' ')}\n")
    cfg = {"format": "table", "data_dir": str(tmp_path), "train_file": f"train{suffix}", "task": "classification",
           "text_field": "sentence", "label_field": "label"}
    fix = "tabs" if suffix == ".tsv" else "commas"
    with pytest.raises(ValueError, match=rf"train{suffix}:3: the row has too few columns \(1 of the header's 2: "
                                         rf"\['sentence', 'label'\]\), so it has no \['label'\] field; "
                                         rf"separate the fields with {fix}"):
        read_split(cfg, "train")


@pytest.mark.parametrize("strategy", ["trainer.strategy=ddp_spawn", "trainer.strategy=ddp_notebook",
                                      "trainer.strategy=ddp_fork",
                                      "+trainer.strategy.start_method=spawn"])
def test_strategies_training_in_child_processes_are_refused_before_any_work(make_cfg, tmp_path, strategy):
    overrides = ["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu"]
    if strategy.startswith("+"):  # a DDPStrategy node with a start method
        overrides += ["~trainer.strategy", "+trainer.strategy._target_=lightning.pytorch.strategies.DDPStrategy"]
    name = strategy.split("=", 1)[1]
    _refused(make_cfg, tmp_path, [*overrides, strategy],
             rf"trainer.strategy='{name}' trains in child processes of this one, so the trained λ's would not come "
             r"back to be saved; use trainer=ddp")


def test_a_rank_other_than_zero_joins_the_run_directory_rank_zero_checked(tmp_path, monkeypatch):
    """``trainer=ddp`` re-runs the script for rank 1 into rank 0's directory, which rank 0 may have written to."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    train_module = importlib.import_module("vera_lightning.app.commands.train")  # the module, not the function
    preflight_module = importlib.import_module("vera_lightning.app.commands.preflight")

    seen = []
    monkeypatch.setattr(preflight_module, "check_run_dir", lambda *a, **k: seen.append(a[0]))
    monkeypatch.setattr(train_module, "build_components", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    cfg = compose_app("train", tmp_path / "run", "experiment=smoke")
    for rank, checked in ((0, True), (1, False)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with pytest.raises(RuntimeError, match="stop"):
            train_module.train(cfg)
        assert bool(seen) == checked
        seen.clear()
