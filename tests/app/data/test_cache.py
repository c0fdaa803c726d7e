"""The tokenised-data cache and the Arrow data layer: vera_lightning/app/data/cache.py,
vera_lightning/app/data/fingerprint.py, vera_lightning/app/data/arrow_splits.py and
vera_lightning/app/data/arrow_items.py.

Tokenised once per fingerprint (a second DataModule reuses the entry, and gives the same items), a changed file
(even with its size and modification time kept), tokenizer or token setting never reuses a stale entry, settings that
only batch rows share one, a bad row keeps nothing, ``data.cache=off|refresh``, concurrent builders build once, and
the lazy views equal the list API (``encode_rows``, ``pack``).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from helpers.llm import byte_bpe_tokenizer, sft_cfg

from vera_lightning.app.data import packing, sft_rows, sft_tokens
from vera_lightning.app.data.cache import DataCache, cache_dir_of
from vera_lightning.app.data.datamodules import TextDataModule
from vera_lightning.app.data.fingerprint import file_digest, token_settings, tokenizer_fingerprint

ROWS = [("name[The Eagle]", "The Eagle is French."), ("food[French]", "A French place."),
        ("area[riverside]", "By the riverside."), ("name[Fitz]", "Fitz is here."), ("name[Zizzi]", "Zizzi.")]


@pytest.fixture(scope="module")
def bos_tok():
    return byte_bpe_tokenizer(chat=False)


def write(path, rows):
    path.write_text("mr,ref\n" + "".join(f"{json.dumps(a)},{json.dumps(b)}\n" for a, b in rows), encoding="utf-8")


def data(tmp_path, **overrides):
    write(tmp_path / "train.csv", ROWS)
    write(tmp_path / "val.csv", ROWS[:2])
    return sft_cfg(tmp_path, cache_dir=str(tmp_path / "cache"), **overrides)


def entries(cfg):
    return sorted(p.parent.name for p in cache_dir_of(cfg).glob("*/entry"))


def items(cfg, tok, split="train"):
    dm = TextDataModule(cfg, tok)
    dm.setup("fit")
    return list(dm.splits[split])


def test_a_second_run_reuses_the_entry_and_gives_the_same_items(tmp_path, bos_tok, monkeypatch):
    cfg = data(tmp_path)
    first = items(cfg, bos_tok)
    assert len(entries(cfg)) == 2  # train.csv and val.csv
    expected = sft_tokens.encode_rows(sft_rows.read_rows(tmp_path / "train.csv", cfg), cfg, bos_tok)
    assert first == expected
    monkeypatch.setattr(sft_tokens, "encode_columns", lambda *a: pytest.fail("tokenised again"))
    assert items(cfg, bos_tok) == first
    assert items({**cfg, "batch_size": 3, "max_train_samples": 4, "seed": 9}, bos_tok) != []  # same entries
    for multiple in (1, 16):  # padding changes no token: a new data setting like it must not void every entry
        assert items({**cfg, "pad_to_multiple_of": multiple}, bos_tok) == first
    assert len(entries(cfg)) == 2


def test_a_changed_file_with_the_same_size_and_mtime_is_tokenised_again(tmp_path, bos_tok):
    cfg = data(tmp_path)
    path = tmp_path / "train.csv"
    before = items(cfg, bos_tok)
    stat = os.stat(path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("Fitz is here.", "Fitz is near."), encoding="utf-8")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    after = items(cfg, bos_tok)
    assert after != before and after == sft_tokens.encode_rows(sft_rows.read_rows(path, cfg), cfg, bos_tok)
    assert len(entries(cfg)) == 3


@pytest.mark.parametrize("change", [{"max_length": 15}, {"prompt_template": "Describe: {mr}"},
                                    {"train_on_prompt": True}, {"truncation": "drop", "max_length": 18}])
def test_a_setting_that_changes_tokens_is_another_entry(tmp_path, bos_tok, change):
    cfg = data(tmp_path)
    items(cfg, bos_tok)
    changed = {**cfg, **change}
    assert token_settings(changed) != token_settings(cfg)
    got = items(changed, bos_tok)
    rows = sft_rows.read_rows(tmp_path / "train.csv", changed)
    assert got == sft_tokens.encode_rows(rows, changed, bos_tok)
    assert len(entries(cfg)) == 4


def test_another_tokenizer_or_chat_template_is_another_entry(tmp_path, bos_tok):
    chat = byte_bpe_tokenizer(chat=True)
    other = byte_bpe_tokenizer(chat=True)
    other.chat_template = chat.chat_template.replace("<|im_end|>' + '\n'", "<|im_end|>' + '\n\n'")
    assert other.chat_template != chat.chat_template
    assert len({tokenizer_fingerprint(t) for t in (bos_tok, chat, other)}) == 3
    assert tokenizer_fingerprint(chat) == tokenizer_fingerprint(byte_bpe_tokenizer(chat=True))
    cfg = data(tmp_path, chat_template=True)
    first, second = items(cfg, chat), items(cfg, other)
    assert first != second and len(entries(cfg)) == 4


def test_a_bad_row_names_the_file_and_row_and_keeps_nothing(tmp_path, bos_tok):
    cfg = data(tmp_path)
    write(tmp_path / "train.csv", ROWS + [("name[Bad]", "  ")])
    with pytest.raises(ValueError, match=r"train\.csv, row 6: empty response in column 'ref'"):
        TextDataModule(cfg, bos_tok).setup("fit")
    root = cache_dir_of(cfg)
    assert [p.name for p in root.glob("*/*")] == []  # no entry, no staging folder


def test_cache_off_keeps_nothing_and_refresh_rebuilds(tmp_path, bos_tok):
    cfg = data(tmp_path)
    assert items({**cfg, "cache": "off"}, bos_tok) == items(cfg, bos_tok)
    assert len(entries(cfg)) == 2
    built = {p: (p / "meta.json").stat().st_mtime_ns for p in cache_dir_of(cfg).glob("*/entry")}
    time.sleep(0.01)
    items({**cfg, "cache": "refresh"}, bos_tok)
    assert all((p / "meta.json").stat().st_mtime_ns > t for p, t in built.items())
    with pytest.raises(ValueError, match=r"data.cache='maybe': must be one of"):
        TextDataModule({**cfg, "cache": "maybe"}, bos_tok)


def test_concurrent_builders_build_once(tmp_path):
    cache = DataCache(tmp_path / "c")
    builds, results = [], []

    def build(folder):
        builds.append(folder)
        time.sleep(0.2)
        (folder / "x").write_text("1")
        return {"n": 1}

    threads = [threading.Thread(target=lambda: results.append(cache.entry("k", build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 3
    assert {str(folder) for folder, _ in results} == {str(tmp_path / "c" / "k" / "entry")}
    assert sorted(p.name for p in (tmp_path / "c" / "k").iterdir()) == ["entry"]


def test_file_digest_hashes_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"x" * 9 + b"y")
    assert file_digest(a) != file_digest(b) and file_digest(a) == file_digest(a)


def test_lazy_views_equal_the_list_api(tmp_path, bos_tok):
    cfg = data(tmp_path, packing=True, max_length=24)
    dm = TextDataModule(cfg, bos_tok)
    dm.setup("fit")
    encoded = sft_tokens.encode_rows(sft_rows.read_rows(tmp_path / "train.csv", cfg), cfg, bos_tok)
    assert list(dm.splits["train"]) == packing.pack(encoded, 24)
    assert dm.splits["train"][1:] == packing.pack(encoded, 24)[1:]
    assert dm.splits["train"].lengths().tolist() == [len(row["input_ids"]) for row in packing.pack(encoded, 24)]
    assert dm.rows("train")[2] == {"mr": ROWS[2][0], "ref": ROWS[2][1]} and len(dm.rows("train")) == 5
    plain = TextDataModule({**cfg, "packing": False, "group_by_length": True}, bos_tok)
    plain.setup("fit")
    assert plain.splits["train"].lengths().tolist() == [len(item["input_ids"]) for item in encoded]
    batches = list(plain.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == 5


def _build_in_process(root, marker):
    def build(folder):
        with open(marker, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        (folder / "x").write_text("1")
        return {}

    folder, _ = DataCache(root).entry("k", build)
    assert (folder / "x").read_text() == "1"


def test_two_processes_share_one_build(tmp_path):
    """As DDP ranks on one machine do: the first builds under the lock, the other waits and maps the same entry."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    marker = tmp_path / "builds.txt"
    workers = [context.Process(target=_build_in_process, args=(tmp_path / "c", marker)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert len(marker.read_text().splitlines()) == 1
