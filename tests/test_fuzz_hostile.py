"""Fixed-seed fuzzing of every hostile-input class of issue 17: random metadata types and values, random tensor
tables, random HF configs, nested structures, template constructs and hostile HTTP bodies. Each variant must end
cleanly: a valid model / answer, or a named LlamaforgeError (a 4xx with the reason over HTTP), within bounded CPU
time and memory, with the server still serving afterwards. The seed is fixed so a failure reproduces; the cases
are generated, so they cover combinations no hand-written test lists."""
from __future__ import annotations

import json
import random
import struct
import time

import httpx
import numpy as np
import pytest

from hostile_support import BASE_META, Bounded, base_tensors, write_llama_gguf
from llamaforge._fs import loads_json
from llamaforge.errors import LlamaforgeError

SEED = 17


def _values(rng: random.Random):
    """(value, gguf type name) drawn from the shapes a crafted header uses."""
    choice = rng.randrange(12)
    if choice == 0:
        return 0, "UINT32"
    if choice == 1:
        return rng.choice([2**32 - 1, 2**31, 3_000_000, 4097]), "UINT32"
    if choice == 2:
        return rng.choice([-1, -2**31, 7]), "INT32"
    if choice == 3:
        return rng.choice([2**40, 2**63 + 5, 2**64 - 1]), "UINT64"
    if choice == 4:
        return rng.choice([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e38, 2.5]), "FLOAT32"
    if choice == 5:
        return rng.choice([1e308, float("nan"), 5e-324]), "FLOAT64"
    if choice == 6:
        return rng.choice([True, False]), "BOOL"
    if choice == 7:
        return rng.choice(["", "8", "x" * rng.randrange(1, 3000), "\u00e9\U0001f600", "nan"]), "STRING"
    if choice == 8:
        return [rng.randrange(0, 10) for _ in range(rng.randrange(0, 5))] or [1], "ARRAY"
    if choice == 9:
        return ["a", "b"], "ARRAY"
    return rng.choice([1, 2, 4, 8, 16, 64]), "UINT32"


ARCH_KEYS = list(BASE_META) + ["llama.vocab_size", "llama.attention.key_length", "llama.rope.dimension_count",
                               "llama.rope.scaling.type", "llama.rope.scaling.factor", "general.architecture"]


def _warm(tmp_path):
    """One good load outside the bounds: the first load imports the model code (seconds under tracemalloc)."""
    from llamaforge.formats.load import load_model
    for q in (None, "int8"):
        load_model(write_llama_gguf(tmp_path / "warm.gguf"), dtype="float32", quant=q)


def test_fuzz_gguf_metadata(tmp_path):
    from llamaforge.formats.load import load_model
    _warm(tmp_path)
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(40):
        meta = {}
        for _ in range(rng.randrange(1, 4)):
            meta[rng.choice(ARCH_KEYS)] = _values(rng)
        drop = {rng.choice(ARCH_KEYS)} if rng.random() < 0.2 else set()
        p = write_llama_gguf(tmp_path / f"m{i}.gguf", meta, drop=drop)
        with Bounded(cpu_s=3.0, mib=48):
            try:
                lm = load_model(p, dtype="float32", quant=rng.choice([None, "q4", "int8"]))
            except LlamaforgeError as e:
                assert "\n" not in str(e) and len(str(e)) < 800, str(e)
                outcomes["refused"] += 1
            else:
                assert lm.config.num_hidden_layers == 2  # only a header that agrees with the tensors loads
                outcomes["loaded"] += 1
    assert outcomes["refused"] > 20


