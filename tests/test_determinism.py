"""Deterministic results on the default (packed int4) path of real SmolLM2 Q4_1 (issue 20).

A request's tokens must not depend on what else the engine is doing: the other requests of the batch, how its
prompt was chunked around them, whether its prompt prefix was reused from an earlier request, whether the
client streamed. The reference for each request is the same request run alone in a fresh engine; the checks
compare token ids exactly (greedy and seeded sampling alike), so any rounding difference that reaches a token
fails them. Prompts are long enough (up to ~400 tokens) to span several prefill chunks and attention blocks.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import llamaforge
from llamaforge.generate.engine import BatchEngine
from llamaforge.generate.sampling import SamplingParams
from sse_support import stream_chat_text
from test_server_e2e import Running

# Minutes on 2 cores (16 engines' worth of single runs as references): run with `-m slow`; make test stays fast.
pytestmark = pytest.mark.slow

ESSAY = (Path(__file__).resolve().parent.parent / "bench" / "texts" / "essay.txt").read_text()
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    # The default in-memory format for Q4_1 (packed int4), decoded eagerly: module fixtures run before the
    # autouse fixture that turns background builds off, and a compiled step landing mid-test would switch kernels.
    lm = llamaforge.load(str(smollm2_gguf), compile=False)
    assert lm.model._quant == "q4"
    return lm


def _prompts(lm) -> list[list[int]]:
    """16 prompts of 20-400 tokens; several share a long prefix (a system prompt, a document)."""
    words = ESSAY.split()
    system = " ".join(words[:150])
    out = []
    for i in range(16):
        if i % 3 == 0:    # shared 150-word prefix, different questions
            text = f"{system}\n\nQuestion {i}: what does the text say about {words[200 + 7 * i]}?"
        elif i % 3 == 1:  # a different window of the essay each time, of growing length
            text = " ".join(words[10 * i: 10 * i + 20 + 18 * i])
        else:
            text = f"Item {i}. " + " ".join(words[300 + 5 * i: 300 + 5 * i + 12])
        out.append(lm.tokenizer.encode(text))
    return out


def _params(i: int) -> SamplingParams:
    """Greedy for most requests, seeded sampling for every fourth."""
    if i % 4 == 3:
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=1000 + i, ignore_eos=True)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _run(engine: BatchEngine, reqs) -> None:
    while any(not r.done for r in reqs):
        engine.step()


@pytest.fixture(scope="module")
def runs(lm):
    """Every prompt alone in a fresh engine, all 16 together, and all 16 again one after another in one engine
    (where later prompts reuse the cached prefixes of earlier ones)."""
    prompts = _prompts(lm)
    alone = []
    for i, p in enumerate(prompts):
        engine = BatchEngine(lm, max_batch=1, max_seq_len=512)
        req = engine.add(p, _params(i))
        _run(engine, [req])
        alone.append(req.output_ids)
    engine = BatchEngine(lm, max_batch=16, max_seq_len=512)
    reqs = [engine.add(p, _params(i)) for i, p in enumerate(prompts)]
    _run(engine, reqs)
    together = [r.output_ids for r in reqs]
    engine = BatchEngine(lm, max_batch=2, max_seq_len=512)
    seq = []
    for i, p in enumerate(prompts):
        req = engine.add(p, _params(i))
        _run(engine, [req])
        seq.append(req)
    return prompts, alone, together, seq


def test_16_concurrent_greedy_requests_equal_each_run_alone(runs):
    prompts, alone, together, _ = runs
    assert max(len(p) for p in prompts) > 256 and min(len(p) for p in prompts) < 64  # several chunks and blocks
    greedy = [i for i in range(16) if i % 4 != 3]
    assert [together[i] for i in greedy] == [alone[i] for i in greedy]
    assert all(len(alone[i]) == MAX_TOKENS for i in greedy)


def test_seeded_sampling_is_reproducible_under_batching(runs):
    _, alone, together, seq = runs
    sampled = [i for i in range(16) if i % 4 == 3]
    assert [together[i] for i in sampled] == [alone[i] for i in sampled]
    assert [seq[i].output_ids for i in sampled] == [alone[i] for i in sampled]


def test_reused_prefixes_give_the_same_tokens(runs):
    _, alone, _, seq = runs
    assert sum(r.cached_tokens > 0 for r in seq) >= 3  # the shared system prompt was reused
    assert [r.output_ids for r in seq] == alone


def test_first_and_repeated_request_are_identical(lm):
    prompt = lm.tokenizer.encode(" ".join(ESSAY.split()[40:260]))
    engine = BatchEngine(lm, max_batch=1, max_seq_len=512)
    outs = []
    for _ in range(3):
        req = engine.add(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        _run(engine, [req])
        outs.append(req)
    assert outs[0].cached_tokens == 0 and outs[1].cached_tokens > 0 and outs[2].cached_tokens > 0
    assert outs[1].cached_tokens % 64 == 0  # reuse stops on the attention-block grid
    assert outs[0].output_ids == outs[1].output_ids == outs[2].output_ids


def test_prefill_chunk_size_does_not_change_tokens(lm):
    prompt = lm.tokenizer.encode(" ".join(ESSAY.split()[:300]))
    got = []
    for chunk in (64, 128, 256, 512):
        engine = BatchEngine(lm, max_batch=1, max_seq_len=512, prefill_chunk=chunk)
        req = engine.add(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        _run(engine, [req])
        got.append(req.output_ids)
    assert len(prompt) > 256 and all(g == got[0] for g in got)


# ------------------------------------------------------------------------------------------------ the server
def _chat(url: str, text: str, stream: bool) -> str:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": stream}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    return stream_chat_text(url, body)


def test_streamed_equals_not_streamed_through_the_server_under_load(lm):
    from llamaforge.server.app import ServerConfig, create_app
    words = ESSAY.split()
    questions = [f"Summarise: {' '.join(words[25 * i: 25 * i + 40 + 10 * i])}" for i in range(8)]
    srv = Running(create_app(ServerConfig(max_batch=8, max_queue=32, ctx=512), preloaded={"smollm2": lm}))
    try:
        plain = [_chat(srv.url, q, stream=False) for q in questions]
        # Streamed and non-streamed requests mixed, all at once, so they share batches and prefill steps.
        jobs = [(q, i % 2 == 0) for i, q in enumerate(questions)] + [(q, i % 2 == 1) for i, q in enumerate(questions)]
        with ThreadPoolExecutor(16) as pool:
            mixed = list(pool.map(lambda job: _chat(srv.url, *job), jobs))
        usage = _cached_usage(srv.url, " ".join(words[:160]))
        metrics = httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
    assert all(plain)
    assert mixed[:8] == plain and mixed[8:] == plain
    first, second = usage
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens >= 128 and second.prompt_tokens_details.cached_tokens % 64 == 0
    assert second.prompt_tokens == first.prompt_tokens
    assert 'llamaforge_prompt_cached_tokens_total{model="smollm2"}' in metrics
    assert 'llamaforge_prefix_cache_hit_rate{model="smollm2"}' in metrics


def _cached_usage(url: str, document: str):
    """The official client's view of usage for a long prompt sent twice (the second behind a cached prefix)."""
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "system", "content": document}, {"role": "user", "content": "One word: topic?"}]
    return [client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=2, temperature=0).usage
            for _ in range(2)]
