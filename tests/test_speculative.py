"""Speculative decoding (issue 20 item 4): drafts verified in one forward give exactly plain decoding's tokens.

The reference for every check is the same engine without speculation. Drafts come from prompt lookup, from a
draft model, or from test drafters that are always right (the reference's own next tokens: whole drafts accepted,
stops and budgets land inside them) or always wrong (every draft rejected: the rolled-back cache must leave the
following tokens unchanged).
"""
from __future__ import annotations

import pytest

from llamaforge.errors import InvalidRequestError
from llamaforge.generate.engine import BatchEngine
from llamaforge.generate.sampling import SamplingParams
from llamaforge.generate.speculative import NgramIndex, Speculator
from llamaforge.model.quant import quantize_model

from test_generate_support import ByteTokenizer, tiny_lm

PROMPTS = [b"abcabcabcabc hello hello hello", b"the cat sat; the cat sat; the cat", b"xyz xyz xyz 123 123"]


@pytest.fixture(scope="module")
def lm():
    """The tiny model in the default weight format (packed int4; its kernels are row-independent, so a verify
    pass of several positions computes each exactly as a one-token decode step does)."""
    lm = tiny_lm()
    quantize_model(lm.model, "q4")
    assert lm.model._quant == "q4"
    return lm


def _run(engine, prompts, params):
    reqs = [engine.add(list(p) if isinstance(p, bytes) else p, params) for p in prompts]
    events = {r.id: [] for r in reqs}
    while engine.has_work():
        for r, e in engine.step():
            events[r.id].append(e)
    return reqs, events


class Oracle:
    """Drafts the reference's next tokens (plus, past its end, a wrong one): every draft token is right."""

    name = "oracle"

    def __init__(self, outputs: dict[tuple, list[int]], wrong: bool = False):
        self.outputs, self.wrong = outputs, wrong

    def propose(self, req, k):
        done = len(req._all_ids) - len(req.prompt_ids)
        if self.wrong:  # a token the reference does not produce next: always rejected
            ref = self.outputs[tuple(req.prompt_ids)]
            nxt = ref[done] if done < len(ref) else 0
            return [(nxt + 1 + i) % 256 for i in range(k)]
        return (self.outputs[tuple(req.prompt_ids)][done:] + [0] * k)[:k]

    def accepted(self, req, n_ids):
        pass


def _reference(lm, prompts, params, max_batch=3):
    reqs, events = _run(BatchEngine(lm, max_batch=max_batch), prompts, params)
    return reqs, events


def _with(lm, drafter, k=4, max_batch=3):
    engine = BatchEngine(lm, max_batch=max_batch)
    engine.speculator = Speculator(engine, drafter, k)
    return engine


def _same(ref, got):
    (rr, re), (gr, ge) = ref, got
    for a, b in zip(rr, gr):
        assert b.output_ids == a.output_ids
        assert b.text == a.text and b.finish_reason == a.finish_reason
        assert b.completion_tokens == a.completion_tokens
        assert [e.id for e in ge[b.id]] == [e.id for e in re[a.id]]
        assert "".join(e.text for e in ge[b.id]) == "".join(e.text for e in re[a.id])


def test_ngram_index_drafts_what_followed_the_latest_earlier_occurrence():
    ids = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert NgramIndex(3).propose(ids, 2) == [7, 8]   # the later "1 2 3" was followed by 7 8
    assert NgramIndex(3).propose([4, 5, 6], 3) == []  # nothing repeats
    assert NgramIndex(3).propose([5, 6, 0, 6], 2) == [0, 6]  # falls back to the unigram "6"
    idx = NgramIndex(2)
    seq = [1, 2, 1]
    assert idx.propose(seq, 3) == [2, 1]             # incremental: the index grows with the sequence
    seq += [2]
    assert idx.propose(seq, 3) == [1, 2]


def test_prompt_lookup_greedy_output_is_identical_and_drafts_are_used(lm):
    params = SamplingParams(max_tokens=28, temperature=0, ignore_eos=True)
    ref = _reference(lm, PROMPTS, params)
    engine = BatchEngine(lm, max_batch=3, speculate="ngram", draft_tokens=4)
    got = _run(engine, PROMPTS, params)
    _same(ref, got)
    st = engine.speculator.stats()
    assert st["drafted_tokens"] > st["accepted_tokens"] > 0  # drafts both accepted and rejected


