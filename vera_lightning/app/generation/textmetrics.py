"""Corpus generation metrics against several references per prediction: BLEU, ROUGE-L, chrF (0–100).

Every metric takes ``update(predictions, references)`` with one *list* of references per prediction;
the lists may differ in length (E2E val.csv has 4 to 29 references per meaning representation). Each is a
torchmetrics :class:`~torchmetrics.Metric`, so its state is summed (or gathered) across DDP ranks by
``compute()``: each rank may score a different shard of the prompts.

* ``bleu`` (:class:`CorpusBLEU`): sacreBLEU's ``corpus_bleu`` with its defaults: 13a tokenisation,
  case-sensitive, n-grams up to 4 clipped by their largest count in any one reference, the brevity
  penalty against the *closest* reference length (the shorter one on a tie), ``exp`` smoothing of an
  order without matches. It subclasses torchmetrics' ``SacreBLEUScore`` (its 13a tokenizer and
  summed states) but counts and scores as sacreBLEU does: torchmetrics breaks length ties towards
  the first reference and does not smooth, so it departs from sacreBLEU on short or poor corpora.
* ``rougeL`` (:class:`CorpusRougeL`): torchmetrics' functional ``rouge_score`` restricted to ROUGE-L,
  F-measure, with ``accumulate="best"``: each prediction is scored against the reference giving the highest
  F-measure (as the ``rouge-score`` package's ``score_multi``), then averaged over predictions. Text is lowercased
  and split on non-alphanumerics (``rouge_score``'s tokenizer), no stemming.
* ``chrf`` (:class:`CorpusCHRF`): sacreBLEU's ``corpus_chrf`` with its defaults: character n-grams
  up to 6, no word n-grams (chrF, not chrF++), beta 2, all whitespace removed, per prediction the
  statistics of the reference with the best sentence chrF (the first on a tie, even at 0). Implemented
  here on summed torchmetrics states, because torchmetrics' ``CHRFScore`` drops the reference's
  n-grams when no reference matches at all (an empty generation then costs nothing) and removes only
  spaces, not tabs or newlines.

:func:`generation_metrics` builds the three, :func:`score_generations` scores a corpus at once.
The tests check all three against ``sacrebleu`` and ``rouge_score`` on ragged references.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import SacreBLEUScore

__all__ = ["CorpusBLEU", "CorpusCHRF", "CorpusRougeL", "METRIC_NAMES", "generation_metrics", "score_generations"]

#: The keys of :func:`generation_metrics`, logged as ``val/<key>``.
METRIC_NAMES = ("bleu", "rougeL", "chrf")


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or len(predictions) != len(references):
        raise ValueError(f"got {1 if isinstance(predictions, str) else len(predictions)} predictions but "
                         f"{len(references)} reference lists; pass one list of references per prediction")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


def _ngrams(tokens: Sequence[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, order + 1) for i in range(len(tokens) - n + 1))


class CorpusBLEU(SacreBLEUScore):
    """sacreBLEU's corpus BLEU (13a, ``exp`` smoothing) as a torchmetrics metric, 0–100.

    Example::

        >>> metric = CorpusBLEU()
        >>> metric.update(["the cat sat on the mat"], [["the cat sat on the mat", "a cat was on a mat"]])
        >>> float(metric.compute())
        100.0
    """

    full_state_update = False  # updates only add statistics

    def __init__(self, **kwargs) -> None:
        super().__init__(n_gram=4, smooth=False, tokenize="13a", lowercase=False, **kwargs)

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        """Add the sufficient statistics of ``preds`` against ``target`` (a list of references each)."""
        _check(preds, target)
        for pred, refs in zip(preds, target):
            hyp = self.tokenizer(pred) if pred else []
            ref_tokens = [self.tokenizer(ref) if ref else [] for ref in refs]
            closest = min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
            self.preds_len += len(hyp)
            self.target_len += closest
            counts, clip = _ngrams(hyp, self.n_gram), Counter()
            for ref in ref_tokens:
                clip |= _ngrams(ref, self.n_gram)
            for gram, count in counts.items():
                self.denominator[len(gram) - 1] += count
                self.numerator[len(gram) - 1] += min(count, clip[gram])

    def compute(self) -> torch.Tensor:
        """BLEU on 0–100 from the summed statistics, as ``sacrebleu.BLEU.compute_bleu(smooth_method="exp")``."""
        correct, total = self.numerator.double().tolist(), self.denominator.double().tolist()
        sys_len, ref_len = float(self.preds_len), float(self.target_len)
        if not any(correct):
            return torch.tensor(0.0, dtype=torch.float64)
        penalty = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
        logs, smooth = [], 1.0
        for hits, count in zip(correct, total):
            if count == 0:  # no n-grams of this order at all: sacreBLEU's precision stays 0
                logs.append(-9999999999.0)
                continue
            if hits == 0:
                smooth *= 2
                logs.append(math.log(100.0 / (smooth * count)))
            else:
                logs.append(math.log(100.0 * hits / count))
        return torch.tensor(penalty * math.exp(sum(logs) / len(logs)), dtype=torch.float64)


class CorpusRougeL(Metric):
    """Mean sentence ROUGE-L F-measure, the best reference per prediction, 0–100.

    Each update scores its predictions with torchmetrics' ``rouge_score(rouge_keys="rougeL",
    accumulate="best")`` and adds their sum and count to two summed states (``ROUGEScore`` keeps a list
    of sentence scores, which a rank without predictions cannot synchronise).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        """Score each prediction against its best reference."""
        _check(preds, target)
        if len(preds):
            mean = rouge_score(list(preds), [list(refs) for refs in target], rouge_keys="rougeL", accumulate="best",
                               use_stemmer=False)["rougeL_fmeasure"]
            self.total += mean.double() * len(preds)
            self.count += len(preds)

    def compute(self) -> torch.Tensor:
        """The mean F-measure on 0–100 (0 without predictions)."""
        return self.total / self.count * 100 if self.count > 0 else torch.zeros((), dtype=torch.float64)