def test_fuzz_gguf_tensor_tables(tmp_path):
    from llamaforge.formats.load import load_model
    _warm(tmp_path)
    rng = random.Random(SEED + 1)
    names = list(base_tensors())
    for i in range(30):
        t: dict = {}
        for _ in range(rng.randrange(1, 3)):
            op = rng.randrange(4)
            name = rng.choice(names)
            if op == 0:
                t[name] = None
            elif op == 1:
                shape = tuple(rng.choice([1, 3, 8, 16, 24]) for _ in range(rng.randrange(1, 4)))
                t[name] = np.zeros(shape, np.float32)
            elif op == 2:
                t[f"blk.{rng.choice([2, 7, 999, 10**9])}.attn_q.weight"] = np.zeros((8, 8), np.float32)
            else:
                t[rng.choice(["rope_freqs.weight", "blk.0.attn_q.bias", "output.weight", "blk.0.junk.weight"])] = \
                    np.ones(rng.choice([1, 2, 8, 12]), np.float32)
        meta = {"llama.block_count": (rng.choice([1, 2, 3, 1000]), "UINT32")}
        p = write_llama_gguf(tmp_path / f"t{i}.gguf", meta, tensors=t)
        with Bounded(cpu_s=3.0, mib=48):
            try:
                load_model(p, dtype="float32")
            except LlamaforgeError as e:
                assert "\n" not in str(e)


def test_fuzz_hf_configs():
    from llamaforge.config import ModelConfig
    rng = random.Random(SEED + 2)
    base = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "head_dim": 4, "tie_word_embeddings": False,
            "rope_scaling": None}
    junk = [0, -1, 2**40, 10**30, 1.5, float("nan"), float("inf"), "4", "", None, True,
            [], [4], {}, {"rope_type": "llama3"}, {"rope_type": "linear", "factor": "x"},
            {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 1,
             "original_max_position_embeddings": 8}]
    refused = 0
    for _ in range(300):
        cfg = dict(base)
        for _ in range(rng.randrange(1, 4)):
            cfg[rng.choice(list(base))] = rng.choice(junk)
        try:
            ModelConfig.from_hf_config(cfg)
        except LlamaforgeError as e:
            assert "\n" not in str(e)
            refused += 1
    assert refused > 200


# ---------------------------------------------------------------------------------------------- nesting
def _nested(rng: random.Random, depth: int) -> str:
    opens = [rng.choice("[{") for _ in range(depth)]
    s = "".join('{"k":' if o == "{" else "[" for o in opens) + "1"
    return s + "".join("}" if o == "{" else "]" for o in reversed(opens))


def test_fuzz_nested_structures(tmp_path):
    from llamaforge.formats.safetensors import validate_safetensors
    from llamaforge.train.data import iter_records
    rng = random.Random(SEED + 3)
    for i in range(12):
        depth = rng.choice([10, 900, 5000, 60_000])
        doc = _nested(rng, depth)
        try:
            loads_json(doc)
        except json.JSONDecodeError as e:
            assert "nested too deeply" in e.msg
        header = ('{"__metadata__": {"x": ' + json.dumps(doc) + '}, "t": ' + doc + "}").encode()
        p = tmp_path / f"h{i}.safetensors"
        p.write_bytes(struct.pack("<Q", len(header)) + header)
        with Bounded(cpu_s=3.0, mib=64):
            with pytest.raises(LlamaforgeError):
                validate_safetensors(p)
        d = tmp_path / f"d{i}.jsonl"
        d.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": ' + doc + "}\n")
        with Bounded(cpu_s=3.0, mib=64):
            try:
                recs = list(iter_records(d))
            except LlamaforgeError:
                continue
            assert recs[0][2] is None and len(recs) == 2


# ---------------------------------------------------------------------------------------------- templates
CONSTRUCTS = [
    "{{ ''|slice(N)|list|length }}", "{{ 'a'.ljust(N) }}", "{{ 'ab' * N }}", "{{ lipsum(N) }}",
    "{{ range(N)|list|tojson }}", "{% for i in range(N) %}{{ i }}{% endfor %}", "{{ 'x'|center(N) }}",
    "{% macro m(n) %}{{ caller() if caller else n }}{{ m(n - 1) if n > 0 else '' }}{% endmacro %}{{ m(N) }}",
    "{{ (((((((((((N))))))))))) }}", "{{ messages[0]['content'] * N }}", "{{ 'a'|indent(N) }}",
    "{% set ns = namespace(s='a') %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ messages|map(attribute='__class__')|list }}",
    "{{ 'a'|wordwrap(N) }}", "{{ '%*s'|format(N, 'a') }}", "{{ N|string|list|join(',') * N }}",
    "{{ raise_exception('boom') }}", "{{ strftime_now('%Y') }}",
]


