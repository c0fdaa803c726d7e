"""vera_lightning/app/commands/preflight.py: every check that needs no training runs before the model is built and
before the run directory is written; typed ``generate`` settings (generate/schema) fail at compose time."""

from __future__ import annotations

import pytest
from helpers.app import SMOKE, compose_app
from hydra.errors import ConfigCompositionException

import vera_lightning.app.commands.build as build_module
from vera_lightning.app.commands.planning import make_plan
from vera_lightning.app.commands.preflight import preflight
from vera_lightning.app.commands.train import train
from vera_lightning.app.generation.generate import GenerateSettings

SFT = [*SMOKE, "data=sft", "data.train_file=train.csv", "data.val_file=val.csv", "data.prompt_field=mr",
       "data.response_field=ref", "data.truncation=drop", "trainer.max_steps=1", "eval_before=false",
       "generate.val_prompts=0"]


def test_generate_values_of_the_wrong_type_fail_at_compose_time_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException) as caught:
        compose_app("predict", tmp_path, "input=x", "generate.max_new_tokens=2.7")
    assert "generate.max_new_tokens" in str(caught.value) + str(caught.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="generate.nucleus"):
        compose_app("predict", tmp_path, "input=x", "generate.nucleus=0.9")
    # a quoted "false" is a boolean false under the schema (it was read as true)
    assert compose_app("predict", tmp_path, "input=x", 'generate.do_sample="false"').generate.do_sample is False
    with pytest.raises(ValueError, match=r"generate.max_new_tokens=2.7: must be an integer"):
        GenerateSettings.from_config({"max_new_tokens": 2.7})  # what gets past Hydra (+key, a plain dict)
    with pytest.raises(ValueError, match=r"generate.do_sample='false': must be true or false"):
        GenerateSettings.from_config({"do_sample": "false"})
    cfg = compose_app("predict", tmp_path, "input=x", "experiment=smoke", "generate.do_sample=true",
                      "generate.num_beams=2")
    with pytest.raises(ValueError, match=r"beam sampling is not supported"):  # cross-field: the dataclass's rule
        preflight(make_plan(cfg, "predict"))


@pytest.mark.parametrize("problem, fix, message", [
    ("data.train_file=missing.csv", "data.train_file=train.csv", r"data.train_file='missing.csv': .* does not exist"),
    ("data.max_length=16", "data.max_length=48", r"all 8 rows are longer than data.max_length=16 under "
                                                 r"data.truncation='drop'"),
])
def test_refused_before_the_model_and_the_record_then_the_corrected_command_runs_there(tmp_path, monkeypatch,
                                                                                       problem, fix, message):
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text("mr,ref\n" + "".join(f"name[{i}],{'long text ' * 8}\n" for i in range(8)),
                                     encoding="utf-8")
    run = tmp_path / "run"
    real = build_module.build_model
    monkeypatch.setattr(build_module, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(compose_app("train", run, *SFT, f"data.data_dir={tmp_path}", problem))
    assert not run.exists() or list(run.iterdir()) == []  # no csv/, no summary.json, no record
    monkeypatch.setattr(build_module, "build_model", real)
    metrics = train(compose_app("train", run, *SFT, f"data.data_dir={tmp_path}", fix))
    assert metrics["steps"] == 1 and (run / "adapter" / "adapter_config.json").is_file()
