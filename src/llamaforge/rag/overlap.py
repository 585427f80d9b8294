"""Word overlap between an answer and passages: which passage (or sentence) an answer was drawn from, and the
[n] marker syntax small models write. Shared by the citation filter (rag/grounding.py) and the answer check
(rag/verify.py)."""
from __future__ import annotations

import re

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])|\n\s*\n")

# A marker: "[2]", "[2, 3]", "[Source 2]", "[source 2 and 3]", "【2】", "[^2]".
_MARKER = re.compile(r"[\[【]\s*\^?(?:(?:sources?|src|ref|doc(?:ument)?)\s*)?(\d{1,3}(?:\s*(?:,|;|and|&|-|–)\s*"
                     r"(?:(?:sources?|src)\s*)?\d{1,3})*)\s*[\]】]", re.IGNORECASE)


_TOKEN = re.compile(r"[a-z0-9]+(?:[.,:][0-9]+)*", re.IGNORECASE)
_COMMON = frozenset("""the a an and or of to in on at for from by with is are was were be been it its this that
these those there their they them he she his her you your we our as not no do does did can will would
should could about into than then so such also only one source sources say says said answer question""".split())
_REFUSALS = ("do not say", "does not say", "don't say", "doesn't say", "not contain", "no information",
             "not mention", "don't know", "do not know", "cannot answer", "can't answer", "not provided")


_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")


def last_sentence(text: str) -> str:
    """The sentence a marker at the end of `text` belongs to ("... 1647. [1]" and "... 1647 [1]" alike), with
    earlier markers taken out."""
    body = _MARKER.sub(" ", text).rstrip()
    body = body[:-1] if body.endswith((".", "!", "?")) else body
    ends = [m.end() for m in _SENTENCE_END.finditer(body)]
    return body[ends[-1]:] if ends else body


def _answer_words(answer: str) -> set[str]:
    return {w for w in _TOKEN.findall(answer.lower()) if w not in _COMMON and (len(w) > 2 or w.isdigit())}


def overlap_scores(answer: str, sources: list[str]) -> list[int]:
    """Per source: how many of the answer's distinctive words it holds (numbers count double)."""
    words = _answer_words(answer)
    scores = []
    for text in sources:
        have = set(_TOKEN.findall(text.lower()))
        scores.append(sum(2 if any(ch.isdigit() for ch in w) else 1 for w in words if w in have))
    return scores


def attribute(answer: str, sources: list[str], names: list[str] | None = None) -> int | None:
    """The number of the source an unmarked answer was drawn from: the one holding most of the answer's
    distinctive words (numbers count double), if it holds at least two and more than any passage of another
    document (a tie within one document goes to its best-ranked passage). None for a refusal ("the sources do
    not say") or when no source stands out."""
    low = answer.lower()
    if not answer.strip() or any(r in low for r in _REFUSALS):
        return None
    if not _answer_words(answer):
        return None
    scores = overlap_scores(answer, sources)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i), default=None)
    if best is None or scores[best] < 2:
        return None
    names = names or [str(i) for i in range(len(sources))]
    runner_up = max((s for i, s in enumerate(scores) if names[i] != names[best]), default=0)
    return best + 1 if scores[best] > runner_up else None
