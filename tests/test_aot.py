"""The AOT-compiled decode step (model/aot.py; its cache and builder: generate/compiled.py) against the eager
model it is traced from, on real SmolLM2 Q4_1.

One build (~60 s on two cores) is shared by the module; everything else reuses it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.errors import CompileError
from llamaforge.generate import compiled
from llamaforge.generate.engine import BatchEngine
from llamaforge.generate.sampling import SamplingParams
from llamaforge.model import aot

ESSAY = Path(__file__).resolve().parent.parent / "bench" / "texts" / "essay.txt"
PROMPTS = ["The first bridges were", "Steel is strong when it is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("aot_home")


@pytest.fixture(scope="module")
def lm(smollm2_gguf, home):
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMAFORGE_HOME", str(home))
    mp.setenv("LLAMAFORGE_COMPILE", "1")
    try:
        lm = llamaforge.load(str(smollm2_gguf), compile=True)  # builds into the module's home
    finally:
        mp.undo()
    assert lm.compiled is not None
    return lm


@pytest.fixture(autouse=True)
def _same_home(home, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_HOME", str(home))
    monkeypatch.setenv("LLAMAFORGE_COMPILE", "1")


def _eager(lm, tok, cache, pos, row=0):
    rows = None if row == 0 else torch.tensor([row])
    return lm.model(torch.tensor([[tok]]), cache=cache, input_pos=pos if rows is None else torch.tensor([pos]),
                    rows=rows, last_only=True)[0, -1]


def _prefill(lm, ids, cache, row=0):
    rows = None if row == 0 else torch.tensor([row])
    return lm.model(torch.tensor([ids]), cache=cache, input_pos=0 if rows is None else torch.tensor([0]),
                    rows=rows, last_only=True)[0, -1]


@torch.inference_mode()
def test_compiled_step_matches_eager_step_and_writes_the_cache(lm):
    ids = lm.tokenizer.encode(PROMPTS[0])
    c_eager, c_aot = lm.model.new_cache(1, 128), lm.model.new_cache(1, 128)
    tok = int(_prefill(lm, ids, c_eager).argmax())
    _prefill(lm, ids, c_aot)
    before = [t.clone() for t in c_aot.k]
    pos = len(ids)
    a, b = _eager(lm, tok, c_eager, pos), lm.compiled(tok, c_aot, pos)
    assert b.shape == (lm.config.vocab_size,) and b.dtype == torch.float32
    # Same weights and kernels; inductor only fuses and reorders the float32/bf16 glue between them.
    assert (a - b).abs().max() < 0.05 * a.abs().max(), (a - b).abs().max()
    assert int(a.argmax()) == int(b.argmax())
    for layer in range(lm.config.num_hidden_layers):
        k_e, k_a = c_eager.k[layer][0, :, pos].float(), c_aot.k[layer][0, :, pos].float()
        assert (k_e - k_a).abs().max() < 0.05 * k_e.abs().max() + 1e-3       # written in place, at pos
        assert torch.equal(c_aot.k[layer][0, :, :pos], before[layer][0, :, :pos])  # nothing before it moved
        assert not c_aot.k[layer][0, :, pos + 1:].any()                       # nor after it


# The compiled step and the eager model run the same kernels on the same weights; inductor only fuses and
# reorders the float32/bf16 glue between them, so their logits differ by rounding (measured up to 0.44 on an AMD
# EPYC, 3-4 steps of the bf16 logits the int8 head returns). Two greedy runs can therefore part only where the
# two best tokens are that close: a near-tie, not a defect.
NEAR_TIE = 0.5


def _greedy_with_logits(lm, engine, prompt: str, n: int = 24):
    seen = []

    def record(_ids, logits):
        seen.append(logits.clone())
        return logits
    req = engine.add(lm.tokenizer.encode(prompt), SamplingParams(max_tokens=n, temperature=0), [record])
    while engine.has_work():
        engine.step()
    return req.output_ids, seen


@torch.inference_mode()
def test_greedy_generation_equals_eager_through_the_engine(lm):
    """Identical greedy tokens, except after a position where eager and compiled both saw a near-tie."""
    compiled = lm.compiled
    outs = {}
    try:
        for mode in ("eager", "compiled"):
            lm.compiled = compiled if mode == "compiled" else None
            engine = BatchEngine(lm, max_batch=2, max_seq_len=256)
            outs[mode] = [_greedy_with_logits(lm, engine, p) for p in PROMPTS]
    finally:
        lm.compiled = compiled
    agreed = 0
    for (e_ids, e_logits), (c_ids, c_logits) in zip(outs["eager"], outs["compiled"]):
        d = next((j for j, (a, b) in enumerate(zip(e_ids, c_ids)) if a != b), None)
        agreed += len(e_ids) if d is None else d
        for a, b in zip(e_logits[:d], c_logits[:d]):  # same history: the logits must agree closely
            assert (a - b).abs().max() < 0.05 * a.abs().max()
        if d is not None:
            e_gap = float(e_logits[d][e_ids[d]] - e_logits[d][c_ids[d]])
            c_gap = float(c_logits[d][c_ids[d]] - c_logits[d][e_ids[d]])
            assert 0 <= e_gap <= NEAR_TIE and 0 <= c_gap <= NEAR_TIE, (d, e_gap, c_gap)
    assert agreed >= len(PROMPTS) * 24 // 2  # ties are rare: most tokens agree


@torch.inference_mode()
def test_perplexity_through_the_compiled_step_stays_with_eager(lm, smollm2_gguf):
    """Token-by-token perplexity over 400 tokens of the essay: the compiled step costs no quality.

    The bound is set against a reference, the float32 model on the same tokens, rather than against eager:
    eager and compiled are two roundings of one bf16 computation, and on 160 tokens they were measured 0.33%
    apart on an AMD EPYC and 0.72% apart on an Intel Xeon (AVX-512/AMX), where the compiled step was the one
    closer to float32. What must hold is that compiling adds no error beyond eager's, and that both stay near
    float32 (measured here: +0.68% eager, +0.77% compiled on these 400 tokens).
    """
    ids = lm.tokenizer.encode(ESSAY.read_text(encoding="utf-8"))[:400]
    nll = {}
    for mode in ("eager", "compiled"):
        cache = lm.model.new_cache(1, 512)
        logits = _prefill(lm, ids[:1], cache)
        total = 0.0
        for pos in range(1, len(ids)):
            total -= float(torch.log_softmax(logits.float(), -1)[ids[pos]])
            step = lm.compiled if mode == "compiled" else (lambda t, c, p: _eager(lm, t, c, p))
            logits = step(ids[pos], cache, pos)
        nll[mode] = total / (len(ids) - 1)
    ref = llamaforge.load(str(smollm2_gguf), dtype="float32", compile=False)
    lp = torch.log_softmax(ref.model(torch.tensor([ids]))[0, :-1].float(), -1)
    nll["float32"] = -float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())
    dev = {m: nll[m] - nll["float32"] for m in ("eager", "compiled")}  # log of the perplexity ratio
    assert 1 < math.exp(nll["float32"]) < 200
    assert dev["compiled"] <= max(dev["eager"], 0.0) + 0.005, dev
    assert abs(dev["compiled"]) < 0.015 and abs(dev["eager"]) < 0.015, dev


@torch.inference_mode()
def test_other_rows_of_a_shared_cache(lm):
    """The server keeps one request per cache row; the step writes and reads only its own row."""
    ids = lm.tokenizer.encode(PROMPTS[1])
    cache, ref = lm.model.new_cache(3, 64), lm.model.new_cache(3, 64)
    for c in (cache, ref):
        _prefill(lm, ids, c, row=2)
    snapshot = [t[:2].clone() for t in cache.v]
    tok = 13
    a, b = _eager(lm, tok, ref, len(ids), row=2), compiled.decode_one(lm, tok, cache, len(ids), row=2)
    assert int(a.argmax()) == int(b.argmax())
    assert all(torch.equal(t[:2], s) for t, s in zip(cache.v, snapshot))


def test_bad_positions_are_refused(lm):
    cache = lm.model.new_cache(1, 16)
    for pos in (0, 16, 100):
        with pytest.raises(ValueError, match="position"):
            lm.compiled(1, cache, pos)


def test_artifact_key_follows_what_the_code_depends_on(lm):
    m = lm.model
    p = compiled.artifact_path(m, torch.bfloat16)
    assert p.exists() and p.parent == Path(os.environ["LLAMAFORGE_HOME"]) / "compiled"
    assert compiled.artifact_path(m, torch.float32) != p          # cache dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert compiled.artifact_path(m, torch.bfloat16) != p     # baked OpenMP thread count
    finally:
        torch.set_num_threads(threads)


def test_corrupt_artifact_falls_back_to_eager(lm, smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    path = compiled.artifact_path(lm.model, lm.model.kv_dtype)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not really a package")
    other = llamaforge.load(str(smollm2_gguf), compile="auto")
    assert other.compiled is None and not path.exists()            # dropped, so a later build can replace it
    cache = other.model.new_cache(1, 32)
    _prefill(other, [1, 2, 3], cache)
    assert compiled.decode_one(other, 5, cache, 3).shape == (other.config.vocab_size,)


def test_background_build_is_started_once(lm, smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    started = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            started.append(cmd)
            self.pid = os.getpid()  # alive: the lock stays valid

    monkeypatch.setattr(compiled.subprocess, "Popen", FakePopen)
    for _ in range(2):
        other = llamaforge.load(str(smollm2_gguf))
        assert other.compiled is None
    assert len(started) == 1
    cmd = started[0]
    assert cmd[1:4] == ["-m", "llamaforge.cli.compile", "--build-step"]
    assert "--out" in cmd and cmd[cmd.index("--quant") + 1] == "q4"
    # When the artifact lands, the waiting model picks it up (polling is rate-limited: force the next check).
    dst = Path(cmd[cmd.index("--out") + 1])
    assert dst.parent == tmp_path / "compiled" and dst.name == Path(lm.compiled.path).name
    assert compiled.current(other) is None
    dst.write_bytes(Path(lm.compiled.path).read_bytes())
    other._compiled_pending[1] = 0
    assert compiled.current(other) is not None


def test_disabled_by_environment(smollm2_gguf, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_COMPILE", "0")
    assert llamaforge.load(str(smollm2_gguf), compile=True).compiled is None


def test_dense_models_are_not_compiled(tmp_path):
    from conftest import make_tiny_hf
    hf = make_tiny_hf("llama32")
    hf.save_pretrained(tmp_path / "m")
    lm = llamaforge.load(str(tmp_path / "m"))
    assert lm.compiled is None and lm.metadata.get("quant") in (None, "none")


def test_the_serving_process_does_not_import_the_compiler(lm, smollm2_gguf, home):
    """Loading and running the compiled step needs only torch's C++ runner: no dynamo/inductor (+150 MB)."""
    code = ("import sys, torch, llamaforge; from llamaforge.generate import compiled\n"
            f"lm = llamaforge.load({str(smollm2_gguf)!r})\n"
            "assert lm.compiled is not None\n"
            "c = lm.model.new_cache(1, 16); lm.model(torch.tensor([[1, 2]]), cache=c, input_pos=0)\n"
            "compiled.decode_one(lm, 3, c, 2)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor', 'sympy'))))")
    env = dict(os.environ, LLAMAFORGE_HOME=str(home), LLAMAFORGE_COMPILE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_build_errors_are_named(lm, tmp_path):
    class NotALlama(torch.nn.Module):
        config = lm.model.config

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.kv_dtype = None

        def new_cache(self, *a, **k):
            raise RuntimeError("no cache here")

        def inv_freq(self, device):
            return torch.ones(2)

    with pytest.raises(CompileError, match="no cache here"):
        aot.build(NotALlama(), tmp_path / "x.pt2")
    assert not list(tmp_path.iterdir())


def test_old_artifacts_are_pruned(tmp_path):
    folder = tmp_path / "compiled"
    folder.mkdir()
    files = []
    for i in range(compiled.KEEP_ARTIFACTS + 3):
        f = folder / f"decode-{i:04d}.pt2"
        f.write_bytes(b"x")
        os.utime(f, (1000 + i, 1000 + i))
        files.append(f)
    (folder / "decode-0000.log").write_text("old build log")
    keep = files[0]  # the one just built, even if its mtime is old
    compiled._prune(folder, keep=keep)
    left = sorted(p.name for p in folder.glob("decode-*.pt2"))
    assert len(left) == compiled.KEEP_ARTIFACTS and keep.name in left
    assert files[-1].name in left and files[1].name not in left


def test_a_failed_build_is_not_retried_in_the_background(lm, smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    started = []
    monkeypatch.setattr(compiled.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    path = compiled.artifact_path(lm.model, lm.model.kv_dtype)
    path.parent.mkdir(parents=True)
    path.with_suffix(".failed").write_text("CompileError: no compiler\n")
    assert llamaforge.load(str(smollm2_gguf)).compiled is None
    assert started == []


def test_build_process_entry_point(lm, smollm2_gguf, tmp_path):
    env = dict(os.environ, LLAMAFORGE_HOME=str(tmp_path))
    cached = subprocess.run([sys.executable, "-m", "llamaforge.cli.compile", "--build-step", str(smollm2_gguf), "--out",
                             lm.compiled.path], capture_output=True, text=True, env=env, timeout=120)
    assert cached.returncode == 0 and "(cached)" in cached.stdout
    out = tmp_path / "compiled" / "decode-x.pt2"
    out.parent.mkdir()
    lock = tmp_path / "compiled" / "decode-x.lock"
    lock.write_text("1")
    bad = subprocess.run([sys.executable, "-m", "llamaforge.cli.compile", "--build-step",
                          str(tmp_path / "missing.gguf"), "--out",
                          str(out), "--lock", str(lock), "--idle"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert not lock.exists()                               # released even on failure
    assert out.with_suffix(".failed").read_text().strip()  # and remembered, so it is not retried at once



@torch.inference_mode()
def test_batched_step_matches_the_eager_batch(lm):
    """Several requests in their own rows at their own positions: the server's continuous batch."""
    assert lm.compiled.batch is not None and lm.compiled._batch_runner is not None
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]
    rows = [2, 0, 3]
    c_eager, c_aot = lm.model.new_cache(4, 96), lm.model.new_cache(4, 96)
    for c in (c_eager, c_aot):
        for row, ids in zip(rows, prompts):
            _prefill(lm, ids, c, row=row)
    untouched = c_aot.k[5][1].clone()
    tokens, positions = [11, 22, 33], [len(p) for p in prompts]
    for step in range(3):
        want = lm.model(torch.tensor(tokens)[:, None], cache=c_eager, input_pos=torch.tensor(positions),
                        rows=torch.tensor(rows), last_only=True)[:, -1]
        got = compiled.decode_batch(lm, tokens, c_aot, positions, rows)
        assert got.shape == (3, lm.config.vocab_size)
        assert ((want - got).abs().amax(-1) < 0.05 * want.abs().amax(-1)).all()
        assert torch.equal(want.argmax(-1), got.argmax(-1))
        tokens, positions = want.argmax(-1).tolist(), [p + 1 for p in positions]
    assert torch.equal(c_aot.k[5][1], untouched)  # row 1 holds no request: never written
    with pytest.raises(ValueError, match="distinct row"):
        lm.compiled.batch([1, 2], c_aot, [5, 6], [0, 0])
    with pytest.raises(ValueError, match="positions must be"):
        lm.compiled.batch([1, 2], c_aot, [5, 96], [0, 1])


@torch.inference_mode()
def test_the_engine_decodes_a_full_batch_through_the_compiled_step(lm, monkeypatch):
    calls = []
    real = compiled.decode_batch
    monkeypatch.setattr(compiled, "decode_batch", lambda *a: calls.append(len(a[1])) or real(*a))
    engine = BatchEngine(lm, max_batch=3, max_seq_len=128)
    reqs = [engine.add(lm.tokenizer.encode(p), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
            for p in PROMPTS]
    while engine.has_work():
        engine.step()
    assert all(len(r.output_ids) == 12 and r.finish_reason == "length" for r in reqs)
    assert 3 in calls
