"""Corpus BLEU / ROUGE-L / chrF with ragged references: equal to sacreBLEU and rouge_score (the references)."""

from __future__ import annotations

import random

import pytest

from vera_lightning.app.generation.textmetrics import CorpusBLEU, generation_metrics, score_generations

sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu (the test extra) is the BLEU/chrF oracle")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer",
                                   reason="rouge-score (the test extra) is the ROUGE oracle")

# E2E-like outputs with 1-3 references each, plus the cases where implementations part ways: an empty
# generation, one sharing no character with its references, a hypothesis exactly between a shorter and a
# longer reference (sacreBLEU's brevity penalty takes the shorter), newlines and tabs, non-ASCII text.
PREDICTIONS = [
    "The Eagle is a cheap coffee shop near Burger King.",
    "Zizzi serves Italian food, it's family friendly!",
    "",
    "xq zz",
    "one two three four five",
    "The Wrestlers is a\nrestaurant in the city centre.\tIt is cheap.",
    "Café Rouge serves French food – prices are high.",
]
REFERENCES = [
    ["The Eagle is a cheap coffee shop located near Burger King.", "Near Burger King, The Eagle coffee shop is cheap."],
    ["Zizzi is a family-friendly Italian restaurant."],
    ["The Mill is a pub.", "There is a pub called The Mill."],
    ["Aromi is a coffee shop."],
    ["one two three four five six", "one two three four"],
    ["The Wrestlers is a cheap restaurant in the city centre.", "In the city centre, The Wrestlers is cheap.",
     "The Wrestlers restaurant is cheap."],
    ["Café Rouge is a French restaurant with high prices."],
]


def _streams(references):
    """sacreBLEU's layout: reference streams, a missing reference of a ragged segment as None."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def _oracle(predictions, references):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    return {"bleu": sacrebleu.corpus_bleu(predictions, _streams(references)).score,
            "chrf": sacrebleu.corpus_chrf(predictions, _streams(references)).score,
            "rougeL": 100 * sum(rouge) / len(rouge)}


def _assert_matches(predictions, references):
    ours, oracle = score_generations(predictions, references), _oracle(predictions, references)
    assert ours["bleu"] == pytest.approx(oracle["bleu"], abs=1e-9)
    assert ours["chrf"] == pytest.approx(oracle["chrf"], abs=1e-9)
    assert ours["rougeL"] == pytest.approx(oracle["rougeL"], abs=1e-4)  # torchmetrics' float32 states


def test_fixed_corpus_with_ragged_references_equals_sacrebleu_and_rouge_score():
    ours = score_generations(PREDICTIONS, REFERENCES)
    assert set(ours) == {"bleu", "rougeL", "chrf"}
    assert all(5 < value < 95 for value in ours.values())  # on 0-100, and neither degenerate end
    _assert_matches(PREDICTIONS, REFERENCES)


@pytest.mark.parametrize("case", ["empty", "no_shared_character", "length_tie"])
def test_the_cases_where_torchmetrics_alone_departs_from_sacrebleu(case):
    index = {"empty": [0, 2], "no_shared_character": [0, 3], "length_tie": [4]}[case]
    _assert_matches([PREDICTIONS[i] for i in index], [REFERENCES[i] for i in index])


def test_random_corpora_equal_the_oracles():
    rng = random.Random(0)
    words = "the a cat dog sat on mat near Burger King , . ! coffee shop\ncheap Café é 's".split(" ")
    for _ in range(40):
        n = rng.randint(1, 6)
        predictions = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(n)]
        references = [[" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
                      for _ in range(n)]
        _assert_matches(predictions, references)


def test_a_perfect_match_scores_100_and_no_match_0():
    assert score_generations(["the cat sat on the mat ."], [["a dog", "the cat sat on the mat ."]]) == pytest.approx(
        {"bleu": 100.0, "rougeL": 100.0, "chrf": 100.0})
    assert score_generations(["xyz"], [["the cat sat"]]) == {"bleu": 0.0, "rougeL": 0.0, "chrf": 0.0}


def test_batches_and_rank_shards_sum_to_the_whole_corpus():
    """Updates in batches, and shards merged as DDP's sync merges them, give the one-shot corpus score."""
    whole = score_generations(PREDICTIONS, REFERENCES)
    for name, metric in generation_metrics().items():
        for start in range(0, len(PREDICTIONS), 3):
            metric.update(PREDICTIONS[start:start + 3], REFERENCES[start:start + 3])
        assert float(metric.compute()) == pytest.approx(whole[name], abs=1e-9)
    for name in whole:
        rank0, rank1 = generation_metrics()[name], generation_metrics()[name]
        rank0.update(PREDICTIONS[0::2], REFERENCES[0::2])  # rank r takes prompts r, r + 2, ... (as validation)
        rank1.update(PREDICTIONS[1::2], REFERENCES[1::2])
        rank0.merge_state(rank1)
        assert float(rank0.compute()) == pytest.approx(whole[name], abs=1e-5)


def test_bleu_statistics_are_sacrebleus():
    bleu = CorpusBLEU()
    bleu.update(["the cat sat", "one two three four five"], [["the cat sat on the mat"], REFERENCES[4]])
    oracle = sacrebleu.corpus_bleu(["the cat sat", "one two three four five"],
                                   _streams([["the cat sat on the mat"], REFERENCES[4]]))
    assert bleu.numerator.tolist() == oracle.counts and bleu.denominator.tolist() == oracle.totals
    assert (int(bleu.preds_len), int(bleu.target_len)) == (oracle.sys_len, oracle.ref_len) == (8, 10)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match=r"got 2 predictions but 1 reference lists; pass one list of references"):
        score_generations(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list of strings, got 'a'"):
        score_generations(["a"], ["a"])
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list of strings, got \[\]"):
        score_generations(["a", "b"], [["a"], []])
