"""Grounded answers' two aids for small models: context-aware decoding (generate/contrast.py) and the answer check
with its extractive fallback (rag/verify.py), alone and inside the retrieval stage."""
from __future__ import annotations

import math

import pytest
import torch
from rag_support import install_demo
from test_generate_support import tiny_lm
from test_rag_stage import tiny_chat_lm

import llamaforge  # noqa: F401  registers the retrieval stage
from llamaforge.generate.api import build_request
from llamaforge.generate.contrast import PLAUSIBLE, ContextContrast
from llamaforge.generate.engine import BatchEngine
from llamaforge.generate.pipeline import plan
from llamaforge.generate.sampling import SamplingParams
from llamaforge.generate.stage import Output
from llamaforge.rag.grounding import CitationFilter, RetrievalStage
from llamaforge.rag.verify import AnswerCheck


@torch.inference_mode()
def _next_logprobs(model, ids):
    """log p(next | ids) from one fresh forward pass over the whole sequence (the reference)."""
    return torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)


def test_contrast_is_the_papers_formula_with_the_plausibility_floor():
    lm = tiny_lm()
    ctx_prompt, plain = list(b"context: the answer is 7. question?"), list(b"question?")
    gen = list(b"it is")
    proc = ContextContrast(lm.model, plain, len(ctx_prompt), alpha=0.5, max_new=16)
    logits = torch.randn(lm.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    for i in range(len(gen) + 1):   # token by token, as the sampler calls it
        got = proc(ctx_prompt + gen[:i], logits.clone())
    grounded = torch.log_softmax(logits, -1)
    want = 1.5 * grounded - 0.5 * _next_logprobs(lm.model, plain + gen)
    ok = grounded >= grounded.max() + math.log(PLAUSIBLE)
    assert 0 < int(ok.sum()) < lm.config.vocab_size
    assert torch.isinf(got[~ok]).all() and (got[~ok] < 0).all()
    assert torch.allclose(got[ok], want[ok], atol=1e-4)
    # the best grounded token is always allowed, so greedy never lands on a masked one
    assert torch.isfinite(got[int(grounded.argmax())])


def test_contrast_rolls_back_with_rejected_drafts():
    lm = tiny_lm()
    plain, prompt_len = list(b"plain prompt"), 20
    logits = torch.zeros(lm.config.vocab_size)
    proc = ContextContrast(lm.model, plain, prompt_len, alpha=1.0, max_new=16)
    proc([0] * prompt_len + list(b"abc"), logits.clone())
    back = proc([0] * prompt_len + list(b"ax"), logits.clone())      # "bc" rejected, "x" accepted instead
    fresh = ContextContrast(lm.model, plain, prompt_len, alpha=1.0, max_new=16)([0] * prompt_len + list(b"ax"),
                                                                               logits.clone())
    assert torch.allclose(back, fresh, atol=1e-5)
    want = -_next_logprobs(lm.model, plain + list(b"ax"))       # grounded logits are flat: 2*const - plain
    assert torch.allclose(back - back.max(), want - want.max(), atol=1e-4)


def test_contrast_changes_greedy_output_in_the_engine_and_stays_deterministic():
    lm = tiny_lm()
    prompt, plain = list(b"some context and a question"), list(b"a question")

    def run(alpha):
        eng = BatchEngine(lm, max_batch=2)
        procs = [ContextContrast(lm.model, plain, len(prompt), alpha, 12)] if alpha else None
        r = eng.add(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), procs)
        while eng.has_work():
            eng.step()
        return r.output_ids

    on = run(2.0)
    assert on == run(2.0) and len(on) == 12
    # reference: the same greedy contrast computed with fresh forward passes, token by token
    want = []
    for _ in range(12):
        g = _next_logprobs(lm.model, prompt + want)
        s = 3.0 * g - 2.0 * _next_logprobs(lm.model, plain + want)
        s[g < g.max() + math.log(PLAUSIBLE)] = -math.inf
        want.append(int(s.argmax()))
    assert on == want


def test_retrieval_stage_attaches_contrast_against_the_prompt_without_sources(tmp_path_factory):
    install_demo(tmp_path_factory)
    lm = tiny_chat_lm()
    q = "What is the name of the harbour ferry?"
    p = plan(lm, build_request(messages=[{"role": "user", "content": q}], retrieval={"collection": "demo", "k": 3}))
    procs = [x for x in p.processors() if isinstance(x, ContextContrast)]
    assert len(procs) == 1 and procs[0].prompt_len == len(p.prompt_ids)
    plain = lm.tokenizer.decode(procs[0].plain)
    assert q in plain and "Grey Heron" not in plain and "Grey Heron" in lm.tokenizer.decode(p.prompt_ids)
    off = RetrievalStage(contrast=0, check=False)
    p2 = plan(lm, build_request(messages=[{"role": "user", "content": q}], retrieval="demo"), stages=[off])
    assert p2.processors() == [] and "_retrieval_check" not in p2.extra


