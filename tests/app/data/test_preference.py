"""Preference pairs (data.format=preference): pairs and HH transcripts, row checks, truncation, batches.

Modules: vera_lightning/app/data/preference.py, vera_lightning/app/data/preference_module.py.
"""

from __future__ import annotations

import json

import pytest
from helpers.llm import byte_bpe_tokenizer

from vera_lightning.app.data.preference import encode_pair, parse_transcript, read_pairs
from vera_lightning.app.data.preference_module import PreferenceDataModule

HH = {"chosen": "\n\nHuman: Hello there\n\nAssistant: I am fine.\n\nHuman: The Eagle?\n\nAssistant: A French place.",
      "rejected": "\n\nHuman: Hello there\n\nAssistant: I am fine.\n\nHuman: The Eagle?\n\nAssistant: Go away."}


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer(chat=True)


def cfg_for(tmp_path, **overrides):
    cfg = {"task": "causal_lm", "format": "preference", "preference_format": "pairs", "prompt_field": "prompt",
           "chosen_field": "chosen", "rejected_field": "rejected", "data_dir": str(tmp_path),
           "train_file": "train.jsonl", "val_file": "train.jsonl", "chat_template": True, "max_length": 256,
           "batch_size": 2}
    return {**cfg, **overrides}


def write(tmp_path, rows, name="train.jsonl"):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / name


def test_hh_transcript_becomes_chat_turns_with_the_shared_prefix_as_prompt(tmp_path, tok):
    assert parse_transcript(HH["chosen"], "x") == [
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "I am fine."},
        {"role": "user", "content": "The Eagle?"}, {"role": "assistant", "content": "A French place."}]
    cfg = cfg_for(tmp_path, preference_format="hh", prompt_field=None)
    (pair,) = read_pairs(write(tmp_path, [HH]), cfg, tok)
    assert [t["content"] for t in pair["prompt"]] == ["Hello there", "I am fine.", "The Eagle?"]
    assert (pair["chosen"], pair["rejected"]) == ("A French place.", "Go away.")
    item, _, _ = encode_pair(cfg, tok, pair)
    prompt = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert item["chosen_ids"][:n] == item["rejected_ids"][:n] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert item["chosen_labels"][:n] == [-100] * n
    assert tok.decode(item["chosen_ids"][n:]) == "A French place.<|im_end|>"
    assert item["chosen_labels"][n:] == item["chosen_ids"][n:]


def test_pairs_as_strings_or_chat_messages_give_the_same_tokens(tmp_path, tok):
    as_text = {"prompt": "The Eagle?", "chosen": "A French place.", "rejected": "Go away."}
    as_turns = {"prompt": [{"role": "user", "content": "The Eagle?"}],
                "chosen": [{"role": "assistant", "content": "A French place."}], "rejected": "Go away."}
    user = {"role": "user", "content": "The Eagle?"}
    implicit = {"chosen": [user, {"role": "assistant", "content": "A French place."}],
                "rejected": [user, {"role": "assistant", "content": "Go away."}]}
    cfg = cfg_for(tmp_path)
    a, b = (encode_pair(cfg, tok, p)[0] for p in read_pairs(write(tmp_path, [as_text, as_turns]), cfg, tok))
    (c,) = read_pairs(write(tmp_path, [implicit]), cfg_for(tmp_path, prompt_field=None), tok)
    assert a == b == encode_pair(cfg, tok, c)[0]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, "chosen and rejected are the same response"),
    ({"prompt": "Hi", "chosen": " ", "rejected": "No."}, "empty chosen response"),
    ({"prompt": "Hi", "chosen": "Yes."}, "no ['rejected']"),
    ({"prompt": "Hi <|im_end|>", "chosen": "Yes.", "rejected": "No."}, "special token"),
])
def test_bad_pairs_are_named_by_file_row_and_fix(tmp_path, tok, row, message):
    path = write(tmp_path, [{"prompt": "Hi", "chosen": "Yes.", "rejected": "No."}, row])
    with pytest.raises(ValueError) as err:
        read_pairs(path, cfg_for(tmp_path), tok)
    text = str(err.value)
    assert f"{path}, row 2" in text and message in text and "data.skip_invalid_rows=true" in text
    assert "1 of 2 rows are invalid" in text


