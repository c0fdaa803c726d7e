"""scripts/predict.py's predict(cfg): labels for sentences, model.generate for prompts, merged exports."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers.app import SMOKE, compose_app

from vera_lightning import load_adapter, unload_vera
from vera_lightning.app.commands.build import build_components
from vera_lightning.app.commands.planning import make_plan
from vera_lightning.app.commands.predict import predict
from vera_lightning.app.commands.train import train

PROMPTS = ["the film was", "a quiet story about a lighthouse keeper", "i did not expect", "music"]
SENTENCES = ["a warm , funny and moving film .", "the plot is a mess and the acting is worse .",
             "an unforgettable performance .", "i wanted my two hours back ."]
MINILM = ["data.max_train_samples=32", "data.max_val_samples=16", "data.batch_size=16", "trainer.max_steps=2",
          "callbacks=none", "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "eval_before=false"]


@pytest.fixture(scope="module")
def smoke_adapter(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    train(compose_app("train", run_dir, *SMOKE))
    return run_dir / "adapter"


@pytest.fixture(scope="module")
def minilm_adapter(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("minilm") / "run"
    train(compose_app("train", run_dir, *MINILM))
    return run_dir / "adapter"


def _adapted(config: str, tmp_path, adapter, *overrides):
    """The reference model: built as training builds it, the adapter loaded with the library's load_adapter."""
    parts = build_components(make_plan(compose_app(config, tmp_path / "reference", *overrides, "input=unused"), config))
    load_adapter(parts.model, adapter)
    return parts.model.eval(), parts.tokenizer


