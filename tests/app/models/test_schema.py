"""vera_lightning/app/models/schema.py: the ``model`` group's keys and types, checked when Hydra composes; keys added
with ``+model.<key>`` that nothing reads are refused by the preflight."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.app import SMOKE, compose_app
from hydra.errors import ConfigCompositionException

from vera_lightning.app.commands.planning import make_plan
from vera_lightning.app.models.schema import ModelSchema, check_model_keys

MODELS = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes_under_the_schema(tmp_path, model):
    cfg = compose_app("train", tmp_path, f"model={model}")
    assert set(cfg.model.keys()) == {f for f in ModelSchema.__dataclass_fields__}
    check_model_keys(cfg.model)


def test_wrong_types_fail_at_compose_time_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException) as caught:
        compose_app("train", tmp_path, *SMOKE, "model.gradient_checkpointing=maybe")
    assert "model.gradient_checkpointing" in str(caught.value) + str(caught.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="model.compute_dtyp"):  # a misspelt key
        compose_app("train", tmp_path, *SMOKE, "model.compute_dtyp=bf16")
    # what the schema allows stays open: extra from_pretrained kwargs, compile's three values
    cfg = compose_app("train", tmp_path, *SMOKE, "+model.from_pretrained_kwargs.revision=main", "model.compile=auto")
    assert (cfg.model.from_pretrained_kwargs.revision, cfg.model.compile) == ("main", "auto")


def test_an_added_key_nothing_reads_is_refused_before_any_work(tmp_path):
    cfg = compose_app("train", tmp_path / "run", *SMOKE, "+model.quantise=nf4")
    with pytest.raises(ValueError, match=r"model.quantise \(did you mean quantize\?\): not a model setting, so it "
                                         r"would be ignored .* model "
                                         r"settings are compile, compute_dtype, "):
        make_plan(cfg, "train")
    assert not (tmp_path / "run").exists()