def test_dense_float32_greedy_tokens_are_identical():
    # Dense weights go through MKL, whose GEMM rounds a row differently with more rows (also true of plain
    # batched decoding): tokens still match; logits agree to float rounding only (see speculative.py).
    dense = tiny_lm()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ref = _reference(dense, PROMPTS, params)
    engine = BatchEngine(dense, max_batch=3, speculate="ngram")
    got = _run(engine, PROMPTS, params)
    assert [r.output_ids for r in got[0]] == [r.output_ids for r in ref[0]]
    assert engine.speculator.stats()["accepted_tokens"] > 0


def test_rejected_drafts_leave_the_cache_as_if_they_never_happened(lm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = _reference(lm, PROMPTS, params)
    outputs = {tuple(r.prompt_ids): r.output_ids for r in ref[0]}
    engine = _with(lm, Oracle(outputs, wrong=True), k=5)
    got = _run(engine, PROMPTS, params)
    _same(ref, got)
    st = engine.speculator.stats()
    assert st["accepted_tokens"] == 0 and st["drafted_tokens"] > 20


def test_whole_drafts_accepted_give_the_same_tokens_in_fewer_steps(lm):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ref = _reference(lm, PROMPTS, params)
    outputs = {tuple(r.prompt_ids): r.output_ids for r in ref[0]}
    engine = _with(lm, Oracle(outputs), k=4)
    steps = 0
    reqs = [engine.add(list(p), params) for p in PROMPTS]
    while engine.has_work():
        engine.step()
        steps += 1
    for a, b in zip(ref[0], reqs):
        assert b.output_ids == a.output_ids
    st = engine.speculator.stats()
    assert st["accepted_tokens"] == st["drafted_tokens"] > 0
    assert steps <= 30 // 5 + 2  # 5 tokens a step (4 drafts + the bonus) after the first


def _first_new(items, start):
    """Index of the first item at or after `start` that does not occur before it."""
    return next(i for i in range(start, len(items)) if items[i] not in items[:i])


def test_stop_string_and_stop_token_inside_an_accepted_draft(lm):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for prompt in PROMPTS:
        base = _reference(lm, [prompt], params)[0][0]
        letters = [chr(i) if 97 <= i <= 122 else "" for i in base.output_ids]
        at = next((i for i in range(4, len(letters))
                   if letters[i] and letters[i] not in lm.tokenizer.decode(base.output_ids[:i])), None)
        if at is not None:
            break
    assert at is not None, "no reference output has a fresh ASCII letter to stop on"
    stop_id = base.output_ids[_first_new(base.output_ids, 5)]
    for p in (SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(letters[at],)),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_ids=(stop_id,))):
        ref = _reference(lm, [prompt], p)
        assert ref[0][0].finish_reason == "stop" and 3 <= len(ref[0][0].output_ids) < 30
        engine = _with(lm, Oracle({tuple(base.prompt_ids): base.output_ids}), k=4)
        _same(ref, _run(engine, [prompt], p))
        assert engine.speculator.stats()["accepted_tokens"] >= 3


def test_max_tokens_cut_inside_a_draft(lm):
    outputs = {tuple(r.prompt_ids): r.output_ids
               for r in _reference(lm, PROMPTS, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]}
    for n in (1, 2, 7):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        ref = _reference(lm, PROMPTS, params)
        engine = _with(lm, Oracle(outputs), k=4)
        got = _run(engine, PROMPTS, params)
        _same(ref, got)
        assert all(r.finish_reason == "length" and len(r.output_ids) == n for r in got[0])


def test_context_window_end_inside_a_draft(lm):
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    ref = _run(BatchEngine(lm, max_batch=2, max_seq_len=48), PROMPTS[:2], params)
    outputs = {tuple(r.prompt_ids): r.output_ids + [0] * 8 for r in ref[0]}
    engine = BatchEngine(lm, max_batch=2, max_seq_len=48)
    engine.speculator = Speculator(engine, Oracle(outputs), 5)
    got = _run(engine, PROMPTS[:2], params)
    _same(ref, got)
    assert all(r.finish_reason == "length" for r in got[0])


