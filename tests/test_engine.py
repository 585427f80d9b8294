"""BatchEngine on tiny random models: parity with transformers and with no-cache forwards, batching, stop
handling, context limits, cancellation. Scripted outputs come from a logits processor that forces tokens."""
from __future__ import annotations

import pytest
import torch

from llamaforge.errors import ContextLengthError, InvalidRequestError
from llamaforge.generate import BatchEngine, SamplingParams, generate, prompt_logprobs, stream
from test_generate_support import BOS, EOS, EOT, tiny_lm

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama31")


def force(text_or_ids, then=EOS):
    """A logits processor that makes the model emit exactly these tokens (bytes of a str), then `then`."""
    script = list(text_or_ids.encode()) if isinstance(text_or_ids, str) else list(text_or_ids)
    state = {"n": None}

    def proc(ids, logits):
        if state["n"] is None:
            state["n"] = len(ids)  # prompt length at the first call
        k = len(ids) - state["n"]
        logits[:] = float("-inf")
        logits[script[k] if k < len(script) else then] = 0.0
        return logits

    return proc


def run_all(engine):
    events = []
    while engine.has_work():
        events += engine.step()
    return events


@pytest.mark.parametrize("variant", ["llama2", "llama31", "llama32"])
def test_greedy_matches_transformers_generate(variant):
    from conftest import make_tiny_hf
    hf = make_tiny_hf(variant, vocab_size=260)
    ours = tiny_lm(variant)
    prompt = [BOS] + list(b"The quick brown fox")
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    got = generate(ours, prompt, max_tokens=24, ignore_eos=True, **GREEDY)
    assert got.token_ids == ref
    assert got.finish_reason == "length" and got.usage == {"prompt_tokens": 20, "completion_tokens": 24,
                                                           "total_tokens": 44}


def test_batch_equals_single_with_more_requests_than_rows(lm):
    prompts = [list(b"abc"), list(b"a much longer prompt than the others, chunked"), list(b"xy"),
               list(b"fourth waits for a row"), [BOS, 7]]
    engine = BatchEngine(lm, max_batch=3, max_seq_len=128, prefill_chunk=8)
    reqs = [engine.add(p, SamplingParams(max_tokens=10 + i, ignore_eos=True, **GREEDY)) for i, p in enumerate(prompts)]
    assert engine.queued == 5 and engine.active == 0
    engine.step()
    assert engine.active == 3 and engine.queued == 2
    run_all(engine)
    assert engine.active == 0 and not engine.has_work()
    for i, (p, r) in enumerate(zip(prompts, reqs)):
        # Reference: a plain causal forward over the whole sequence at every step, no cache at all.
        ids = list(p)
        for _ in range(10 + i):
            with torch.no_grad():
                ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
        assert r.output_ids == ids[len(p):], i
        assert r.finish_reason == "length"


def test_seeded_output_does_not_depend_on_batch(lm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=99,
                            ignore_eos=True)
    alone = generate(lm, list(b"seeded"), **params.__dict__).token_ids
    engine = BatchEngine(lm, max_batch=3, max_seq_len=64)
    engine.add(list(b"other one"), params.replace(seed=1))
    req = engine.add(list(b"seeded"), params)
    engine.add(list(b"and another"), params.replace(seed=None))
    run_all(engine)
    assert req.output_ids == alone
    assert generate(lm, list(b"seeded"), **params.replace(seed=100).__dict__).token_ids != alone


def test_long_prefill_is_chunked_and_does_not_stall_decoding(lm):
    engine = BatchEngine(lm, max_batch=2, max_seq_len=256, prefill_chunk=16)
    short = engine.add(list(b"hi"), SamplingParams(max_tokens=50, ignore_eos=True, **GREEDY))
    engine.step()  # short is prefilled and has its first token
    long = engine.add(list(range(200)), SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY))
    steps_with_short = 0
    while long.state != "decode":
        evs = engine.step()
        steps_with_short += any(r is short for r, _ in evs)
        assert long.pos <= 200
    assert steps_with_short >= 12  # 200 prompt tokens / 16 per step, and the short request decoded each step


def test_stop_string_split_across_tokens_never_leaks(lm):
    s = stream(lm, [BOS, 1], stop=["END"], max_tokens=40, logits_processors=[force("hello ENDworld")])
    deltas = [ev.text for ev in s]
    emitted = ""
    for d in deltas:
        emitted += d
        assert "E" not in emitted
    assert emitted == "hello " == s.completion.text
    assert s.completion.finish_reason == "stop"
    assert s.completion.token_ids == list(b"hello END")


