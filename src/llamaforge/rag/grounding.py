"""Grounded answers: the seam stage for `GenerationRequest.retrieval` and the filter that keeps [n] markers honest.

`RetrievalStage.prepare` retrieves the `k` best passages of the collection for the last user message, numbers
them, and puts them into the conversation with the instruction to answer only from them, to cite them as [n] and
to say so when they do not hold the answer. `ctx.citations` = [{"n", "source", "text", "chunk_id", "heading",
"start", "end"}] travels to the result beside the answer.

`CitationFilter` rewrites the markers the model writes into the canonical `[n]`: "[Source 2]", "[2, 3]",
"【2】" become "[2]" / "[2][3]"; a marker that names no source given is removed (a citation must point at a real
passage). Text is held back only while a marker may still be opening, so streaming stays smooth.

Two measured aids for small models (bench/NOTES.md, "Grounded answers"): tokens are chosen by context-aware
decoding against the same conversation without the sources (`generate/contrast.py`, `CONTRAST`), and the finished
answer is checked against the passage sentences (`rag/verify.py`): an answer drawn from a sentence about another
matter is replaced by the sentence that answers the question. The check needs the whole answer, so a checked
answer is released when it is complete (`RetrievalStage(check=False)` streams it token by token).
"""
from __future__ import annotations

import os
import re

from ..generate.stage import Delta, OutputFilter, PlanContext, Result, Stage
from .index import CollectionNotFoundError, Index, check_name
from .overlap import _MARKER, _SENTENCE, attribute, last_sentence, overlap_scores
from .search import Hit, check_k, embedder_for, search_index
from .verify import build_check

SYSTEM = ("You answer questions using only the numbered sources given with the question. "
          "Cite the source you used with its number in square brackets, for example [1]. "
          "If the sources do not contain the answer, say that the sources do not say.")
INSTRUCTION = "Answer with one sentence from the sources and cite its number, like [1]."
EXCERPT_WORDS = 60     # words of each passage shown to the model (its best-matching sentences)
CONTRAST = 0.5         # context-aware decoding strength (0 turns it off)

_QWORD = re.compile(r"[a-z0-9]+", re.IGNORECASE)
_QSTOP = frozenset("""a an and are as at be by can could did do does for from had has have how i in is it its of on
or that the their there these this to was were what when where which who whom why will with would you your
many much long often""".split())


def source_label(h: Hit) -> str:
    name = os.path.basename(h.source) or h.source
    return f"{name} - {h.heading}" if h.heading else name


def excerpt(text: str, question: str, max_words: int = EXCERPT_WORDS) -> str:
    """The sentences of a passage that share most words with the question, in their original order, within
    `max_words` (the whole passage when it is short). Small models answer better from a few focused lines than
    from whole passages; the citation still points at the whole passage."""
    flat = " ".join(text.split())
    if len(flat.split()) <= max_words:
        return flat
    sents = [x.strip() for x in _SENTENCE.split(text) if x and x.strip()]
    keys = {w[:5] for w in _QWORD.findall(question.lower()) if w not in _QSTOP}
    def score(sent: str) -> int:
        return len(keys & {w[:5] for w in _QWORD.findall(sent.lower())})
    ranked = sorted(range(len(sents)), key=lambda i: (-score(sents[i]), i))
    keep, words = set(), 0
    for i in ranked:
        n = len(sents[i].split())
        if keep and words + n > max_words:
            continue
        keep.add(i)
        words += n
        if words >= max_words:
            break
    out = " ".join(" ".join(sents[i].split()) for i in sorted(keep))
    return out if len(out.split()) <= max_words * 2 else " ".join(out.split()[:max_words * 2]) + " ..."


def format_sources(hits: list[Hit], question: str = "") -> str:
    return "\n".join(f"[{n}] {excerpt(h.text, question)}" for n, h in enumerate(hits, 1))


def plain_user_message(question: str) -> str:
    """The grounded message without its sources: what the contrast of context-aware decoding is taken against."""
    return f"Question: {question}\n{INSTRUCTION}"


def grounded_user_message(question: str, hits: list[Hit]) -> str:
    if not hits:
        return (f"There are no sources for this question.\n\nQuestion: {question}\n\n"
                "Say that the sources do not contain the answer.")
    return f"Sources:\n{format_sources(hits, question)}\n\nQuestion: {question}\n{INSTRUCTION}"


def citations_for(hits: list[Hit]) -> list[dict]:
    return [{"n": n, "source": h.source, "text": h.text, "chunk_id": h.chunk_id, "heading": h.heading,
             "start": h.start, "end": h.end, "score": h.score} for n, h in enumerate(hits, 1)]