def _generate_reference(model, tokenizer, prompts, seed=None, **settings):
    texts = []
    for i, prompt in enumerate(prompts):
        encoded = tokenizer(prompt, return_tensors="pt")
        encoded = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if seed is not None:
            torch.manual_seed(seed + i)
        out = model.generate(**encoded, pad_token_id=tokenizer.pad_token_id, **settings)
        texts.append(tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _without_finished(path):
    """The rows without ``finished`` (checked to be a boolean on every row)."""
    rows = _jsonl(path)
    assert all(isinstance(row.pop("finished"), bool) for row in rows)
    return rows


def test_causal_lm_greedy_generation_equals_model_generate(smoke_adapter, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n", encoding="utf-8")
    out = predict(compose_app("predict", tmp_path / "run", *SMOKE, f"adapter={smoke_adapter}", f"input={prompts}",
                              "generate.max_new_tokens=8"))
    assert out == tmp_path / "run" / "predictions.jsonl"
    rows = _jsonl(out)
    assert [row["prompt"] for row in rows] == PROMPTS  # the blank line is skipped
    model, tokenizer = _adapted("predict", tmp_path, smoke_adapter, *SMOKE)
    expected = _generate_reference(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=False)
    assert [row["generation"] for row in rows] == expected
    assert any(text.strip() for text in expected)


def test_causal_lm_sampling_is_seeded_per_prompt(smoke_adapter, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    settings = ["generate.do_sample=true", "generate.max_new_tokens=6", "generate.temperature=1.5",
                "generate.top_k=0", "generate.top_p=0.95", "seed=7"]
    out = predict(compose_app("predict", tmp_path / "run", *SMOKE, f"adapter={smoke_adapter}", f"input={prompts}",
                              *settings))
    model, tokenizer = _adapted("predict", tmp_path, smoke_adapter, *SMOKE, "seed=7")
    expected = _generate_reference(model, tokenizer, PROMPTS, seed=7, max_new_tokens=6, do_sample=True,
                                   temperature=1.5, top_k=0, top_p=0.95)
    assert [row["generation"] for row in _jsonl(out)] == expected
    greedy = _generate_reference(model, tokenizer, PROMPTS, max_new_tokens=6, do_sample=False)
    assert expected != greedy  # sampling did sample


def test_a_merged_export_directory_is_a_valid_adapter(smoke_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _adapted("predict", tmp_path, smoke_adapter, *SMOKE)
    merged_dir = tmp_path / "merged"
    unload_vera(model, merge=True).save_pretrained(str(merged_dir))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = predict(compose_app("predict", tmp_path / "run", *SMOKE, f"adapter={merged_dir}", f"input={prompts}",
                              "generate.max_new_tokens=8"))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    plan = make_plan(compose_app("predict", tmp_path / "tok", *SMOKE, "input=x"), "predict")
    tokenizer = build_components(plan).tokenizer
    expected = _generate_reference(merged, tokenizer, PROMPTS, max_new_tokens=8, do_sample=False)
    assert [row["generation"] for row in _jsonl(out)] == expected


def test_classification_writes_label_and_probability_per_sentence(minilm_adapter, tmp_path):
    sentences = tmp_path / "reviews.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    output = tmp_path / "labels.tsv"
    out = predict(compose_app("predict", tmp_path / "run", f"adapter={minilm_adapter}", f"input={sentences}",
                              f"output={output}"))
    assert out == output
    with output.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    assert rows[0] == ["input", "label", "probability"] and [r[0] for r in rows[1:]] == SENTENCES

    model, tokenizer = _adapted("predict", tmp_path, minilm_adapter)
    with torch.inference_mode():
        batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
        probs = model(**batch).logits.softmax(dim=-1)
    assert [int(r[1]) for r in rows[1:]] == probs.argmax(dim=-1).tolist()
    assert [r[2] for r in rows[1:]] == [f"{p:.6f}" for p in probs.max(dim=-1).values.tolist()]

    # the same sentences from a table with a header: the data config's text column is read
    table = tmp_path / "reviews.tsv"
    table.write_text("sentence\tlabel\n" + "".join(f"{s}\t0\n" for s in SENTENCES), encoding="utf-8")
    again = predict(compose_app("predict", tmp_path / "run2", f"adapter={minilm_adapter}", f"input={table}"))
    assert again.read_text() == output.read_text()


def test_an_existing_output_is_never_replaced_silently(smoke_adapter, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n", encoding="utf-8")
    output = tmp_path / "mine.jsonl"
    output.write_text("keep me\n")
    with pytest.raises(FileExistsError, match=r"output='.*mine.jsonl' already exists .* overwrite=true"):
        predict(compose_app("predict", tmp_path / "run", *SMOKE, f"adapter={smoke_adapter}", f"input={prompts}",
                            f"output={output}"))
    assert output.read_text() == "keep me\n"
    with pytest.raises(ValueError, match=r"output=.* is the input file"):
        predict(compose_app("predict", tmp_path / "run", *SMOKE, f"input={prompts}", f"output={prompts}",
                            "overwrite=true"))
    with pytest.raises(FileNotFoundError, match=r"input='.*missing.txt': no such file"):
        predict(compose_app("predict", tmp_path / "run", *SMOKE, f"input={tmp_path / 'missing.txt'}"))


def _pair_table(path, rows):
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows), encoding="utf-8")
    return path


PAIRS = [("a man is playing a guitar .", "a man plays the guitar .", 4.8),
         ("a woman is slicing an onion .", "a dog runs in the park .", 0.2),
         ("the cat sat on the mat .", "a cat is sitting on a mat .", 4.1),
         ("kids are playing football .", "the stock market fell today .", 0.0)]


def test_sentence_pair_regression_writes_both_sides_and_the_predicted_value(tmp_path):
    """data=stsb: pairs tokenised as in training, the TSV holds input, input_pair and the predicted value."""
    data_dir = tmp_path / "stsb"
    data_dir.mkdir()
    for split in ("train", "dev"):
        _pair_table(data_dir / f"{split}.tsv", PAIRS * 8)
    stsb = [f"data.data_dir={data_dir}", "data=stsb"]
    run_dir = tmp_path / "train"
    train(compose_app("train", run_dir, *MINILM, *stsb))
    inputs = _pair_table(tmp_path / "pairs.tsv", PAIRS)
    out = predict(compose_app("predict", tmp_path / "run", *stsb, f"adapter={run_dir / 'adapter'}", f"input={inputs}"))
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    assert rows[0] == ["input", "input_pair", "prediction"]
    assert [(r[0], r[1]) for r in rows[1:]] == [(a, b) for a, b, _ in PAIRS]

    model, tokenizer = _adapted("predict", tmp_path, run_dir / "adapter", *stsb)
    assert model.num_labels == 1
    with torch.inference_mode():
        batch = tokenizer([a for a, _, _ in PAIRS], [b for _, b, _ in PAIRS], padding=True,
                          truncation="longest_first", max_length=128, return_tensors="pt")
        assert (batch["token_type_ids"] == 1).any()  # the second sentence is its own segment
        values = model(**batch).logits[:, 0]
    assert [r[2] for r in rows[1:]] == [f"{v:.6f}" for v in values.tolist()]

    # a pair task needs both columns: a plain text file is refused before the model is built
    plain = tmp_path / "pairs.txt"
    plain.write_text("a man is playing a guitar .\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.text_pair_field='sentence2' makes this a sentence-pair task.*"
                                         r"'sentence1' and 'sentence2'"):
        predict(compose_app("predict", tmp_path / "run2", *stsb, f"input={plain}"))


# prompt/response data (data.format=sft): E2E-like rows, several references per meaning representation
E2E_ROWS = [("name[The Eagle], food[French]", "The Eagle serves French food."),
            ("name[The Eagle], food[French]", "French food at The Eagle."),
            ("name[Zizzi], area[riverside]", "Zizzi is by the riverside."), ("name[Aromi]", "Aromi is a restaurant.")]
MRS = ["name[Zizzi], area[riverside]", "name[The Eagle], food[French]", "name[Aromi], food[Indian], area[city centre]"]


def _sft_overrides(data_dir):
    return [*SMOKE, "data=sft", f"data.data_dir={data_dir}", "data.train_file=train.csv", "data.val_file=val.csv",
            "data.prompt_field=mr", "data.response_field=ref", "data.prompt_template='Describe: {mr}'",
            "data.max_length=64", "generate.max_new_tokens=6", "generate.batch_size=2"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An adapter trained on prompt/response rows (tiny OPT, 2 steps at a high λ rate so it changes the output)."""
    data_dir = tmp_path_factory.mktemp("e2e")
    for name in ("train.csv", "val.csv"):
        (data_dir / name).write_text("mr,ref\n" + "".join(f'"{mr}",{ref}\n' for mr, ref in E2E_ROWS * 4),
                                     encoding="utf-8")
    run_dir = data_dir / "run"
    train(compose_app("train", run_dir, *_sft_overrides(data_dir), "optim.lr=0.5", "eval_before=false"))
    return data_dir, run_dir / "adapter"


def _sft_reference(tmp_path, data_dir, adapter, mrs):
    """One-by-one model.generate on the training-formatted prompt tokens ('Describe: <mr>'), decoded and stripped."""
    from vera_lightning.app.data import sft

    cfg = compose_app("predict", tmp_path / "reference", *_sft_overrides(data_dir), "input=x")
    parts = build_components(make_plan(cfg, "predict"))
    if adapter is not None:
        load_adapter(parts.model, adapter)
    model, tokenizer, data_cfg = parts.model.eval(), parts.tokenizer, dict(parts.datamodule.cfg)
    texts = []
    for mr in mrs:
        prompt = sft.format_prompt(data_cfg, tokenizer, {"mr": mr})
        assert prompt == f"Describe: {mr}"
        ids = torch.tensor([sft.prompt_token_ids(data_cfg, tokenizer, prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=[2, tokenizer.sep_token_id])
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


def test_prompt_rows_from_csv_jsonl_and_text_lines_are_formatted_as_in_training(sft_run, tmp_path):
    data_dir, adapter = sft_run
    expected = _sft_reference(tmp_path, data_dir, adapter, MRS)
    table = tmp_path / "mrs.csv"
    table.write_text("id,mr\n" + "".join(f'{i},"{mr}"\n' for i, mr in enumerate(MRS)), encoding="utf-8")
    out = predict(compose_app("predict", tmp_path / "csv", *_sft_overrides(data_dir), f"adapter={adapter}",
                              f"input={table}"))
    rows = _jsonl(out)
    assert [(r["id"], r["mr"]) for r in rows] == [(str(i), mr) for i, mr in enumerate(MRS)]  # the input rows, in order
    assert [r["generation"] for r in rows] == expected
    assert len(set(expected)) > 1

    jsonl = tmp_path / "mrs.jsonl"
    jsonl.write_text("".join(json.dumps({"mr": mr, "n": i}) + "\n" for i, mr in enumerate(MRS)), encoding="utf-8")
    out = predict(compose_app("predict", tmp_path / "jsonl", *_sft_overrides(data_dir), f"adapter={adapter}",
                              f"input={jsonl}"))
    assert _without_finished(out) == [{"mr": mr, "n": i, "generation": text}
                                      for i, (mr, text) in enumerate(zip(MRS, expected))]

    lines = tmp_path / "mrs.txt"
    lines.write_text("\n".join(MRS) + "\n", encoding="utf-8")
    out = predict(compose_app("predict", tmp_path / "txt", *_sft_overrides(data_dir), f"adapter={adapter}",
                              f"input={lines}"))
    assert _without_finished(out) == [{"prompt": mr, "generation": text} for mr, text in zip(MRS, expected)]


def test_no_adapter_is_the_zero_shot_base_model_with_the_same_prompts(sft_run, tmp_path):
    data_dir, adapter = sft_run
    lines = tmp_path / "mrs.txt"
    lines.write_text("\n".join(MRS) + "\n", encoding="utf-8")
    out = predict(compose_app("predict", tmp_path / "zero", *_sft_overrides(data_dir), f"input={lines}"))
    zero_shot = [row["generation"] for row in _jsonl(out)]
    assert zero_shot == _sft_reference(tmp_path, data_dir, None, MRS)
    assert zero_shot != _sft_reference(tmp_path, data_dir, adapter, MRS)  # the adapter changed what it writes


def test_bad_causal_lm_inputs_and_outputs_are_refused_before_the_model_loads(sft_run, tmp_path, monkeypatch):
    import vera_lightning.app.commands.predict as predict_module

    data_dir, adapter = sft_run
    monkeypatch.setattr(predict_module, "build_components", lambda *a, **k: pytest.fail("built the model"))
    lines = tmp_path / "mrs.txt"
    lines.write_text("\n".join(MRS) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"output='.*outdir' is a directory; give a file path, e\.g\. "
                                         r"output='.*outdir/predictions.jsonl'"):
        (tmp_path / "outdir").mkdir()
        predict(compose_app("predict", tmp_path / "r", *_sft_overrides(data_dir), f"input={lines}",
                            f"output={tmp_path / 'outdir'}"))
    with pytest.raises(ValueError, match=r"input='.*mrs.txt': each line of a text file fills data.prompt_field='mr' "
                                         r"only, but data.prompt_template=.* names .*'area'.*give a .csv/.tsv/.jsonl"):
        predict(compose_app("predict", tmp_path / "r", *_sft_overrides(data_dir), f"input={lines}",
                            "data.prompt_template='{mr} in {area}'"))
    table = tmp_path / "wrong.csv"
    table.write_text("meaning\nname[Aromi]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"wrong.csv: column\(s\) \['mr'\] not in the header \['meaning'\]; set "
                                         r"data.prompt_template \(now naming 'mr'\)"):
        predict(compose_app("predict", tmp_path / "r", *_sft_overrides(data_dir), f"input={table}"))
    with pytest.raises(ValueError, match=r"generate.top_p=0.0: must be in \(0, 1\]"):
        predict(compose_app("predict", tmp_path / "r", *_sft_overrides(data_dir), f"input={lines}",
                            "generate.top_p=0"))