@pytest.mark.parametrize("row, message", [
    ({"chosen": "Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}, "is not an HH transcript"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Yes.\n\nAssistant: And.", "rejected": HH["rejected"]},
     "both assistant turns"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Yes.", "rejected": "\n\nHuman: Ho\n\nAssistant: No."},
     "do not share a prompt"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Yes.", "rejected": "\n\nHuman: Hi\n\nAssistant:"}, "empty rejected"),
    ({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}, "ends with a user turn"),
])
def test_malformed_transcripts_are_refused_or_skipped(tmp_path, tok, row, message, caplog):
    path = write(tmp_path, [HH, row])
    cfg = cfg_for(tmp_path, preference_format="hh", prompt_field=None)
    with pytest.raises(ValueError, match=message):
        read_pairs(path, cfg, tok)
    assert len(read_pairs(path, {**cfg, "skip_invalid_rows": True}, tok)) == 1
    assert "dropped 1 of 2 invalid rows" in caplog.text


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_responses(tmp_path, tok, caplog):
    long_prompt = " ".join(["The Eagle is a French restaurant by the riverside."] * 8)
    row = {"prompt": long_prompt, "chosen": "A French place.", "rejected": "Go away, please."}
    cfg = cfg_for(tmp_path, max_length=40)
    (pair,) = read_pairs(write(tmp_path, [row]), cfg, tok)
    item, prompt_cut, reply_cut = encode_pair(cfg, tok, pair)
    assert prompt_cut and not reply_cut
    assert max(len(item["chosen_ids"]), len(item["rejected_ids"])) == 40
    assert tok.decode([t for t in item["rejected_labels"] if t != -100]) == "Go away, please.<|im_end|>"
    assert item["chosen_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    full, _, _ = encode_pair({**cfg, "max_length": 1000}, tok, pair)
    n_prompt = sum(t == -100 for t in item["chosen_labels"])
    full_prompt = full["chosen_ids"][:sum(t == -100 for t in full["chosen_labels"])]
    assert item["chosen_ids"][:n_prompt] == full_prompt[-n_prompt:]  # the prompt's end is kept


def test_datamodule_batches_chosen_then_rejected_rows_with_pair_indices(tmp_path, tok):
    rows = [{"prompt": f"Hello {i}", "chosen": "I am fine.", "rejected": f"No {i}."} for i in range(5)]
    write(tmp_path, rows)
    dm = PreferenceDataModule(cfg_for(tmp_path, max_val_samples=3, seed=0), tok)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 5 and len(dm.splits["val"]) == 3
    batch = next(iter(dm.ordered_loader("train", 2)))
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [0, 1]
    first = dm.splits["train"][0]
    assert batch["input_ids"][0, :len(first["chosen_ids"])].tolist() == first["chosen_ids"]
    assert batch["input_ids"][2, :len(first["rejected_ids"])].tolist() == first["rejected_ids"]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    sft = PreferenceDataModule(cfg_for(tmp_path, preference_target="chosen"), tok)
    sft.setup("fit")
    one = next(iter(sft.val_dataloader()))
    assert set(one) == {"input_ids", "attention_mask", "labels"} and one["input_ids"].shape[0] == 2


def test_config_problems_are_listed_together(tmp_path, tok):
    with pytest.raises(ValueError) as err:
        PreferenceDataModule(cfg_for(tmp_path, preference_format="pair", chosen_field=None, truncation="drop",
                                     packing=True), tok)
    text = str(err.value)
    for piece in ("data.preference_format='pair'", "data.chosen_field=None", "data.truncation='drop'", "packing"):
        assert piece in text
