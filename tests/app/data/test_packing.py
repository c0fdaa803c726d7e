"""Batching causal-LM examples: length-grouped batches (seeded, resumable) and packing (same loss as padded)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.llm import byte_bpe_tokenizer, sft_cfg
from helpers.models import tiny_gpt2, tiny_llama, tiny_opt
from torch.utils.data import RandomSampler

from vera_lightning.app.data.datamodules import TextDataModule
from vera_lightning.app.data.packing import LengthGroupedBatchSampler, check_packing, collate, pack, padding_fraction


def examples(n: int, seed: int = 0, vocab: int = 96) -> list[dict[str, list[int]]]:
    """Examples of 3..20 tokens whose first ~third is a prompt (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(3, 21, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = length // 3
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return items


def sampler(lengths, seed=0, batch_size=4, mult=2):
    g = torch.Generator().manual_seed(seed)
    return LengthGroupedBatchSampler(RandomSampler(range(len(lengths)), generator=g), batch_size,
                                     lengths=lengths, generator=g, mega_batch_mult=mult)


def test_length_grouped_batches_cover_everything_once_and_cut_padding():
    lengths = [len(item["input_ids"]) for item in examples(103)]
    grouped = sampler(lengths)
    epoch = list(grouped)
    assert sorted(i for batch in epoch for i in batch) == list(range(103))
    assert len(epoch) == len(grouped) == 12 * 2 + 2  # 12 mega-batches of 2 x 4, then 7 examples in 2 batches
    assert all(lengths[b[j]] >= lengths[b[j + 1]] for b in epoch for j in range(len(b) - 1))
    plain = [list(range(i, min(i + 4, 103))) for i in range(0, 103, 4)]
    assert padding_fraction(epoch, lengths) < padding_fraction(plain, lengths)
    one_mega = list(sampler(lengths, mult=50))  # all 103 examples in one mega-batch: lengths differ by <= 1 in a batch
    assert all(lengths[b[0]] - lengths[b[-1]] <= 1 for b in one_mega)
    assert epoch == list(sampler(lengths)) and epoch != list(grouped)  # seeded; the next epoch differs
    assert list(sampler(lengths, seed=1)) != epoch
    dropped = LengthGroupedBatchSampler(range(103), 4, drop_last=True, lengths=lengths)
    assert len(list(dropped)) == len(dropped) == 25 and all(len(b) == 4 for b in dropped)


def test_group_by_length_resumes_the_shuffle_from_a_checkpoint(tmp_path):
    rows = [{"q": "Hello " * (1 + i % 7), "a": "there " * (1 + i % 3)} for i in range(24)]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sft_cfg(tmp_path, train_file="train.jsonl", val_file="val.jsonl", prompt_field="q", response_field="a",
                  group_by_length=True, batch_size=4, seed=3)
    tok = byte_bpe_tokenizer(chat=False)
    dm = TextDataModule(cfg, tok)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, LengthGroupedBatchSampler)
    first = [b["input_ids"].tolist() for b in loader]
    state = dm.state_dict()  # as a checkpoint at the end of the first epoch saves it
    second = [b["input_ids"].tolist() for b in loader]
    resumed = TextDataModule(cfg, tok)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    assert [b["input_ids"].tolist() for b in resumed.train_dataloader()] == second != first
    lengths = [len(item["input_ids"]) for item in dm.splits["train"]]
    batches = [list(b) for b in dm.train_dataloader().batch_sampler]
    in_file_order = [list(range(i, i + 4)) for i in range(0, 24, 4)]
    assert padding_fraction(batches, lengths) < padding_fraction(in_file_order, lengths)


def test_pack_fills_rows_and_restarts_positions():
    items = examples(40)
    rows = pack(items, max_length=24)
    assert all(len(r["input_ids"]) <= 24 for r in rows) and len(rows) < 40
    total = sum(len(item["input_ids"]) for item in items)
    assert sum(len(r["input_ids"]) for r in rows) == total and len(rows) <= -(-total // 24) + 1  # best fit
    seen = []
    for row in rows:
        starts = [j for j, p in enumerate(row["position_ids"]) if p == 0]
        ends = starts[1:] + [len(row["input_ids"])]
        for s, e in zip(starts, ends):
            match = [i for i, item in enumerate(items) if item["input_ids"] == row["input_ids"][s:e]]
            seen.append(match[0])
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == -100 and row["labels"][s + 1:e] == items[match[0]]["labels"][1:]
    assert sorted(seen) == list(range(40)) and pack(items, 24) == rows
    with pytest.raises(ValueError, match="example 0 has 9 tokens, more than data.max_length=8"):
        pack([{"input_ids": [1] * 9, "labels": [1] * 9}], 8)


def loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_the_padded_loss(attention):
    torch.manual_seed(0)
    model = tiny_llama()
    model.config._attn_implementation = attention
    items = examples(12, seed=1)
    padded, packed = collate(items, pad_id=0), collate(pack(items, max_length=40), pad_id=0)
    assert "attention_mask" not in packed and packed["use_cache"] is False and packed["input_ids"].shape[0] < 12
    assert int((packed["labels"][:, 1:] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    ref = loss(model.double(), padded)
    # float64: the two layouts differ only in summation order (~1e-16); a leak between examples is ~1e-2
    assert loss(model, packed) == pytest.approx(ref, rel=1e-12)
    model.float()
    # float32: each within 1e-5 of the float64 value (float32 eps 1.2e-7, accumulated over two layers)
    assert loss(model, packed) == pytest.approx(ref, rel=1e-5) and loss(model, padded) == pytest.approx(ref, rel=1e-5)
    # why packed batches carry use_cache=False: with a cache transformers does not read position_ids as packing
    assert loss(model, {**packed, "use_cache": True}) != pytest.approx(ref, rel=1e-4)  # ~1e-3 off here


def test_check_packing_refuses_models_that_leak():
    torch.manual_seed(0)
    check_packing(tiny_llama())
    check_packing(tiny_gpt2())
    with pytest.raises(ValueError, match=r"data.packing=true cannot be honoured by OPTForCausalLM: a probe of two "
                                         r"packed examples differs .* Set data.packing=false"):
        check_packing(tiny_opt())

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(ValueError, match=r"NoPositions: its forward takes no position_ids"):
        check_packing(NoPositions())


def test_datamodule_packs_the_training_split_only(tmp_path):
    rows = [{"q": "Hello " * (1 + i % 5), "a": "there " * (1 + i % 3)} for i in range(10)]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sft_cfg(tmp_path, train_file="train.jsonl", val_file="val.jsonl", prompt_field="q", response_field="a",
                  packing=True, max_length=32, batch_size=2)
    dm = TextDataModule(cfg, byte_bpe_tokenizer(chat=False))
    dm.setup("fit")
    assert len(dm.splits["train"]) < 10 and len(dm.splits["val"]) == 10
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert "attention_mask" in next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("multiple", [8, 16])
def test_padding_to_a_multiple_rounds_the_width_and_keeps_the_loss(multiple):
    torch.manual_seed(0)
    model = tiny_llama().double()
    items = examples(6, seed=3)
    longest = max(len(item["input_ids"]) for item in items)
    plain, rounded = collate(items, pad_id=0), collate(items, pad_id=0, multiple=multiple)
    assert plain["input_ids"].shape[1] == longest
    width = rounded["input_ids"].shape[1]
    assert width == -(-longest // multiple) * multiple and width % multiple == 0
    width = longest
    assert torch.equal(rounded["input_ids"][:, :width], plain["input_ids"])  # the same rows, more padding after them
    assert torch.equal(rounded["attention_mask"][:, width:], torch.zeros_like(rounded["attention_mask"][:, width:]))
    assert bool((rounded["labels"][:, width:] == -100).all())
    assert loss(model, rounded) == pytest.approx(loss(model, plain), rel=1e-12)  # masked padding changes nothing
    packed = collate(pack(items, max_length=40), pad_id=0, multiple=multiple)
    assert packed["input_ids"].shape[1] % multiple == 0


def test_the_datamodule_pads_batches_to_data_pad_to_multiple_of(tmp_path):
    rows = [{"q": "Hello " * (1 + i % 5), "a": "there " * (1 + i % 3)} for i in range(10)]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    widths = {}
    for multiple in (1, 8):
        cfg = sft_cfg(tmp_path, train_file="train.jsonl", val_file="val.jsonl", prompt_field="q", response_field="a",
                      max_length=32, batch_size=3, pad_to_multiple_of=multiple)
        dm = TextDataModule(cfg, byte_bpe_tokenizer(chat=False))
        dm.setup("fit")
        widths[multiple] = [b["input_ids"].shape[1] for b in dm.train_dataloader()] + \
                           [b["input_ids"].shape[1] for b in dm.val_dataloader()]
    assert all(w % 8 == 0 for w in widths[8]) and not all(w % 8 == 0 for w in widths[1])
    assert [-(-w // 8) * 8 for w in widths[1]] == widths[8]


def test_a_bad_pad_to_multiple_of_is_named_with_its_fix():
    from vera_lightning.app.data.schema import check_data_values

    for bad in (0, -8, 1000, True):
        (problem,) = check_data_values({"pad_to_multiple_of": bad})
        assert problem.startswith(f"data.pad_to_multiple_of={bad!r}: must be a whole number from 1") and "=8" in problem
    assert check_data_values({"pad_to_multiple_of": 16}) == [] and check_data_values({"pad_to_multiple_of": 1}) == []


def test_padding_to_a_multiple_stops_at_data_max_length(tmp_path):
    """Rows cut to ``data.max_length`` are never padded past it: a model with exactly that many positions (GPT-2,
    whose position ids run over the whole width) would index past its table (12 rows rounded up to 16)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    items = [{"input_ids": [5] * 12, "labels": [5] * 12}, {"input_ids": [5] * 3, "labels": [5] * 3}]
    assert collate(items, pad_id=0, multiple=8, limit=12)["input_ids"].shape[1] == 12
    assert collate(items[1:], pad_id=0, multiple=8, limit=12)["input_ids"].shape[1] == 8
    assert collate(items, pad_id=0, multiple=8)["input_ids"].shape[1] == 16
    lines = ["Hello there " * (1 + i % 6) for i in range(8)]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.txt").write_text("".join(line + "\n" for line in lines))
    rows = [{"q": "Hello " * (1 + i % 5), "a": "there " * (1 + i % 2)} for i in range(8)]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = {"name": "t", "task": "causal_lm", "format": "text", "data_dir": str(tmp_path), "train_file": "train.txt",
            "val_file": "dev.txt", "text_field": "text", "max_length": 12, "batch_size": 4, "seed": 0}
    prompts = sft_cfg(tmp_path, train_file="train.jsonl", val_file="val.jsonl", prompt_field="q", response_field="a",
                      max_length=12, batch_size=4)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=12)).eval()
    for cfg in (text, prompts, {**prompts, "packing": True}):
        dm = TextDataModule({**cfg, "pad_to_multiple_of": 8}, byte_bpe_tokenizer(chat=False))
        dm.setup("fit")
        batches = list(dm.train_dataloader()) + list(dm.val_dataloader())
        assert max(b["input_ids"].shape[1] for b in batches) == 12, cfg["format"]
        assert all(b["input_ids"].shape[1] in (8, 12) for b in batches)
        with torch.no_grad():
            for batch in batches:
                assert torch.isfinite(model(**batch).loss)
