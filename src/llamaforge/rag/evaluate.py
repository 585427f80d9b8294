"""Measured retrieval: recall@k and MRR of the retriever, and how often grounded answers hold the expected fact and
cite the right source.

Questions file (JSON Lines), one object per line:
    {"question": str, "answer": str | [str, ...] (accepted spellings of the expected fact),
     "source": str (the file that holds it: base name or path suffix)}

- A retrieved passage is relevant when it comes from `source` and contains one of the answers (whitespace and
  case ignored), so a passage from the right file that lacks the fact does not count.
- recall@k: share of questions with a relevant passage in the top k; MRR: mean of 1/rank of the first one (0 if
  none in the top k).
- answer_contains_fact: share of answers containing one of the accepted spellings; cites_source: share whose
  [n] markers include a passage from `source`; correct: both.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .._fs import read_text_bounded, loads_json
from ..errors import InvalidRequestError
from .index import Index
from .search import search_index

MAX_QUESTIONS_BYTES = 16 * 1024 * 1024


@dataclass
class Question:
    question: str
    answers: list[str]
    source: str
    line: int


def load_questions(path: str | Path) -> list[Question]:
    """Parse a questions file; a bad line raises InvalidRequestError naming the line."""
    text = read_text_bounded(path, MAX_QUESTIONS_BYTES, "questions file")
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = loads_json(line)
        except ValueError as e:
            raise InvalidRequestError(f"{path}:{i}: not JSON: {e}", field="questions") from None
        if not isinstance(d, dict):
            raise InvalidRequestError(f"{path}:{i}: each line must be a JSON object", field="questions")
        q, a, s = d.get("question"), d.get("answer"), d.get("source")
        answers = [a] if isinstance(a, str) else a
        if not isinstance(q, str) or not q.strip():
            raise InvalidRequestError(f"{path}:{i}: 'question' must be a non-empty string", field="questions")
        if not isinstance(answers, list) or not answers or not all(isinstance(x, str) and x.strip()
                                                                   for x in answers):
            raise InvalidRequestError(f"{path}:{i}: 'answer' must be a string or a list of strings",
                                      field="questions")
        if not isinstance(s, str) or not s.strip():
            raise InvalidRequestError(f"{path}:{i}: 'source' must be a non-empty string", field="questions")
        out.append(Question(q, answers, s, i))
    if not out:
        raise InvalidRequestError(f"{path}: no questions", field="questions")
    return out


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower()).strip()


def contains_fact(text: str, answers: list[str]) -> bool:
    t = _norm(text)
    return any(_norm(a) in t for a in answers)


def same_source(stored: str, expected: str) -> bool:
    """`stored` (an absolute path or an upload name) is the file `expected` names (base name or path suffix)."""
    s, e = stored.replace("\\", "/"), expected.replace("\\", "/").lstrip("./")
    return s == e or s.endswith("/" + e) or os.path.basename(s) == e


def relevant(hit, q: Question) -> bool:
    return same_source(hit.source, q.source) and contains_fact(hit.text, q.answers)


def evaluate_retrieval(index: Index, questions: list[Question], k: int = 5, mode: str = "hybrid",
                       reranker: str | None = None) -> dict:
    """recall@k and MRR@k of `mode` retrieval over `questions`, plus per-question ranks."""
    found, rr, ranks = 0, 0.0, []
    t0 = time.perf_counter()
    for q in questions:
        hits = search_index(index, q.question, k, mode=mode, reranker=reranker)
        rank = next((i for i, h in enumerate(hits, 1) if relevant(h, q)), None)
        ranks.append(rank)
        if rank is not None:
            found += 1
            rr += 1.0 / rank
    n = len(questions)
    return {"mode": mode, "k": k, "questions": n, "recall": found / n, "mrr": rr / n, "ranks": ranks,
            "seconds": time.perf_counter() - t0}


def evaluate_answers(lm, collection: str, questions: list[Question], k: int = 5, sampling: dict | None = None,
                     on_answer: Callable[[Question, dict], None] | None = None) -> dict:
    """Ask every question through the seam (chat with retrieval) and score the answers."""
    from ..generate.api import chat
    sampling = dict({"temperature": 0.0, "max_tokens": 96}, **(sampling or {}))
    fact = cite = both = 0
    rows = []
    t0 = time.perf_counter()
    for q in questions:
        c = chat(lm, [{"role": "user", "content": q.question}], retrieval={"collection": collection, "k": k},
                 **sampling)
        cited = [x for x in c.citations if x.get("cited")]
        has_fact = contains_fact(c.text, q.answers)
        right = any(same_source(x["source"], q.source) for x in cited)
        fact += has_fact
        cite += right
        both += has_fact and right
        row = {"question": q.question, "answer": c.text, "contains_fact": has_fact, "cites_source": right,
               "cited": [os.path.basename(x["source"]) for x in cited]}
        rows.append(row)
        if on_answer:
            on_answer(q, row)
    n = len(questions)
    return {"questions": n, "answer_contains_fact": fact / n, "cites_source": cite / n, "correct": both / n,
            "answers": rows, "seconds": time.perf_counter() - t0}
