"""objective=dpo through the app: train (fresh and from an SFT adapter), eval's metrics.json, export, refusals.

The plan's ``dpo`` (vera_lightning/app/commands/planning.py), train.py's ``adapter=`` and the reference it records.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.app import SMOKE, compose_app
from helpers.tree import snapshot

from vera_lightning.app.commands.evaluate import evaluate
from vera_lightning.app.commands.export import export_run
from vera_lightning.app.commands.planning import make_plan
from vera_lightning.app.commands.train import train

METRICS = ("val/loss", "val/reward_accuracy", "val/reward_margin", "val/rewards_chosen", "val/rewards_rejected",
           "val/logps_chosen", "val/logps_rejected")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": f"question {i} about the eagle", "chosen": f"the good answer {i}",
             "rejected": f"bad {i} reply here"} for i in range(12)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return folder


def dpo_args(pairs_dir, *extra):
    return [*SMOKE, "objective=dpo", "data=preference", f"data.data_dir={pairs_dir}", "data.chat_template=false",
            "data.max_length=32", "trainer.max_steps=3", *extra]


@pytest.mark.slow
def test_dpo_from_the_base_then_from_an_sft_adapter(tmp_path, pairs_dir):
    first = train(compose_app("train", tmp_path / "base", *dpo_args(pairs_dir)))
    assert first["metric_name"] == "val/reward_accuracy" and first["steps"] == 3
    assert all(name in first for name in METRICS)
    assert json.loads((tmp_path / "base" / "plan.json").read_text())["dpo"]["reference_adapter"] is None

    # a DPO run from the first run's adapter: it starts there, and a frozen copy of it is the reference
    sft = tmp_path / "base" / "adapter"
    second = train(compose_app("train", tmp_path / "from_sft", *dpo_args(pairs_dir, f"adapter={sft}",
                                                                          "dpo.precompute_reference=true")))
    plan = json.loads((tmp_path / "from_sft" / "plan.json").read_text())
    assert plan["dpo"]["reference_adapter"] == str(sft) and str(sft) in plan["inputs"]
    assert second["trainable_params"] == first["trainable_params"]  # the reference's λ's are frozen

    # eval replays the reference its training run recorded; its metrics.json holds the DPO metrics
    record = evaluate(compose_app("eval", tmp_path / "eval", *dpo_args(pairs_dir,
                                                                       f"adapter={tmp_path / 'from_sft' / 'adapter'}")))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in METRICS:
        assert saved[name] == pytest.approx(record[name])
    assert saved["val/loss"] == pytest.approx(second["val/loss"], rel=1e-5)
    assert saved["metric_name"] == "val/reward_accuracy"

    # the DPO-trained adapter is an ordinary VeRA adapter: a LoRA export of it works as for any other
    cfg = compose_app("train", tmp_path / "from_sft", *dpo_args(pairs_dir))
    exported = export_run(tmp_path / "from_sft" / "adapter", "lora", tmp_path / "lora", base=cfg)
    assert exported.rank == cfg.vera.r
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("extra, message", [
    (["objective=default"], "only objective=dpo trains"),
    (["data=demo_text"], "objective=dpo trains on preference pairs"),
    (["finetune=full"], "finetune='full'"),
    (["dpo.beta=0"], r"dpo.beta=0"),
    (["dpo.reference=adapter"], "dpo.reference=adapter needs the adapter training starts from"),
])
def test_inconsistent_dpo_settings_are_refused_in_the_plan(tmp_path, pairs_dir, extra, message):
    cfg = compose_app("train", tmp_path / "run", *dpo_args(pairs_dir, *extra))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=message):
        make_plan(cfg, "train")
    assert snapshot(tmp_path) == before


def test_an_adapter_with_other_vera_settings_is_refused_before_anything_is_written(tmp_path, pairs_dir):
    train(compose_app("train", tmp_path / "sft", *dpo_args(pairs_dir, "trainer.max_steps=1")))
    before = snapshot(tmp_path)
    cfg = compose_app("train", tmp_path / "run", *dpo_args(pairs_dir, f"adapter={tmp_path / 'sft'}", "vera.r=8"))
    with pytest.raises(ValueError, match=r"vera.r=8 \(the adapter has 16\); set vera.r=16"):
        train(cfg)
    assert snapshot(tmp_path) == before
    cfg = compose_app("train", tmp_path / "sft", *dpo_args(pairs_dir, f"adapter={tmp_path / 'sft'}", "overwrite=true"))
    with pytest.raises(ValueError, match="an input of this command"):
        make_plan(cfg, "train")


def test_sft_on_the_chosen_replies_then_its_adapter_starts_dpo(tmp_path, pairs_dir):
    sft_args = [*SMOKE, "data=preference", f"data.data_dir={pairs_dir}", "data.chat_template=false",
                "data.max_length=32", "data.preference_target=chosen"]
    sft = train(compose_app("train", tmp_path / "sft", *sft_args))
    assert sft["metric_name"] == "val/loss" and sft["steps"] == 2
    plan = make_plan(compose_app("train", tmp_path / "dpo", *dpo_args(pairs_dir, f"adapter={tmp_path / 'sft'}")),
                     "train")
    assert plan.dpo["reference_adapter"] == str(tmp_path / "sft" / "adapter")
    assert plan.adapter["kind"] == "adapter"