def test_seeded_sampling_logprobs_and_penalties_unchanged(lm):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=7, logprobs=2,
                            repeat_penalty=1.3, ignore_eos=True)
    ref = _reference(lm, PROMPTS, params)
    outputs = {tuple(r.prompt_ids): r.output_ids for r in ref[0]}
    engine = _with(lm, Oracle(outputs), k=3)
    got = _run(engine, PROMPTS, params)
    _same(ref, got)
    for a, b in zip(ref[0], got[0]):
        assert [(e.logprob, e.top_logprobs) for e in got[1][b.id]] == [(e.logprob, e.top_logprobs)
                                                                         for e in ref[1][a.id]]
    assert engine.speculator.stats()["accepted_tokens"] > 0


def test_stateful_logits_processor_sees_the_same_calls(lm):
    class Recorder:
        """A processor that bans the byte after each 'a' (depends on history) and records its calls."""

        def __init__(self):
            self.calls = []

        def __call__(self, ids, logits):
            self.calls.append(list(ids))
            if ids[-1] == ord("a"):
                logits[ord("b")] = float("-inf")
            return logits

    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ra = Recorder()
    e = BatchEngine(lm, max_batch=1)
    ref_req = e.add(list(PROMPTS[0]), params, [ra])
    while e.has_work():
        e.step()
    rb = Recorder()
    e = BatchEngine(lm, max_batch=1, speculate="ngram")
    req = e.add(list(PROMPTS[0]), params, [rb])
    while e.has_work():
        e.step()
    assert req.output_ids == ref_req.output_ids and rb.calls == ra.calls


def test_bad_speculation_options_are_refused(lm):
    with pytest.raises(InvalidRequestError, match="speculate"):
        BatchEngine(lm, speculate="eagle")
    with pytest.raises(InvalidRequestError, match="draft tokens"):
        BatchEngine(lm, speculate="ngram", draft_tokens=0)
    with pytest.raises(InvalidRequestError, match="draft model"):
        BatchEngine(lm, speculate="draft")


CODE = """def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
"""


