"""Perplexity over strided windows and the KL-divergence comparison, checked against transformers.

The reference loop is the one in Hugging Face's "Perplexity of fixed-length models" guide, written out here
independently (labels masked with -100, the model's own shifted cross-entropy). The real-model checks run on a
slice of bench/texts/essay.txt so they stay quick; bench/eval_bench.py runs the whole text beside llama.cpp.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llamaforge.errors import InvalidRequestError
from llamaforge.eval import perplexity as P
from test_generate_support import smollm2, smollm2_transformers, tiny_lm

ESSAY = Path(__file__).resolve().parent.parent / "bench" / "texts" / "essay.txt"


def hf_strided_nll(model, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """Summed NLL and token count, the Hugging Face guide's loop (float64 accumulation)."""
    x = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        trg_len = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(inp).logits.double()
        lp = torch.log_softmax(logits[0, :-1], -1)
        tgt = labels[0, 1:]
        keep = tgt != -100
        total -= float(lp[keep].gather(1, tgt[keep][:, None]).sum())
        count += int(keep.sum())
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("n,ctx,stride", [(10, 4, 4), (10, 4, 1), (17, 5, 3), (9, 9, 9), (9, 9, 2), (100, 32, 7),
                                          (13, 4, 4)])
def test_windows_score_every_token_but_the_first_exactly_once(n, ctx, stride):
    wins = P.windows(n, ctx, stride)
    scored = [t for w in wins for t in range(w.first, w.end)]
    if stride == ctx:   # no overlap: each window's first token has no context inside the window
        expected = [t for t in range(1, n) if t % ctx != 0]
    else:
        expected = list(range(1, n))
    assert scored == expected
    assert all(w.end - w.begin <= ctx and w.begin < w.first < w.end for w in wins)
    assert wins[0].first == 1 and wins[-1].end >= n - 1   # a trailing one-token window scores nothing


@pytest.mark.parametrize("n,ctx,stride,field", [(10, 1, 1, "ctx"), (10, 4, 5, "stride"), (10, 4, 0, "stride"),
                                                (3, 4, 4, "ctx")])
def test_impossible_windows_are_refused(n, ctx, stride, field):
    with pytest.raises(InvalidRequestError) as e:
        P.windows(n, ctx, stride)
    assert e.value.field == field


def test_window_larger_than_the_model_context_is_refused():
    lm = tiny_lm(context=64)
    with pytest.raises(InvalidRequestError, match="larger than the model's context of 64"):
        P.perplexity(lm, list(range(100)), ctx=65)


@pytest.mark.parametrize("ctx,stride,batch", [(16, 16, 1), (16, 5, 3), (24, 8, None)])
def test_tiny_model_matches_transformers_strided_loop(ctx, stride, batch):
    from conftest import make_tiny_hf
    hf = make_tiny_hf("llama31", vocab_size=260, seed=0)
    lm = tiny_lm("llama31", seed=0)
    ids = torch.randint(0, 260, (75,), generator=torch.Generator().manual_seed(1)).tolist()
    r = P.perplexity(lm, ids, ctx=ctx, stride=stride, batch_size=batch)
    nll, n = hf_strided_nll(hf, ids, ctx, stride)
    assert r.tokens == n
    assert r.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    # llama.cpp's standard error: ppl * sqrt(var(nll) / (n - 1)) of the per-token NLLs.
    x = r.nlls
    assert r.ppl_stderr == pytest.approx(r.ppl * math.sqrt(x.var() / (len(x) - 1)), rel=1e-9)


