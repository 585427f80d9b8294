"""What a small model is shown of the retrieved passages: their few sentences that answer the question.

A 135M-parameter model copies a fact well from a short context and picks the wrong one from a long context
(the error code beside the one asked about, the year of another event). So the grounding prompt does not show
whole passages: every sentence of the retrieved passages is scored against the question, and the model sees the
best sentences of the retriever's best few passages, in the retriever's order (it ranks passages better than
sentence overlap does). The citation still points at the whole passage.

Sentence score = term overlap weighted by how rare each question term is among the candidate sentences (a BM25-
like idf, so "E4" outweighs "error code" when three sentences mention error codes; terms with digits or a
capital inside the question, names and codes, count double), normalised to [0, 1], plus the cosine similarity
of the sentence and question embeddings when the collection's embedder is at hand (paraphrases: "people" /
"passengers"), plus a bonus when the sentence holds the kind of answer the question's wh-word asks for.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

MAX_SOURCES = 3          # passages shown to the model
BEST_SENTENCES = 2       # sentences of the most relevant passage
OTHER_SENTENCES = 1      # sentences of each other passage shown
MAX_WORDS = 90           # all shown sentences together (a long sentence is cut)
TYPE_BONUS = 0.25        # a sentence holding the kind of thing asked for (a number for "how many", a name for
                         # "who")

_SENTENCE = re.compile(r"(?<=[.!?;])\s+(?=[\"'(\[A-Z0-9])|\n\s*\n|\n(?=\s*(?:[-*+]|\d+[.)])\s)")
_WORD = re.compile(r"[A-Za-z0-9]+(?:[.,:][0-9]+)*")
_STOP = frozenset("""a an and are as at be by can could did do does for from had has have how i in is it its of on
or that the their there these this to was were what when where which who whom why will with would you your
many much about any into than then so such also me my our we us tell please""".split())


@dataclass
class Shown:
    """One passage as the model sees it: `index` into the retrieved hits, the excerpt, and its score."""
    index: int
    text: str
    score: float


def split_sentences(text: str) -> list[str]:
    """Sentences (and paragraphs, list items) of a passage, whitespace collapsed."""
    return [" ".join(s.split()) for s in _SENTENCE.split(text) if s and s.strip()]


_NUMERIC_Q = re.compile(r"\b(?:how\s+(?:many|much|long|often|far|old|big|large|wide|tall|high|heavy|deep|hot|"
                        r"cold|fast)|when|what\s+(?:year|time|date|age|temperature|percentage|number|size|price|"
                        r"cost)|which\s+(?:year|date|time))\b", re.IGNORECASE)
_NAME_Q = re.compile(r"^\s*(?:who|whom|whose)\b|\b(?:who|whom|whose)\s+(?:is|was|are|were|did|does|has|had)\b|"
                     r"\bwhat\s+is\s+(?:the\s+)?name\b|\bnamed?\b.*\?$|\bcalled\b.*\?$", re.IGNORECASE)
_NUMBER = re.compile(r"\d|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|"
                     r"fifty|hundred|thousand|million|once|twice|half|dozen)\b", re.IGNORECASE)
_INNER_NAME = re.compile(r"(?<=[a-z,;:] )[A-Z][a-z]+")


def answer_type_bonus(question: str, sentence: str) -> float:
    """TYPE_BONUS when the sentence holds what the question's wh-word asks for: a number or date for "how
    many / how long / when / what year ...", a name (a capitalised word inside the sentence that the question
    does not already use) for "who"."""
    if _NUMERIC_Q.search(question):
        return TYPE_BONUS if _NUMBER.search(sentence) else 0.0
    if _NAME_Q.search(question):
        known = {w.lower() for w in _WORD.findall(question)}
        return TYPE_BONUS if any(m.group().lower() not in known for m in _INNER_NAME.finditer(sentence)) else 0.0
    return 0.0


def _heading_like(sentence: str) -> bool:
    return len(sentence.split()) <= 8 and not sentence.rstrip().endswith((".", "!", "?", ";", ":"))


def _stem(word: str) -> str:
    """A crude stem: an inflection ending off, then the first five letters ("opened", "open" -> "open")."""
    w = word.lower()
    for end in ("ing", "ed", "es", "s"):
        if len(w) > len(end) + 2 and w.endswith(end):
            w = w[:-len(end)]
            break
    return w[:5]


def question_terms(question: str) -> dict[str, float]:
    """Stemmed content words of the question -> weight (2 for names and codes: a digit, or a capital letter not
    at the start of the question)."""
    out: dict[str, float] = {}
    for i, m in enumerate(_WORD.finditer(question)):
        w = m.group()
        if w.lower() in _STOP or (len(w) < 2 and not w.isdigit()):
            continue
        anchor = any(c.isdigit() for c in w) or (m.start() > 0 and any(c.isupper() for c in w))
        out[_stem(w)] = max(out.get(_stem(w), 0.0), 2.0 if anchor else 1.0)
    return out


def lexical_scores(question: str, sentences: Sequence[str]) -> list[float]:
    """Idf-weighted overlap of each sentence with the question, divided by the best possible (0..1)."""
    terms = question_terms(question)
    stems = [{_stem(w) for w in _WORD.findall(s)} for s in sentences]
    n = len(sentences)
    raw, total = [0.0] * n, 0.0
    for t, weight in terms.items():
        df = sum(t in st for st in stems)
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5)) * weight
        total += idf
        for i, st in enumerate(stems):
            if t in st:
                raw[i] += idf
    return [r / total if total else 0.0 for r in raw]


def focus(question: str, passages: Sequence[str],
          similarity: Callable[[str, list[str]], list[float]] | None = None,
          max_sources: int = MAX_SOURCES, max_words: int = MAX_WORDS) -> list[Shown]:
    """The passages to show (the retriever's first `max_sources`) with their best sentences in document order. `passages` are in retriever order; `similarity(question, sentences)` -> cosine per sentence."""
    sents: list[tuple[int, int, str]] = []      # (passage, position, sentence)
    for p, text in enumerate(passages):
        parts = split_sentences(text)
        body = [s for s in parts if not _heading_like(s)]   # a title line holds no fact to answer with
        sents += [(p, j, s) for j, s in enumerate(body or parts)]
    if not sents:
        return []
    texts = [s for _, _, s in sents]
    scores = lexical_scores(question, texts)
    if similarity is not None:
        sims = similarity(question, texts)
        scores = [a + max(0.0, float(b)) for a, b in zip(scores, sims)]
    scores = [sc + answer_type_bonus(question, s) for sc, s in zip(scores, texts)]
    by_passage: dict[int, list[tuple[float, int, str]]] = {}
    for (p, j, s), sc in zip(sents, scores):
        by_passage.setdefault(p, []).append((sc, j, s))
    ranked = sorted(by_passage)      # the retriever's order: it ranks passages better than sentence overlap does
    out, words = [], 0
    for place, p in enumerate(ranked[:max_sources]):
        best = sorted(by_passage[p], key=lambda x: (-x[0], x[1]))[:BEST_SENTENCES if place == 0 else OTHER_SENTENCES]
        chosen, left = [], max_words - words
        for sc, j, s in sorted(best, key=lambda x: x[1]):
            if left <= 0:
                break
            w = s.split()
            if len(w) > left:
                s = " ".join(w[:left]) + " ..."
            chosen.append(s)
            left -= len(w)
        if not chosen:
            break
        words = max_words - max(left, 0)
        out.append(Shown(p, " ".join(chosen), max(x[0] for x in by_passage[p])))
    return out