class CorpusCHRF(Metric):
    """sacreBLEU's corpus chrF (character 6-grams, beta 2, whitespace removed), 0–100.

    States hold, per character n-gram order, the summed hypothesis, reference and matching counts of
    each prediction's best reference (sacreBLEU's sufficient statistics).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, char_order: int = 6, beta: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.char_order, self.beta = int(char_order), float(beta)
        for name in ("hyp", "ref", "match"):
            self.add_state(name, torch.zeros(self.char_order, dtype=torch.float64), dist_reduce_fx="sum")

    def _grams(self, text: str) -> list[Counter]:
        text = "".join(text.split())
        return [Counter(text[i:i + n] for i in range(len(text) - n + 1)) for n in range(1, self.char_order + 1)]

    def _f_score(self, stats: Sequence[Sequence[float]]) -> float:
        """sacreBLEU's chrF of ``[[hyp, ref, match] per order]`` (average precision/recall over orders seen)."""
        precision = recall = 0.0
        orders = 0
        for n_hyp, n_ref, n_match in stats:
            if n_hyp > 0 and n_ref > 0:
                precision += n_match / n_hyp
                recall += n_match / n_ref
                orders += 1
        if orders == 0:
            return 0.0
        precision, recall = precision / orders, recall / orders
        if precision + recall == 0:
            return 0.0
        factor = self.beta ** 2
        return 100 * (1 + factor) * precision * recall / (factor * precision + recall)

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        """Add each prediction's statistics against its best reference."""
        _check(preds, target)
        for pred, refs in zip(preds, target):
            hyp = self._grams(pred)
            best, best_f = None, -1.0
            for ref in refs:
                ref_grams = self._grams(ref)
                stats = [[sum(h.values()) if r else 0, sum(r.values()),
                          sum(min(c, r[g]) for g, c in h.items() if g in r)]
                         for h, r in zip(hyp, ref_grams)]
                f_score = self._f_score(stats)
                if f_score > best_f:
                    best, best_f = stats, f_score
            columns = torch.tensor(best, dtype=torch.float64)
            self.hyp += columns[:, 0]
            self.ref += columns[:, 1]
            self.match += columns[:, 2]

    def compute(self) -> torch.Tensor:
        """chrF on 0–100 from the summed statistics."""
        stats = torch.stack([self.hyp, self.ref, self.match], dim=1).tolist()
        return torch.tensor(self._f_score(stats), dtype=torch.float64)


def generation_metrics() -> dict[str, Metric]:
    """Fresh ``{"bleu", "rougeL", "chrf"}`` metrics (see the module docstring)."""
    return {"bleu": CorpusBLEU(), "rougeL": CorpusRougeL(), "chrf": CorpusCHRF()}


def score_generations(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"bleu", "rougeL", "chrf"}`` (0–100) of a whole corpus, one list of references per prediction.

    Raises:
        ValueError: If the counts differ or a prediction has no reference.
    """
    _check(predictions, references)
    scores = {}
    for name, metric in generation_metrics().items():
        metric.update(predictions, references)
        scores[name] = float(metric.compute())
    return scores
