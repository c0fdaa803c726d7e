"""Generation metrics at validation (CausalLMModule + ValidationGeneration): which prompts, when, what is logged."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from helpers.llm import byte_tokenizer, tiny_lm

from vera_lightning.app.data.datamodules import TextDataModule, sft, subsample
from vera_lightning.app.generation.generate import GenerateSettings, generate_texts
from vera_lightning.app.generation.textmetrics import score_generations
from vera_lightning.app.tasks.module import CausalLMModule, build_module

ROWS = [("name[The Eagle], food[French]", "The Eagle serves French food."),
        ("name[The Eagle], food[French]", "French food is served at The Eagle."),
        ("name[Zizzi], area[riverside]", "Zizzi is by the riverside."),
        ("name[Aromi]", "Aromi is a restaurant."),
        ("name[Aromi]", "There is a restaurant called Aromi."),
        ("name[Aromi]", "Aromi."),
        ("name[The Mill], food[Indian]", "The Mill serves Indian food.")]
MRS = list(dict.fromkeys(mr for mr, _ in ROWS))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def datamodule(tmp_path, tok):
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text("mr,ref\n" + "".join(f'"{mr}",{ref}\n' for mr, ref in ROWS), encoding="utf-8")
    cfg = {"name": "sft", "task": "causal_lm", "format": "sft", "data_dir": str(tmp_path), "train_file": "train.csv",
           "val_file": "val.csv", "prompt_field": "mr", "response_field": "ref", "prompt_template": "Describe: {mr}\n",
           "chat_template": False, "max_length": 64, "batch_size": 4, "eval_batch_size": 4, "seed": 0}
    return TextDataModule(cfg, tok)


def _fit(module, datamodule, **trainer_kwargs):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def _reference(model, datamodule, examples, settings):
    """What validation should log: generate_texts on the prompts, scored against all their references."""
    texts = list(generate_texts(model, datamodule.tokenizer, [e["prompt"] for e in examples], settings,
                                encode=lambda p: sft.prompt_token_ids(datamodule.cfg, datamodule.tokenizer, p)))
    return texts, score_generations(texts, [e["references"] for e in examples])


def test_each_validation_run_scores_every_distinct_prompt_against_all_references(tok, datamodule, monkeypatch):
    model = tiny_lm("llama", len(tok))
    generate = {"max_new_tokens": 6, "batch_size": 3, "progress": False}
    module = build_module("causal_lm", model, {"lr": 1e-3}, generate=generate)
    assert module.metric_names == ["val/loss", "val/ppl", "val/bleu", "val/rougeL", "val/chrf"]
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or real(**kw))
    trainer = _fit(module, datamodule, num_sanity_val_steps=2)
    assert calls == [3, 1]  # one validation run (at the end of the epoch), none in the sanity check: 4 prompts

    examples = module.val_generation.examples
    assert [e["prompt"] for e in examples] == [f"Describe: {mr}\n" for mr in MRS]
    assert examples[2]["references"] == ["Aromi is a restaurant.", "There is a restaurant called Aromi.", "Aromi."]
    monkeypatch.setattr(model, "generate", real)
    texts, scores = _reference(model, datamodule, examples, GenerateSettings(**generate))
    assert [g["generation"] for g in module.val_generation.generations] == texts
    for name, value in scores.items():
        assert float(trainer.callback_metrics[f"val/{name}"]) == pytest.approx(value, abs=1e-4)
    assert "val/loss" in trainer.callback_metrics and "val/ppl" in trainer.callback_metrics


def _validate(module, datamodule):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return trainer


def test_validate_logs_the_corpus_scores_of_its_generations(tok, datamodule):
    model = tiny_lm("opt", len(tok))
    target, step = tok("The Eagle serves French food.")["input_ids"] + [1], [0]

    def recite(module, args, kwargs, out):  # every row writes the first reference, then EOS
        step[0] = 0 if kwargs["input_ids"].shape[1] > 1 else step[0] + 1  # the prompt's pass starts over
        out.logits[:, -1, target[min(step[0], len(target) - 1)]] += 100.0

    model.register_forward_hook(recite, with_kwargs=True)
    generate = {"max_new_tokens": 16, "batch_size": 2, "progress": False}
    trainer = _validate(CausalLMModule(model, generate=generate), datamodule)
    texts, scores = _reference(model, datamodule, datamodule.generation_examples("val"), GenerateSettings(**generate))
    assert texts == ["The Eagle serves French food."] * 4
    assert all(10 < value < 100 for value in scores.values())  # non-trivial scores to compare
    for name, value in scores.items():
        assert float(trainer.callback_metrics[f"val/{name}"]) == pytest.approx(value, abs=1e-4)


def test_val_prompts_samples_once_with_the_seed_and_zero_turns_it_off(tok, datamodule):
    model = tiny_lm("opt", len(tok))
    module = CausalLMModule(model, generate={"max_new_tokens": 2, "val_prompts": 2, "seed": 5, "progress": False})
    trainer = _validate(module, datamodule)
    everything = datamodule.generation_examples("val")
    assert module.val_generation.examples == subsample(everything, 2, 5) and len(module.val_generation.examples) == 2
    assert len(module.val_generation.generations) == 2 and "val/bleu" in trainer.callback_metrics

    off = CausalLMModule(model, generate={"val_prompts": 0})
    assert off.val_generation is None and off.metric_names == ["val/loss", "val/ppl"]
    trainer = _validate(off, datamodule)
    assert "val/bleu" not in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    assert build_module("causal_lm", model, {}).metric_names == ["val/loss", "val/ppl"]  # no generate settings


def test_a_prompt_that_cannot_fit_stops_the_run_before_training(tok, datamodule):
    model = tiny_lm("llama", len(tok), positions=32)
    module = CausalLMModule(model, generate={"max_new_tokens": 30, "progress": False})
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"generate.max_new_tokens=30: \d+ positions, but the model has 32"):
        _fit(module, datamodule)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_generate_settings_fail_when_the_module_is_built(tok):
    with pytest.raises(ValueError, match=r"generate.batch_size=0: must be >= 1"):
        build_module("causal_lm", tiny_lm("opt", len(tok)), {}, generate={"batch_size": 0})


class RankScores(pl.Callback):
    """Writes each rank's logged generation metrics and its generations to ``<out>/rank<r>.json``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module):
        record = {name: float(trainer.callback_metrics[name]) for name in pl_module.val_generation.metric_names}
        record["generations"] = pl_module.val_generation.generations
        with open(f"{self.out}/rank{trainer.global_rank}.json", "w", encoding="utf-8") as handle:
            json.dump(record, handle)


