"""Prompt/response data through ``scripts/train.py trainer=ddp`` (2 CPU processes, gloo; Lightning re-runs the
script for rank 1, as it does for a user) on a tiny LLaMA with grouped-query attention (k/v narrower than q):
both ranks train the same λ's on disjoint rows of the length-grouped batches, every row's loss covers its
response only (prompt and padding at -100, as the single-process encoding says), and one adapter is written,
holding the ranks' λ's. ``trainer=fsdp`` is Lightning's FSDP, which needs CUDA: the same run is skipped
without it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.app import SMOKE, compose_app, run_script

from vera_lightning import load_adapter
from vera_lightning.app.commands.build import build_components
from vera_lightning.app.commands.planning import make_plan

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROWS = [("name[The Eagle], food[French]", "The Eagle serves French food."),
        ("name[Zizzi], area[riverside]", "Zizzi is by the riverside."),
        ("name[The Eagle], food[French]", "French food at The Eagle."),
        ("name[Aromi]", "Aromi is a restaurant."),
        ("name[The Mill], food[Indian], area[city centre]", "The Mill serves Indian food in the city centre."),
        ("name[Cotto]", "Cotto."),
        ("name[Alimentum], food[Chinese], priceRange[cheap]", "Alimentum is a cheap Chinese place."),
        ("name[Aromi], food[Italian]", "Aromi serves Italian food.")]
# tiny_opt's from_config (hidden 32, 2 layers, 4 heads, 128 positions) made a LLaMA: a structured model config
# cannot delete the node and put another in its place; the OPT-only keys left in it are ignored by LlamaConfig
LLAMA = ["model.from_config.model_type=llama", "+model.from_config.intermediate_size=64",
         "+model.from_config.num_key_value_heads=2"]


def _overrides(data_dir, out, trainer: str):
    return [*SMOKE, f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2",
            "+trainer.use_distributed_sampler=true", *LLAMA,
            f"hydra.run.dir={out.parent / 'run'}", "data=sft", f"data.data_dir={data_dir}",
            "data.train_file=train.csv", "data.val_file=val.csv",
            "data.prompt_field=mr", "data.response_field=ref", "data.prompt_template='Describe: {mr}\n'",
            "data.max_length=64", "data.batch_size=2", "data.group_by_length=true", "generate.max_new_tokens=4",
            "trainer.max_steps=2", "optim.lr=0.2", "eval_before=false",
            "+callbacks.rank_record._target_=helpers.rank_record.RankRecord", f"+callbacks.rank_record.out={out}"]


@pytest.mark.parametrize("trainer", [
    "ddp",
    pytest.param("fsdp", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="Lightning's FSDP strategy needs CUDA")),
])
def test_prompt_response_data_trains_the_same_lambdas_on_both_ranks_with_masked_labels(trainer, tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "ranks"
    data_dir.mkdir()
    out.mkdir()
    for name in ("train.csv", "val.csv"):
        (data_dir / name).write_text("mr,ref\n" + "".join(f'"{mr}",{ref}\n' for mr, ref in ROWS), encoding="utf-8")
    overrides = _overrides(data_dir, out, trainer)
    proc = run_script("train", *overrides, cwd=tmp_path, extra_env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["lambdas"] == ranks[1]["lambdas"]  # DDP kept the replicas equal
    assert any(v != 0 for values in ranks[0]["lambdas"].values() for v in values if isinstance(v, float))

    # what each rank trained on: whole examples of the single-process encoding, disjoint between ranks
    overrides = [o for o in overrides if not o.startswith(("hydra.", "+callbacks."))]
    reference = build_components(make_plan(compose_app("train", tmp_path / "ref", *overrides), "train")).datamodule
    reference.setup("fit")
    encoded = [(item["input_ids"], item["labels"]) for item in reference.splits["train"]]
    seen = [[(row["input_ids"], row["labels"]) for row in rank["rows"]] for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 2 * 2  # 2 steps of 2 rows per rank
    for rank in seen:
        for ids, labels in rank:
            assert (ids, labels) in encoded
            first = next(i for i, label in enumerate(labels) if label != -100)
            assert all(label == -100 for label in labels[:first]) and first > 0  # the prompt is masked
            assert labels[first:] == ids[first:]  # the response (and its EOS) is the target
    assert all(label == -100 for rank in ranks for row in rank["rows"] for label in row["padding_labels"])
    assert not set(map(str, seen[0][:2])) & set(map(str, seen[1][:2]))  # each step: different rows per rank

    # one adapter, rank 0's λ's
    adapter = tmp_path / "run" / "adapter"
    assert sorted(p.name for p in adapter.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert not list(adapter.glob("*/adapter_config.json"))
    loaded = build_components(make_plan(compose_app("train", tmp_path / "ref2", *overrides), "train")).model
    load_adapter(loaded, adapter)
    theirs = {n: p.detach() for n, p in loaded.named_parameters() if "vera_lambda" in n}
    assert len(theirs) == len(ranks[0]["lambdas"]) == 2 * 2 * 2  # 2 layers x (q, v) x (λ_b, λ_d)
    for name, value in ranks[0]["lambdas"].items():
        match = [n for n in theirs if name.endswith(n)]
        assert len(match) == 1, name
        torch.testing.assert_close(theirs[match[0]], torch.tensor(value), rtol=0, atol=0)
    assert metrics["steps"] == 2 and "val/bleu" in metrics
