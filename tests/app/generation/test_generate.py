"""Batched generation (vera_lightning.app.generation.generate): equal to one-by-one generate(), in input order, seeded
sampling per row, stopping at EOS and newlines, position checks, settings errors."""

from __future__ import annotations

import pytest
import torch
from helpers.llm import GEN_CORPUS as CORPUS  # noqa: F401
from helpers.llm import PROMPTS, byte_tokenizer, tiny_lm

from vera_lightning.app.generation import generate as generation
from vera_lightning.app.generation.generate import GenerateSettings, generate_texts, stop_token_ids


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module", params=["llama", "opt"])
def lm(request, tok):
    return tiny_lm(request.param, len(tok))


def alone(model, tok, prompt, seed=None, **settings):
    """The reference: model.generate on one unpadded prompt (after torch.manual_seed(seed) when sampling)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=[1],
                         **settings)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_batched_greedy_equals_one_by_one_in_input_order(lm, tok):
    settings = GenerateSettings(max_new_tokens=10, batch_size=2, progress=False)
    got = list(generate_texts(lm, tok, PROMPTS, settings))
    expected = [alone(lm, tok, p, max_new_tokens=10, do_sample=False) for p in PROMPTS]
    assert got == expected
    assert len(set(got)) == len(got) and all(got)  # distinct rows, so a reordering would show


def test_batched_beam_search_equals_one_by_one(tok):
    model = tiny_lm("llama", len(tok))
    settings = GenerateSettings(max_new_tokens=8, num_beams=3, batch_size=3, progress=False)
    expected = [alone(model, tok, p, max_new_tokens=8, num_beams=3, do_sample=False) for p in PROMPTS]
    assert list(generate_texts(model, tok, PROMPTS, settings)) == expected


def test_sampling_is_seeded_per_row_whatever_the_batch(lm, tok):
    kw = dict(temperature=1.5, top_k=20, top_p=0.95)
    settings = GenerateSettings(max_new_tokens=8, do_sample=True, seed=7, batch_size=3, progress=False, **kw)
    state = torch.random.get_rng_state()
    got = list(generate_texts(lm, tok, PROMPTS, settings))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is left alone
    expected = [alone(lm, tok, p, seed=7 + i, max_new_tokens=8, do_sample=True, **kw) for i, p in enumerate(PROMPTS)]
    assert got == expected
    one_by_one = GenerateSettings(max_new_tokens=8, do_sample=True, seed=7, batch_size=1, progress=False, **kw)
    assert list(generate_texts(lm, tok, PROMPTS, one_by_one)) == got
    reversed_ = list(generate_texts(lm, tok, PROMPTS[::-1], settings, indices=range(len(PROMPTS))[::-1]))
    assert reversed_ == got[::-1]  # a row's seed follows its index, not its batch
    greedy = list(generate_texts(lm, tok, PROMPTS, GenerateSettings(max_new_tokens=8, progress=False)))
    assert got != greedy


def test_results_come_as_soon_as_every_earlier_prompt_is_done(tok, monkeypatch):
    model = tiny_lm("opt", len(tok))
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape) or real(**kw))
    prompts = ["a much longer first prompt, the longest of all"] + ["a"] * 3 + ["The Eagle"] * 2
    results = generate_texts(model, tok, prompts, GenerateSettings(max_new_tokens=3, batch_size=2, progress=False))
    assert calls == []  # encoded and checked now, generated lazily
    next(results)
    assert len(calls) == 1 and calls[0][0] == 2  # the longest prompts go first: prompt 0 is out after one batch
    rest = list(results)
    assert len(rest) == 5 and len(calls) == 3
    widths = [shape[1] for shape in calls]
    assert widths == sorted(widths, reverse=True)  # length-sorted batches, little padding


def test_stop_at_eos_and_the_stop_ids(tok):
    model = tiny_lm("llama", len(tok))
    assert stop_token_ids(model, tok) == [1]
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([1]), 1e4))
    try:
        assert list(generate_texts(model, tok, PROMPTS[:2],
                                   GenerateSettings(max_new_tokens=5, progress=False))) == ["", ""]
        out = model.generate(input_ids=tok(PROMPTS[0], return_tensors="pt")["input_ids"], max_new_tokens=5,
                             eos_token_id=[1], pad_token_id=0)
        assert out.shape[1] == len(tok(PROMPTS[0])["input_ids"]) + 1  # one token: the EOS
    finally:
        handle.remove()


def test_stop_at_newline_cuts_and_stops_early(tok):
    model = tiny_lm("llama", len(tok))
    newline = tok("\n")["input_ids"]
    assert len(newline) == 1
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor(newline), torch.full(out.shape[:-1] + (1,), 4.0)))
    steps = []
    counter = model.model.register_forward_hook(lambda *args: steps.append(1))
    try:
        base = dict(max_new_tokens=24, do_sample=True, seed=3, batch_size=8, progress=False)
        full = list(generate_texts(model, tok, PROMPTS, GenerateSettings(**base)))
        full_steps, steps[:] = len(steps), []
        cut = list(generate_texts(model, tok, PROMPTS, GenerateSettings(stop_at_newline=True, **base)))
    finally:
        handle.remove()
        counter.remove()
    assert sum("\n" in text for text in full) >= 3  # the test means something
    assert cut == [text.split("\n", 1)[0].rstrip() for text in full]
    assert all("\n" not in text for text in cut)
    assert len(steps) < full_steps  # every row stopped at its newline before max_new_tokens


def test_a_prompt_that_does_not_fit_the_positions_is_refused_before_any_work(tok, monkeypatch):
    model = tiny_lm("opt", len(tok), positions=32)
    monkeypatch.setattr(model, "generate", lambda **kw: pytest.fail("generated before checking"))
    long = "Hello there, how are you? I am fine. " * 3
    n = len(tok(long)["input_ids"])
    assert n > 32  # the prompt alone is longer than the positions: no max_new_tokens fixes it
    with pytest.raises(ValueError, match=rf"prompt 1 has {n} tokens and generate.max_new_tokens=16: {n + 16} "
                                         rf"positions, but the model has 32 \(config.max_position_embeddings\). "
                                         r"The prompt alone does not fit: shorten it"):
        generate_texts(model, tok, ["a", long], GenerateSettings(max_new_tokens=16, progress=False))
    short = "Hello there, how are you?"
    m = len(tok(short)["input_ids"])
    with pytest.raises(ValueError, match=rf"Lower generate.max_new_tokens to at most {32 - m}, shorten the prompts"):
        generate_texts(model, tok, ["a", short], GenerateSettings(max_new_tokens=30, progress=False))
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] have no tokens"):
        generate_texts(model, tok, ["a", ""], GenerateSettings(progress=False))


def test_settings_from_config_refuse_bad_values_together():
    assert GenerateSettings.from_config(None) == GenerateSettings()
    assert GenerateSettings.from_config({"val_prompts": 8, "top_p": 1}) == GenerateSettings(val_prompts=8, top_p=1.0)
    with pytest.raises(ValueError, match=r"generate.val_prompts='8': must be null or an integer"):
        GenerateSettings.from_config({"val_prompts": "8"})  # typed values, never cast (issue 30)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_tokens'\]; the keys are \[.*'max_new_tokens'"):
        GenerateSettings.from_config({"max_tokens": 3})
    with pytest.raises(ValueError) as err:
        GenerateSettings.from_config({"max_new_tokens": 0, "temperature": 0, "top_p": 1.5, "num_beams": 2,
                                      "do_sample": True, "val_prompts": -1})
    message = str(err.value)
    for part in ("generate.max_new_tokens=0: must be >= 1", "generate.temperature=0.0: must be > 0",
                 "generate.top_p=1.5: must be in (0, 1]", "generate.val_prompts=-1: must be null (all), 0 (off)",
                 "generate.num_beams=2 with generate.do_sample=true: beam sampling is not supported"):
        assert part in message


def test_prompts_are_sorted_within_windows_only(tok, monkeypatch):
    model = tiny_lm("opt", len(tok))
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[1]) or real(**kw))
    monkeypatch.setattr(generation, "SORT_WINDOW", 2)  # windows of 2 batches of 1 prompt
    prompts = ["a", "The Eagle", "a much longer third prompt than the others", "a"]
    results = generate_texts(model, tok, prompts, GenerateSettings(max_new_tokens=2, batch_size=1, progress=False))
    first_two = [next(results), next(results)]
    assert len(calls) == 2 and calls[0] > calls[1]  # the first window, longest first; the long third not yet
    assert first_two + list(results) == list(generate_texts(model, tok, prompts, GenerateSettings(
        max_new_tokens=2, batch_size=4, progress=False)))
