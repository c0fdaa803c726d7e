"""vera_lightning/app/data/streaming.py: ``data.streaming=true`` gives the cached path's examples, checks every row
first, refuses what it cannot honour, and resumes after the last batch a step took (not a prefetched one)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers.llm import byte_bpe_tokenizer, sft_cfg

from vera_lightning.app.data import sft_rows, sft_tokens
from vera_lightning.app.data.datamodules import TextDataModule
from vera_lightning.app.data.streaming import POSITION

ROWS = [(f"name[N{i}], food[F{i % 3}]", f"N{i} serves F{i % 3} food.") for i in range(11)]


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer(chat=False)


def data(tmp_path, rows=ROWS, **overrides):
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text("mr,ref\n" + "".join(f"{json.dumps(a)},{json.dumps(b)}\n" for a, b in rows),
                                     encoding="utf-8")
    return sft_cfg(tmp_path, streaming=True, batch_size=3, cache_dir=str(tmp_path / "cache"), **overrides)


def module(cfg, tok, max_steps=5):
    dm = TextDataModule(cfg, tok)
    dm.trainer = SimpleNamespace(max_steps=max_steps)
    dm.setup("fit")
    return dm


def key(item):
    return tuple(item["input_ids"]), tuple(item["labels"])


def test_streamed_examples_are_the_cached_ones_in_a_seeded_order(tmp_path, tok):
    cfg = data(tmp_path)
    streamed = [item for item in module(cfg, tok).splits["train"]]
    assert all(item.pop(POSITION) == i for i, item in enumerate(streamed, start=1))
    expected = sft_tokens.encode_rows(sft_rows.read_rows(tmp_path / "train.csv", cfg), cfg, tok)
    assert sorted(map(key, streamed)) == sorted(map(key, expected)) and streamed != expected  # shuffled
    again = [item for item in module(cfg, tok).splits["train"]]
    assert [key(i) for i in again] == [key(i) for i in streamed]  # seeded
    assert len(list((tmp_path / "cache").glob("*/entry"))) == 1  # val.csv's: the training file is never cached


def test_every_row_is_checked_at_setup_and_refusals_name_the_fix(tmp_path, tok):
    cfg = data(tmp_path, rows=ROWS + [("name[X]", " ")])
    with pytest.raises(ValueError, match=r"train\.csv, row 12: empty response"):
        module(cfg, tok)
    with pytest.raises(ValueError, match=r"data.group_by_length=true(.|\n)*data.max_train_samples(.|\n)*num_workers=0"):
        TextDataModule(data(tmp_path, group_by_length=True, max_train_samples=4, num_workers=2), tok)
    dm = module(data(tmp_path), tok, max_steps=-1)
    with pytest.raises(ValueError, match=r"data.streaming=true: .* set trainer.max_steps"):
        dm.train_dataloader()
    dm.trainer = SimpleNamespace(max_steps=5, world_size=2)
    with pytest.raises(ValueError, match=r"with several processes \(DDP\) set data.streaming=false"):
        dm.train_dataloader()


def test_resume_continues_after_the_last_batch_a_step_took(tmp_path, tok):
    cfg = data(tmp_path)
    whole = module(cfg, tok)
    batches = [whole.on_before_batch_transfer(batch, 0) for batch in whole.train_dataloader()]
    assert len(batches) == 4 and all(POSITION not in batch for batch in batches)

    first = module(cfg, tok)
    loader = iter(first.train_dataloader())
    for _ in range(2):
        first.on_before_batch_transfer(next(loader), 0)  # two steps took their batches
    next(loader)  # a prefetched batch: not taken by a step
    state = first.state_dict()
    assert state == {"stream": {"passes": 0, "consumed": 6}}

    resumed = module(cfg, tok)
    resumed.load_state_dict(state)
    rest = [resumed.on_before_batch_transfer(batch, 0) for batch in resumed.train_dataloader()]
    assert [b["input_ids"].tolist() for b in rest] == [b["input_ids"].tolist() for b in batches[2:]]


def test_the_plan_refuses_streaming_without_max_steps_and_an_unknown_cache_mode():
    from vera_lightning.app.data.schema import check_data_values

    assert "set trainer.max_steps" in check_data_values({"streaming": True}, {"max_steps": -1})[0]
    assert check_data_values({"streaming": True}, {"max_steps": 10}) == []
    assert check_data_values({"streaming": True}) == []  # eval/predict: no training loop
    assert "data.cache='sometimes': must be on" in check_data_values({"cache": "sometimes"})[0]