def test_held_back_prefix_is_released_when_it_is_not_a_stop(lm):
    c = generate(lm, [BOS, 1], stop=["ENDX"], max_tokens=40, logits_processors=[force("a ENDY b")])
    assert c.text == "a ENDY b" and c.finish_reason == "stop"  # stopped by EOS
    # Generation hits max_tokens while "EN" is held back: it is released at the end.
    c = generate(lm, [BOS, 1], stop=["ENDX"], max_tokens=4, logits_processors=[force("abEND")])
    assert c.text == "abEN" and c.finish_reason == "length"


def test_multibyte_characters_split_across_tokens(lm):
    text = "héllo wörld — 日本 🦙"
    s = stream(lm, [BOS], max_tokens=100, logits_processors=[force(text)])
    deltas = [ev.text for ev in s]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == s.completion.text
    assert s.completion.finish_reason == "stop"
    assert lm.tokenizer.decode(s.completion.token_ids) == text


def test_stop_token_ends_and_is_not_in_output(lm):
    c = generate(lm, [BOS, 5], max_tokens=20, logits_processors=[force("ok", then=EOT)])
    assert c.token_ids == list(b"ok") and c.text == "ok" and c.finish_reason == "stop"
    assert c.usage["completion_tokens"] == 3  # the stop token was sampled
    c = generate(lm, [BOS, 5], max_tokens=6, ignore_eos=True, logits_processors=[force("ok", then=EOT)])
    assert c.finish_reason == "length" and len(c.token_ids) == 6
    c = generate(lm, [BOS, 5], max_tokens=20, stop_ids=[ord("k")], logits_processors=[force("ok")])
    assert c.text == "o" and c.finish_reason == "stop"


def test_context_length_error_has_both_counts(lm):
    engine = BatchEngine(lm, max_batch=1, max_seq_len=32)
    with pytest.raises(ContextLengthError) as e:
        engine.add(list(range(40)), SamplingParams())
    assert e.value.prompt_tokens == 40 and e.value.context_length == 32
    assert "40" in str(e.value) and "32" in str(e.value)
    with pytest.raises(ContextLengthError) as e:
        generate(lm, list(range(600)), max_tokens=1)
    assert (e.value.prompt_tokens, e.value.context_length) == (600, 512)


def test_reaching_the_context_ends_with_length(lm):
    engine = BatchEngine(lm, max_batch=2, max_seq_len=32)
    req = engine.add(list(range(1, 29)), SamplingParams(max_tokens=100, ignore_eos=True, **GREEDY))
    events = run_all(engine)
    assert len(req.output_ids) == 4 and req.prompt_tokens + req.completion_tokens == 32
    assert [e.finish_reason for _, e in events] == [None, None, None, "length"]
    c = generate(lm, [i % 250 for i in range(1, 500)], max_tokens=1000, ignore_eos=True, **GREEDY)
    assert c.finish_reason == "length" and c.usage["total_tokens"] == 512


def test_invalid_requests(lm):
    engine = BatchEngine(lm, max_batch=1, max_seq_len=32)
    for bad in ([], [1, 260], [-1], ["a"], "abc", [1.5]):
        with pytest.raises(InvalidRequestError) as e:
            engine.add(bad, SamplingParams())
        assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        engine.add([1, 2], SamplingParams(top_p=0))
    assert e.value.field == "top_p"
    with pytest.raises(InvalidRequestError) as e:
        engine.add([1, 2], SamplingParams(stop_ids=[999]))
    assert e.value.field == "stop_ids"
    with pytest.raises(InvalidRequestError) as e:
        generate(lm, "hi", temprature=1)
    assert e.value.field == "temprature"
    assert not engine.has_work()


def test_cancel_frees_the_row_before_the_next_step(lm):
    engine = BatchEngine(lm, max_batch=1, max_seq_len=64)
    a = engine.add(list(b"first"), SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY))
    b = engine.add(list(b"second"), SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    engine.step()
    assert engine.active == 1 and engine.queued == 1
    engine.cancel(a)
    assert a.done and a.finish_reason is None and engine.active == 0
    events = engine.step()
    assert [r for r, _ in events] == [b]  # b got the row at once; a produced nothing more
    run_all(engine)
    assert b.finish_reason == "length" and len(a.output_ids) == 1
    # Cancelling a queued request just drops it.
    c = engine.add(list(b"x"), SamplingParams())
    engine.cancel(c)
    assert c.done and not engine.has_work()


def test_breaking_out_of_a_stream_cancels(lm):
    s = stream(lm, list(b"abc"), max_tokens=50, ignore_eos=True)
    for i, _ in enumerate(s):
        if i == 2:
            break
    s.close()
    assert s.request.done and s.request.cancelled and s.completion is None
    assert generate(lm, list(b"abc"), max_tokens=3, **GREEDY).finish_reason in ("length", "stop")


def test_logprobs_in_events(lm):
    s = stream(lm, list(b"abc"), max_tokens=3, logprobs=2, ignore_eos=True, **GREEDY)
    evs = list(s)
    ids = list(b"abc")
    for ev in evs:
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(torch.tensor([ids]))[0, -1], -1)
        assert ev.id == int(lp.argmax()) and abs(ev.logprob - float(lp.max())) < 1e-4
        assert [i for i, _ in ev.top_logprobs] == torch.topk(lp, 2).indices.tolist()
        ids.append(ev.id)
    assert s.completion.logprobs == [(e.id, e.logprob, e.top_logprobs) for e in evs]