def test_fuzz_template_constructs():
    from llamaforge.errors import TemplateError
    from llamaforge.tokenizer.jinja_sandbox import ChatTemplate
    rng = random.Random(SEED + 4)
    msgs = [{"role": "user", "content": "hi"}]
    for _ in range(24):
        parts = [rng.choice(CONSTRUCTS).replace("N", str(rng.choice([3, 1000, 10**6, 10**9, 2**62])))
                 for _ in range(rng.randrange(1, 3))]
        t0 = time.monotonic()
        try:
            out = ChatTemplate("".join(parts)).render(messages=msgs, add_generation_prompt=True)
        except TemplateError as e:
            assert "\n" not in str(e)[:200]
        else:
            assert isinstance(out, str) and len(out) <= 4 << 20
        assert time.monotonic() - t0 < 15, parts


# ---------------------------------------------------------------------------------------------- HTTP bodies
@pytest.fixture(scope="module")
def srv():
    from llamaforge.server.app import ServerConfig, create_app
    from test_generate_support import tiny_lm
    from test_server_e2e import Running
    r = Running(create_app(ServerConfig(max_batch=2), preloaded={"tiny": tiny_lm(context=256)}))
    yield r
    r.stop()


BASES = {
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2},
    "/api/chat": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                  "options": {"num_predict": 2}},
    "/api/generate": {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
    "/v1/embeddings": {"model": "tiny", "input": "hi"},
}
JUNK = [None, True, -1, 0, 2**63, "__BIG__", 1e308, -1e308, "nan", "", "x" * 100_000, [], [None], {}, {"a": {}},
        "~/.bashrc", "../../etc/passwd", "\ud800", [[[[[[]]]]]], {"role": "x"}, 3.7, "99999999999h"]
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
          "options", "format", "tools", "tool_choice", "response_format", "keep_alive", "input", "logprobs",
          "suffix", "unknown_field", "system", "template", "logit_bias", "retrieval"]


def _mutate(rng: random.Random, body: dict) -> bytes:
    b = json.loads(json.dumps(body))
    for _ in range(rng.randrange(1, 3)):
        b[rng.choice(FIELDS)] = rng.choice(JUNK) if rng.random() < 0.8 else _deep_value(rng)
    if rng.random() < 0.3 and isinstance(b.get("messages"), list) and b["messages"]:
        b["messages"][0] = rng.choice([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                        "function": {"name": "f", "arguments": "[" * 50_000}}]},
                                       {"role": "tool", "content": {"x": 1}}, {"content": "no role"},
                                       {"role": "user", "content": [{"type": "image_url"}]}])
    raw = json.dumps(b, allow_nan=True).encode("utf-8", "surrogatepass")
    raw = raw.replace(b'"__BIG__"', b"9" * 5000)            # a 5,000-digit number literal
    r = rng.random()
    if r < 0.1:
        raw = raw[: rng.randrange(1, len(raw))]               # truncated
    elif r < 0.15:
        raw = raw.replace(b'"hi"', b'"\xff\xfe"')             # invalid UTF-8
    return raw


def _deep_value(rng):
    return json.loads(_nested(rng, 200))


def test_fuzz_hostile_http_bodies(srv):
    rng = random.Random(SEED + 5)
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=30) as c:
        for i in range(90):
            route = rng.choice(list(BASES))
            body = _mutate(rng, BASES[route])
            if i % 15 == 0:  # raw nesting in the body itself, deeper than any parser recursion
                body = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            r = c.post(srv.url + route, content=body, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500 or r.status_code == 503, (route, body[:300], r.status_code, r.text[:300])
            if r.status_code >= 400:
                err = r.json().get("error")
                assert err, r.text[:200]
        assert c.get(srv.url + "/health").status_code == 200
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 40