def test_smollm2_q4_greedy_output_is_identical_with_prompt_lookup(smollm2_gguf):
    import torch

    import llamaforge
    from llamaforge.generate.chat_formats import chat_format

    smol = llamaforge.load(str(smollm2_gguf), compile=False)  # the default packed int4 path, eager
    prompt = chat_format(smol).encode([{"role": "user", "content": "Rename the variable subtotal to base_amount "
                                                                   "and return the whole code:\n\n" + CODE}])
    params = SamplingParams(max_tokens=16, temperature=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is steadier on a loaded machine; both runs use the same kernels
    try:
        ref = _reference(smol, [prompt], params, max_batch=1)
        engine = BatchEngine(smol, max_batch=1, speculate="ngram")
        got = _run(engine, [prompt], params)
    finally:
        torch.set_num_threads(threads)
    _same(ref, got)
    st = engine.speculator.stats()
    assert st["drafted_tokens"] > 0 and st["accepted_tokens"] > 0


class _ShiftedBytes(ByteTokenizer):
    """The byte tokenizer with two tokens' bytes swapped: same size, another vocabulary."""

    def token_bytes(self, token_id):
        return super().token_bytes({65: 66, 66: 65}.get(token_id, token_id))


def test_draft_model_gives_identical_output_and_other_vocabularies_are_refused(lm):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ref = _reference(lm, PROMPTS, params)
    other = tiny_lm(seed=3)  # another random model with the same tokenizer: drafts mostly wrong
    for draft, least in ((other, 0.0), (lm, 0.8)):  # the target itself as its own draft: nearly all accepted
        engine = BatchEngine(lm, max_batch=3, speculate="draft", draft_lm=draft, draft_tokens=3)
        got = _run(engine, PROMPTS, params)
        _same(ref, got)
        st = engine.speculator.stats()
        assert st["drafted_tokens"] > 0 and st["acceptance_rate"] >= least
    with pytest.raises(InvalidRequestError, match="tokenizer differs from the target's at token 65"):
        BatchEngine(lm, speculate="draft", draft_lm=tiny_lm(tokenizer=_ShiftedBytes()))
    small = tiny_lm()
    small.tokenizer.vocab_size = 300  # (an instance attribute: the class keeps 260)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        BatchEngine(lm, speculate="draft", draft_lm=small)
    with pytest.raises(InvalidRequestError, match="only used with speculate 'draft'"):
        BatchEngine(lm, speculate="ngram", draft_lm=other)


def test_configured_model_speculates_in_every_engine_and_reports_it(lm):
    from llamaforge.generate.api import generate
    from llamaforge.generate.speculative import configure
    from llamaforge.server.metrics import Metrics
    from llamaforge.server.scheduler import _speculation_stats

    plain = generate(lm, "abcabcabcabc hello hello", max_tokens=16, temperature=0, ignore_eos=True)
    spec_lm = tiny_lm()
    quantize_model(spec_lm.model, "q4")
    configure(spec_lm, "ngram", 3)
    got = generate(spec_lm, "abcabcabcabc hello hello", max_tokens=16, temperature=0, ignore_eos=True)
    assert got.token_ids == plain.token_ids and got.text == plain.text
    engine = BatchEngine(spec_lm)
    assert engine.speculator is not None and engine.speculator.k == 3
    _run(engine, PROMPTS[:1], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    st = _speculation_stats(engine)
    assert st["speculative_drafted_tokens"] > 0
    text = Metrics(lambda: {"tiny": st}).render()
    assert f'llamaforge_speculative_drafted_tokens{{model="tiny"}} {st["speculative_drafted_tokens"]}' in text
    assert 'llamaforge_speculative_acceptance_rate{model="tiny"}' in text
    with pytest.raises(InvalidRequestError, match="draft tokens"):
        configure(spec_lm, "ngram", 99)


def test_cli_flags_parse_and_bad_combinations_fail_clearly(lm):
    import argparse

    from llamaforge.cli import generate as gen_cli, run as run_cli, serve as serve_cli
    from llamaforge.cli.flags import apply_speculation_flags
    for mod in (gen_cli, run_cli, serve_cli):
        args = mod.build_parser().parse_args(["smollm2", "--speculate", "ngram", "--draft-tokens", "6"]
                                             + (["hi"] if mod is gen_cli else []))
        assert (args.speculate, args.draft, args.draft_tokens) == ("ngram", None, 6)
    for ns, match in ((dict(speculate="draft", draft=None, draft_tokens=None), "needs a draft model"),
                      (dict(speculate="ngram", draft=None, draft_tokens=17), "draft tokens"),
                      (dict(speculate="ngram", draft="x", draft_tokens=None), "only used with speculate 'draft'")):
        with pytest.raises(InvalidRequestError, match=match):
            apply_speculation_flags(lm, argparse.Namespace(**ns))
    target = tiny_lm()
    assert apply_speculation_flags(target, argparse.Namespace(speculate=None, draft=None, draft_tokens=None)) is None
    assert "speculation" not in target.__dict__
    apply_speculation_flags(target, argparse.Namespace(speculate=None, draft="tiny", draft_tokens=2),
                            draft_lm=tiny_lm(seed=5))
    assert BatchEngine(target).speculator.drafter.name == "draft"


def test_server_model_manager_applies_serve_speculation_flags():
    from llamaforge.server.app import ServerConfig
    from llamaforge.server.metrics import Metrics
    from llamaforge.server.models import ModelManager

    served = tiny_lm()
    manager = ModelManager(ServerConfig(speculate="ngram", draft_tokens=5), Metrics(), loader=lambda name: served)
    assert manager._load("tiny") is served
    engine = BatchEngine(served)
    assert engine.speculator.drafter.name == "ngram" and engine.speculator.k == 5
    plain = tiny_lm()
    assert ModelManager(ServerConfig(), Metrics(), loader=lambda name: plain)._load("tiny") is plain
    assert BatchEngine(plain).speculator is None