@pytest.fixture
def file_system_sharing():
    """The spawned ranks get the module and data through shared memory; with torch's default file-descriptor
    strategy the receiving rank failed to map a storage here (``unable to resize file ... (22)``, a tokenizer-
    and metric-laden pickle), the ``file_system`` strategy does not. Restored after the test."""
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(before)


@pytest.mark.distributed
@pytest.mark.usefixtures("file_system_sharing")
@pytest.mark.parametrize("val_prompts", [None, 1])  # 1: rank 1 has no prompt at all
def test_ddp_ranks_share_the_prompts_and_log_the_one_process_scores(tok, datamodule, tmp_path, val_prompts):
    from lightning.pytorch.strategies import DDPStrategy

    generate = {"max_new_tokens": 6, "do_sample": True, "seed": 3, "val_prompts": val_prompts, "progress": False}
    model = tiny_lm("opt", len(tok))
    single = CausalLMModule(model, generate=generate)
    reference = _validate(single, datamodule).callback_metrics
    pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn"), logger=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=[RankScores(str(tmp_path))]
               ).validate(CausalLMModule(model, generate=generate), datamodule=TextDataModule(datamodule.cfg, tok),
                   verbose=False)  # a fresh datamodule: the used one holds its trainer (inference tensors)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in single.val_generation.metric_names:
        assert ranks[0][name] == ranks[1][name] == pytest.approx(float(reference[name]), abs=1e-5), name
    shares = [[g["prompt"] for g in rank["generations"]] for rank in ranks]
    prompts = [e["prompt"] for e in single.val_generation.examples]
    assert shares == [prompts[0::2], prompts[1::2]]  # rank r takes prompts r, r + 2, ...
    merged = sorted(ranks[0]["generations"] + ranks[1]["generations"], key=lambda g: prompts.index(g["prompt"]))
    assert merged == single.val_generation.generations  # sampled rows too: seeds follow the global index