def test_kl_divergence_matches_a_direct_computation():
    from conftest import make_tiny_hf
    lm, base = tiny_lm("llama31", seed=0), tiny_lm("llama31", seed=1)
    hq, hb = make_tiny_hf("llama31", vocab_size=260, seed=0), make_tiny_hf("llama31", vocab_size=260, seed=1)
    ids = torch.randint(0, 260, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    c = P.compare(lm, base, ids, ctx=16, stride=8, batch_size=2)
    kld, same, nq, nb = [], [], [], []
    for w in P.windows(len(ids), 16, 8):
        x = torch.tensor([ids[w.begin:w.end]])
        with torch.no_grad():
            lq = torch.log_softmax(hq(x).logits[0].double(), -1)
            lb = torch.log_softmax(hb(x).logits[0].double(), -1)
        for t in range(w.first, w.end):
            j = t - w.begin - 1
            kld.append(float(torch.nn.functional.kl_div(lq[j], lb[j], log_target=True, reduction="sum")))
            same.append(int(lq[j].argmax() == lb[j].argmax()))
            nq.append(-float(lq[j, ids[t]]))
            nb.append(-float(lb[j, ids[t]]))
    assert c.tokens == len(kld) == 47
    assert c.kld["mean"] == pytest.approx(np.mean(kld), rel=1e-4)
    assert c.kld["max"] == pytest.approx(max(kld), rel=1e-4)
    assert c.kld["p50"] == pytest.approx(np.median(kld), rel=1e-4)
    assert c.same_top[0] == pytest.approx(np.mean(same))
    assert c.ppl == pytest.approx(math.exp(np.mean(nq)), rel=1e-5)
    assert c.ppl_base == pytest.approx(math.exp(np.mean(nb)), rel=1e-5)
    assert c.ratio[0] == pytest.approx(c.ppl / c.ppl_base, rel=1e-6)
    # A model against itself: no divergence, full agreement.
    s = P.compare(lm, lm, ids, ctx=16)
    assert s.kld["max"] < 1e-6 and s.same_top[0] == 1.0 and s.ratio[0] == pytest.approx(1.0)


def test_interrupt_returns_the_windows_done_so_far():
    lm = tiny_lm(context=64)
    ids = list(range(1, 200))
    calls = []

    def progress(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt
    r = P.perplexity(lm, ids, ctx=32, batch_size=1, progress=progress)
    assert r.interrupted and r.windows_done == 2 and r.tokens == 31 + 31 and math.isfinite(r.ppl)


# ------------------------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def essay_ids():
    lm = smollm2()
    return P.text_ids(lm, ESSAY.read_text(encoding="utf-8"))[:640]


def test_float32_perplexity_equals_transformers_within_0_1_percent(essay_ids):
    """Same GGUF, both dequantized to float32, same windows (ctx 256, stride 128)."""
    _, hf = smollm2_transformers()
    ours = P.perplexity(smollm2(), essay_ids, ctx=256, stride=128)
    nll, n = hf_strided_nll(hf, essay_ids, 256, 128)
    theirs = math.exp(nll / n)
    assert ours.tokens == n == len(essay_ids) - 1
    assert abs(ours.ppl / theirs - 1) < 1e-3, (ours.ppl, theirs)
    assert 5 < ours.ppl < 100


@pytest.fixture(scope="module")
def default_lm(smollm2_gguf):
    import llamaforge
    return llamaforge.load(str(smollm2_gguf), compile=False)


def test_default_quantized_path_within_one_percent_of_float32(default_lm, essay_ids):
    assert default_lm.metadata["quant"] == "q4"
    c = P.compare(default_lm, smollm2(), essay_ids, ctx=256, stride=128)
    assert abs(c.ratio[0] - 1) < 0.01, (c.ppl, c.ppl_base)
    ref = P.perplexity(smollm2(), essay_ids, ctx=256, stride=128)
    assert c.ppl_base == pytest.approx(ref.ppl, rel=1e-5)
    # The packed weights are the file's own Q4_1 values: the distributions barely move.
    assert 0 < c.kld["mean"] < 0.02 and c.same_top[0] > 0.9
    # Scored through the packed kernels generation uses (bf16 activations) instead of the dense scoring GEMMs:
    # also within 1%, and a different computation (the guard covers what generation computes).
    k = P.compare(default_lm, smollm2(), essay_ids, ctx=256, stride=128, dense=False)
    assert abs(k.ratio[0] - 1) < 0.01 and 0 < k.kld["mean"] < 0.02, (k.ppl, k.ppl_base)
    assert k.ppl != c.ppl


def test_cli_perplexity_json_and_bad_input(tmp_path, capsys, essay_ids):
    from llamaforge.cli.main import main
    text = tmp_path / "t.txt"
    text.write_text(ESSAY.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    assert main(["eval", "perplexity", "smollm2", "--file", str(text), "--ctx", "128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"ppl", "ppl_stderr", "tokens"} and out["tokens"] > 200 and 1 < out["ppl"] < 200
    assert 0 < out["ppl_stderr"] < out["ppl"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    # Each case that needs the model's context loads it again: two such cases; the rest are checked above.
    cases = [(["--file", str(tmp_path / "missing.txt")], "cannot read"),
             (["--file", str(empty)], "empty"),
             (["--file", str(text), "--ctx", "100000"], "larger than the model's context"),
             (["--file", str(text), "--ctx", "4096"], "shorter than one window")]
    for extra, msg in cases:
        assert main(["eval", "perplexity", "smollm2", *extra]) == 1, extra
        err = capsys.readouterr().err
        assert err.startswith("Error: ") and msg in err and "Traceback" not in err, (extra, err)