def test_retrieval_stage_builds_the_check_from_passage_sentences(tmp_path_factory):
    install_demo(tmp_path_factory)
    lm = tiny_chat_lm()
    q = "What is the name of the harbour ferry?"
    p = plan(lm, build_request(messages=[{"role": "user", "content": q}], retrieval={"collection": "demo", "k": 3}))
    check = p.extra["_retrieval_check"]
    assert len(check.sentences) == len(check.passages) == len(check.cosines) > 3
    assert set(check.passages) <= {1, 2, 3}
    assert "Grey Heron" in check.sentences[check.best]
    # a shaped answer (JSON) is never replaced by a sentence: no check there
    pj = plan(lm, build_request(messages=[{"role": "user", "content": q}], retrieval="demo", json_mode=True))
    assert "_retrieval_check" not in pj.extra


CHECK = AnswerCheck(question="In what year was Veltmark founded?",
                    sentences=["Veltmark was founded in 1647 by Ilse Varnholt.",
                               "The mayor, Petra Lindqvist, was first elected in 2019.",
                               "The harbour wall is 640 metres long."],
                    passages=[1, 3, 2], cosines=[0.72, 0.41, 0.30])
SOURCES = [{"n": 1, "source": "history.md", "text": CHECK.sentences[0]},
           {"n": 2, "source": "harbour.md", "text": CHECK.sentences[2]},
           {"n": 3, "source": "council.md", "text": CHECK.sentences[1]}]


@pytest.mark.parametrize("answer,verdict", [
    ("Veltmark was founded in 1647 [1].", "model"),              # drawn from the closest sentence
    ("It was founded in 1647.", "model"),
    ("The answer is 2019 [3].", "extracted"),                      # drawn from a sentence about another matter
    ("Petra Lindqvist was elected in 2019.", "extracted"),
    ("It was founded in 1802 by Anna Holt.", "extracted"),         # not drawn from any sentence
    ("Veltmark was founded [1].", "extracted"),                    # only the question's words: states nothing
    ("The sources do not say.", "model"),                          # a refusal stands
])
def test_answer_check_verdicts(answer, verdict):
    v = CHECK.verdict(answer)
    assert v["answer"] == verdict
    if verdict == "extracted":
        assert v["sentence"] == CHECK.sentences[0] and v["n"] == 1


def test_answer_check_margin_keeps_close_alternatives():
    close = AnswerCheck(CHECK.question, CHECK.sentences, CHECK.passages, [0.72, 0.60, 0.30], margin=0.2)
    assert close.verdict("Petra Lindqvist was elected in 2019.")["answer"] == "model"
    assert AnswerCheck(CHECK.question, CHECK.sentences, CHECK.passages, [0.72, 0.60, 0.30], margin=0.05).verdict(
        "Petra Lindqvist was elected in 2019.")["answer"] == "extracted"


@pytest.mark.parametrize("pieces,text,cited,how", [
    (["The answer is ", "2019 [3]."], "Veltmark was founded in 1647 by Ilse Varnholt. [1]", [1], "extracted"),
    (["Veltmark was founded ", "in 1647 [", "1]."], "Veltmark was founded in 1647 [1].", [1], "model"),
    (["It was founded in 1647."], "It was founded in 1647. [1]", [1], "attributed"),
])
def test_checked_answers_are_held_until_checked(pieces, text, cited, how):
    out = Output([CitationFilter(SOURCES, check=CHECK)], SOURCES)
    streamed = [d.text for p in pieces for d in out.feed(p)]
    assert streamed == []                       # nothing leaves before the whole answer is checked
    tail, result = out.finish("stop")
    assert "".join(d.text for d in tail) == text == result.text
    assert [c["n"] for c in result.citations if c["cited"]] == cited
    assert result.extra["citation_markers"] == how
    assert result.extra["grounding"]["answer"] == ("extracted" if how == "extracted" else "model")


def test_check_candidates_are_sentences_not_titles():
    from types import SimpleNamespace

    import numpy as np

    from llamaforge.rag.verify import build_check

    class Embedder:   # bag of letters, L2-normalised as every embedder's rows are
        def embed(self, texts):
            v = np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"] for t in texts],
                         dtype=np.float32)
            return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    hits = [SimpleNamespace(text="The Veltmark Glassworks\n\nThe glassworks opened in 1903. It makes green bottles."),
            SimpleNamespace(text="Opening hours\n\nIt is open from 9:00 to 17:00 on weekdays and closed on Sundays")]
    check = build_check(hits, "When did the glassworks open?", Embedder())
    assert check.sentences == ["The glassworks opened in 1903.", "It makes green bottles.",
                               "It is open from 9:00 to 17:00 on weekdays and closed on Sundays"]
    assert check.passages == [1, 1, 2] and len(check.cosines) == 3
    assert build_check(hits, "q", None) is None and build_check([], "q", Embedder()) is None


@pytest.mark.parametrize("alpha", [0, -0.5, float("nan")])
def test_contrast_refuses_a_strength_that_is_not_positive(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ContextContrast(tiny_lm().model, [1, 2], 3, alpha, 4)