def test_prompt_logprobs_match_a_full_forward(lm):
    ids = list(range(3, 40))
    got = prompt_logprobs(lm, ids, top_n=3, chunk=8)
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(torch.tensor([ids]))[0], -1)
    assert got[0] == (None, None) and len(got) == len(ids)
    for j in range(1, len(ids)):
        assert abs(got[j][0] - float(lp[j - 1, ids[j]])) < 1e-4
        assert [i for i, _ in got[j][1]] == torch.topk(lp[j - 1], 3).indices.tolist()


def _reference_stop(token_texts: list[bytes], stops: list[str]) -> tuple[str, bool]:
    """Obviously-correct reference: after each token, decode everything so far; stop at the first token whose
    text contains a stop string, cutting at its earliest occurrence."""
    data = b""
    for piece in token_texts:
        data += piece
        text = data.decode("utf-8", errors="ignore")  # complete characters only, like the stream decoder
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[:min(hits)], True
    return data.decode("utf-8", errors="replace"), False


def test_stop_strings_property():
    from hypothesis import given, settings, strategies as st
    from llamaforge.generate.engine import _TextState
    from test_generate_support import ByteTokenizer

    alphabet = st.sampled_from(list("abcAB é日🦙\n"))
    tok = ByteTokenizer()

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet, max_size=30), st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3))
    def check(text, stops):
        ids = list(text.encode())
        state = _TextState(tok, [BOS], stops)
        emitted, hit = "", False
        for i in ids:
            delta, hit = state.feed(i)
            emitted += delta
            assert not any(s in emitted for s in stops)
            if hit:
                break
        if not hit:
            rest, hit = state.finish()
            emitted += rest
        ref, ref_hit = _reference_stop([bytes([i]) for i in ids], stops)
        assert (emitted, hit) == (ref, ref_hit)

    check()


def test_prompt_prefix_is_reused_from_a_free_row(lm):
    engine = BatchEngine(lm, max_batch=2, max_seq_len=256, prefill_chunk=8)
    params = SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY)
    system = list(b"shared system prompt. " * 4)  # 88 tokens
    first = engine.add(system + list(b"question one"), params)
    run_all(engine)
    assert first.cached_tokens == 0
    # The next prompt continues the first conversation. What the row's prompt prefill computed is reused, in
    # whole 64-token blocks (so the rest is computed in the same blocks as in a fresh run: the same tokens);
    # the generated tokens' keys came from decode steps and are recomputed.
    follow = system + list(b"question one") + first.output_ids[:-1] + list(b" and two")
    second = engine.add(follow, params)
    other = engine.add(list(b"unrelated " * 8), params)
    run_all(engine)
    assert second.row is None and second.cached_tokens == 64
    assert other.cached_tokens == 0
    fresh = BatchEngine(lm, max_batch=1, max_seq_len=256)
    ref = fresh.add(follow, params)
    run_all(fresh)
    assert second.output_ids == ref.output_ids
    # An identical prompt reuses its whole blocks before the last token (whose logits start the answer).
    again = engine.add(list(b"unrelated " * 8), params)
    run_all(engine)
    assert again.cached_tokens == 64 and again.output_ids == other.output_ids


def test_stop_requested_ends_a_stream_mid_prefill(lm):
    # A first token no other test's prompt starts with: no prefix of this prompt is cached from earlier tests.
    s = stream(lm, [251] + list(range(1, 199)), max_tokens=5, ignore_eos=True, **GREEDY)
    engine = s._engine
    engine.prefill_chunk = 16
    steps = []

    def step():  # what a Ctrl-C handler does: set the flag while a step runs
        steps.append(1)
        out = orig()
        s.stop_requested = True
        return out

    orig, engine.step = engine.step, step
    try:
        assert list(s) == []
    finally:
        del engine.step
    assert len(steps) == 1 and s.request.pos == 16  # stopped one chunk into the 199-token prompt
    assert s.request.done and s.request.cancelled and s.completion is None and not engine.has_work()