ANSWER_RESERVE = 256   # tokens kept free for the answer when the request does not set max_tokens


def fit_to_context(ctx: PlanContext, hits: list[Hit], question: str) -> list[Hit]:
    """The best-ranked sources that fit the model's context beside the conversation and room for the answer
    (a first source too long on its own is shortened)."""
    from ..generate.engine import context_length
    tok = ctx.lm.tokenizer
    if tok is None or not hits:
        return hits
    count = lambda text: len(tok.encode(text))  # noqa: E731
    window = int(context_length(ctx.lm))
    answer = ctx.request.options.get("max_tokens") or min(ANSWER_RESERVE, window // 4)
    used = sum(count(m["content"]) + 8 for m in ctx.messages) + count(SYSTEM) + count(
        grounded_user_message(question, [])) + 32
    budget = window - int(answer) - used
    out: list[Hit] = []
    for h in hits:
        n = count(f"[{len(out) + 1}] {excerpt(h.text, question)}") + 4
        if n <= budget:
            out.append(h)
            budget -= n
        elif not out and budget > 32:
            keep = max(1, int(len(h.text) * budget / n) - 16)
            out.append(Hit(**{**h.as_dict(), "text": h.text[:keep], "end": h.start + keep}))
            break
        else:
            break
    return out


class RetrievalStage(Stage):
    """Implements "retrieval": ground a chat request in a collection's passages (see module docstring)."""

    name = "retrieval"
    provides = ("retrieval",)

    def __init__(self, root=None, *, contrast: float = CONTRAST, check: bool = True):
        self.root = root
        self.contrast = float(contrast)
        self.check = bool(check)

    def applies(self, request) -> bool:
        return request.retrieval is not None

    def prepare(self, ctx: PlanContext) -> None:
        r = ctx.request.retrieval
        if ctx.messages is None:
            raise ctx.error("retrieval needs a chat request (messages), not a raw prompt", "retrieval")
        try:
            name = check_name(r.collection)
        except Exception as e:
            raise ctx.error(str(e), "retrieval.collection") from None
        try:
            k = check_k(r.k, "retrieval.k")
        except Exception as e:
            raise ctx.error(str(e), "retrieval.k") from None
        last = next((i for i in range(len(ctx.messages) - 1, -1, -1) if ctx.messages[i]["role"] == "user"), None)
        if last is None or not ctx.messages[last]["content"].strip():
            raise ctx.error("retrieval needs a user message to search for", "messages")
        question = ctx.messages[last]["content"]
        # The answer check may replace the answer with a source sentence: not where the output has a set shape.
        check = self.check and ctx.request.constraint is None and not ctx.request.tools
        try:
            with Index(name, root=self.root) as index:
                hits = search_index(index, question, k)
                embedder = embedder_for(index) if check else None
        except CollectionNotFoundError as e:
            raise ctx.error(str(e), "retrieval.collection") from None
        hits = fit_to_context(ctx, hits, question)
        ctx.citations = citations_for(hits)
        ctx.messages[last] = dict(ctx.messages[last], content=grounded_user_message(question, hits))
        sys_at = next((i for i, m in enumerate(ctx.messages) if m["role"] == "system"), None)
        if sys_at is None:
            ctx.messages.insert(0, {"role": "system", "content": SYSTEM})
            last += 1
        else:   # the caller's (or the model's stored) system prompt stays, the grounding rule follows it
            ctx.messages[sys_at] = dict(ctx.messages[sys_at], content=ctx.messages[sys_at]["content"].rstrip()
                                        + "\n\n" + SYSTEM)
        ctx.extra["retrieval"] = {"collection": name, "k": k, "hits": len(hits)}
        if hits and self.contrast > 0 and not ctx.request.context:
            plain = [dict(m) for m in ctx.messages]
            plain[last] = dict(plain[last], content=plain_user_message(question))
            ctx.extra["_retrieval_plain"] = (plain, dict(ctx.format_kwargs))
        if hits and check:
            ctx.extra["_retrieval_check"] = build_check(hits, question, embedder)

    def processors(self, plan) -> list:
        held = plan.extra.get("_retrieval_plain")
        if not held or plan.lm is None or getattr(plan.lm, "model", None) is None:
            return []
        from ..generate.chat_formats import chat_format
        from ..generate.contrast import ContextContrast
        messages, kwargs = held
        ids = chat_format(plan.lm).encode(messages, add_generation_prompt=True, **kwargs)
        return [ContextContrast(plan.lm.model, list(ids), len(plan.prompt_ids), self.contrast,
                                plan.params.max_tokens, lm=plan.lm)]

    def output(self, plan) -> OutputFilter:
        return CitationFilter(plan.citations, check=plan.extra.get("_retrieval_check"))


_OPEN = re.compile(r"[\[【][^\]】\n]{0,24}$")


class CitationFilter(OutputFilter):
    """Canonical [n] markers; markers naming no given source dropped. Records the cited numbers.

    A marker whose passage lacks the distinctive words of the sentence before it is re-pointed at the passage
    that clearly holds them (small models copy from [1] and write [3]). An answer that states something without
    any marker gets one for the source it was drawn from, when one source clearly holds its distinctive words
    (see `attribute`); `result.extra["citation_markers"]` says whether the markers were the model's ("model"),
    re-pointed ("corrected"), added ("attributed") or absent ("none"). The passage is what a reader needs to
    check the answer against, whatever number the model wrote.
    """

    def __init__(self, citations: list[dict] | int, check=None):
        cits = citations if isinstance(citations, list) else [{}] * int(citations)
        self.check = check            # a rag.verify.AnswerCheck: hold the answer until it has been checked
        self.held = ""
        self.sources = [c.get("text", "") for c in cits]
        self.names = [c.get("source", "") for c in cits]
        self.n = len(self.sources)
        self.pending = ""
        self.cited: list[int] = []
        self.text: list[str] = []
        self.corrected = False

    def _rewrite(self, m: re.Match, before: str) -> str:
        nums = []
        for part in re.split(r"\s*(?:,|;|and|&)\s*", m.group(1), flags=re.IGNORECASE):
            part = re.sub(r"(?i)sources?|src", "", part).strip()
            if re.fullmatch(r"\d+\s*[-–]\s*\d+", part):
                a, b = (int(x) for x in re.split(r"[-–]", part))
                nums += list(range(a, b + 1)) if 0 < b - a < 10 else [a, b]
            elif part.isdigit():
                nums.append(int(part))
        keep = [x for x in dict.fromkeys(nums) if 1 <= x <= self.n]
        better = self._better_source(before, keep)
        if better is not None:
            keep = [better]
            self.corrected = True
        for x in keep:
            if x not in self.cited:
                self.cited.append(x)
        return "".join(f"[{x}]" for x in keep)

    def _better_source(self, before: str, marked: list[int]) -> int | None:
        """The source the sentence just before a marker was drawn from, when the marker names none that holds
        as many of its distinctive words (the model copied from [1] and wrote [3]); None keeps the marker."""
        if not marked or not any(self.sources):
            return None
        sentence = last_sentence(before)
        best = attribute(sentence, self.sources, self.names)
        if best is None or best in marked:
            return None
        scores = overlap_scores(sentence, self.sources)
        return best if max(scores[x - 1] for x in marked) < scores[best - 1] else None

    def _process(self, text: str, final: bool) -> str:
        text = self.pending + text
        self.pending = ""
        if not final:
            m = _OPEN.search(text)
            if m:
                text, self.pending = text[:m.start()], text[m.start():]
        out, at = [], 0
        for m in _MARKER.finditer(text):
            out.append(text[at:m.start()])
            out.append(self._rewrite(m, "".join(self.text) + "".join(out)))
            at = m.end()
        out.append(text[at:])
        return "".join(out)

    def feed(self, deltas: list[Delta]) -> list[Delta]:
        out = []
        for d in deltas:
            if self.check is not None and not d.tool_calls:
                self.held += d.text
                continue
            text = self._process(d.text, False) if d.text else ""
            self.text.append(text)
            if text or d.tool_calls:
                out.append(Delta(text, d.tool_calls))
        return out

    def finish(self, result: Result) -> list[Delta]:
        tail = self._process(self.held, True)
        verdict = self.check.verdict(tail) if self.check is not None else {}
        if verdict:
            result.extra["grounding"] = {"answer": verdict["answer"]}
        how = ("corrected" if self.corrected else "model") if self.cited else "none"
        if verdict.get("answer") == "extracted":
            self.cited, how = [verdict["n"]], "extracted"
            tail = f'{verdict["sentence"]} [{verdict["n"]}]'
        elif not self.cited:
            n = attribute("".join(self.text) + tail, self.sources, self.names)
            if n is not None:
                self.cited.append(n)
                tail = tail.rstrip() + f" [{n}]" if tail.strip() else f" [{n}]"
                how = "attributed"
        result.citations = [dict(c, cited=c.get("n") in self.cited) for c in result.citations]
        result.extra["citation_markers"] = how
        return [Delta(tail)] if tail else []
