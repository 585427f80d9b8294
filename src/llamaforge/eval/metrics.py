"""Scores for generated answers against references, and the statistics of a run.

exact_match and token F1 use the SQuAD answer normalisation (lower case, no punctuation, no English articles,
single spaces). BLEU and chrF are corpus-level sacrebleu scores (0-100); ROUGE-L is rouge-score's F-measure with
the Porter stemmer, averaged over items (0-100, like the other text metrics). Every metric takes the best
reference when an item has several. Standard errors: sample standard error of the mean for per-item metrics,
a seeded bootstrap for the corpus-level ones.
"""
from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from typing import Callable, Sequence

GENERATION_METRICS = ("exact_match", "f1", "bleu", "chrf", "rouge_l")
CHOICE_METRICS = ("acc", "acc_norm")
BOOTSTRAP_SAMPLES = 200

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 against the best reference (1.0 when both are empty after normalisation)."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for r in references:
        ref = normalize_answer(r).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _ref_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one list per reference position; items with fewer references get None there."""
    n = max((len(r) for r in references), default=1)
    return [[r[i] if i < len(r) else None for r in references] for i in range(n)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(predictions), _ref_streams(references)).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu
    return float(sacrebleu.corpus_chrf(list(predictions), _ref_streams(references)).score)


_rouge = None


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (0-100) against the best reference."""
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer
        _rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max((_rouge.score(r, prediction)["rougeL"].fmeasure for r in references), default=0.0)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the sample standard error of the mean (nan for fewer than two values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = math.fsum(values) / n
    if n < 2:
        return m, float("nan")
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def bootstrap_stderr(fn: Callable[[list[int]], float], n: int, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 1234) -> float:
    """Standard deviation of fn(resampled item indices) over `samples` bootstrap resamples."""
    if n < 2:
        return float("nan")
    rng = random.Random(seed)
    vals = [fn([rng.randrange(n) for _ in range(n)]) for _ in range(samples)]
    m = math.fsum(vals) / samples
    return math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (samples - 1))


def generation_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      metrics: Sequence[str]) -> tuple[dict[str, tuple[float, float]], list[dict[str, float]]]:
    """({metric: (value, stderr)}, per-item scores) for the generation metrics asked for."""
    per_item: list[dict[str, float]] = [{} for _ in predictions]
    out: dict[str, tuple[float, float]] = {}
    per_fn = {"exact_match": lambda p, r: 100.0 * exact_match(p, r), "f1": lambda p, r: 100.0 * token_f1(p, r),
              "rouge_l": rouge_l}
    corpus_fn = {"bleu": corpus_bleu, "chrf": corpus_chrf}
    for m in metrics:
        if m in per_fn:
            vals = [per_fn[m](p, r) for p, r in zip(predictions, references)]
            for d, v in zip(per_item, vals):
                d[m] = v
            out[m] = mean_stderr(vals)
        elif m in corpus_fn:
            f = corpus_fn[m]
            value = f(predictions, references)
            se = bootstrap_stderr(lambda idx: f([predictions[i] for i in idx], [references[i] for i in idx]),
                                  len(predictions))
            out[m] = (value, se)
        else:
            raise ValueError(f"unknown generation metric {m!r}")
    return out, per_item


def choice_scores(logliks: Sequence[Sequence[float]], choice_bytes: Sequence[Sequence[int]],
                  answers: Sequence[int]) -> tuple[dict[str, tuple[float, float]], list[dict[str, float]]]:
    """Multiple choice: acc (highest total log-likelihood is the answer) and acc_norm (highest log-likelihood per
    byte of the choice's text, lm-evaluation-harness's normalisation), in percent."""
    acc, acc_norm, per_item = [], [], []
    for ll, nb, gold in zip(logliks, choice_bytes, answers):
        pick = max(range(len(ll)), key=lambda i: ll[i])
        pick_norm = max(range(len(ll)), key=lambda i: ll[i] / max(nb[i], 1))
        a, an = 100.0 * (pick == gold), 100.0 * (pick_norm == gold)
        acc.append(a)
        acc_norm.append(an)
        per_item.append({"acc": a, "acc_norm": an, "pick": pick, "pick_norm": pick_norm})
    return {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}, per_item
