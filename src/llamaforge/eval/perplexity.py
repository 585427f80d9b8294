"""Perplexity over sliding windows, and the KL divergence of one model's next-token distribution from another's.

Windows: `ctx` tokens each, starting every `stride` tokens; a window scores only the tokens no earlier window
scored, and the first window scores all but its first token (the strided evaluation of Hugging Face's "Perplexity
of fixed-length models" guide). With stride == ctx the windows do not overlap; a smaller stride gives every scored
token more context at the cost of more compute. Windows are batched through the model, one forward per batch.

The standard error follows llama.cpp's `llama-perplexity`: ppl * sqrt(var(nll) / (n - 1)) over the per-token
negative log-likelihoods. `compare` reports what `llama-perplexity --kl-divergence` reports: mean/max/percentile
KL divergence from the base model, the token-probability differences, top-1 agreement and the perplexity ratio.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..errors import InvalidRequestError
from ..generate.engine import context_length
from .scoring import DEFAULT_BATCH_TOKENS, ModelScorer

DEFAULT_CTX = 512


class Window(NamedTuple):
    begin: int   # first token of the window
    end: int     # one past its last token
    first: int   # first token the window scores (begin < first < end)


def windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """The windows over a text of `n_tokens` tokens. Raises InvalidRequestError for impossible sizes."""
    if not isinstance(ctx, int) or ctx < 2:
        raise InvalidRequestError(f"the window (--ctx) must be at least 2 tokens, got {ctx!r}", field="ctx")
    if not isinstance(stride, int) or not 1 <= stride <= ctx:
        raise InvalidRequestError(f"the stride must be between 1 and the window ({ctx}), got {stride!r}; a "
                                  "larger stride would leave tokens unscored", field="stride")
    if n_tokens < ctx:
        raise InvalidRequestError(f"the text has {n_tokens} tokens, shorter than one window of {ctx}; use a "
                                  "longer text or a smaller --ctx", field="ctx")
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + ctx, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:  # a last window of one token scores nothing (its token has no context in it)
            out.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            return out
        begin += stride


def check_ctx(lm, ctx: int | None) -> int:
    """The window size to use: `ctx` or the default (512, at most the model's context). A window larger than the
    model's context is an error."""
    n_ctx = context_length(lm)
    if ctx is None:
        return min(DEFAULT_CTX, n_ctx)
    if isinstance(ctx, bool) or not isinstance(ctx, int):
        raise InvalidRequestError(f"--ctx must be an integer, got {ctx!r}", field="ctx")
    if ctx > n_ctx:
        raise InvalidRequestError(f"--ctx {ctx} is larger than the model's context of {n_ctx} tokens", field="ctx")
    return ctx


def text_ids(lm, text: str) -> list[int]:
    """The text's token ids as the model reads a document: BOS first when the model expects one."""
    if not text.strip():
        raise InvalidRequestError("the text is empty", field="file")
    ids = list(lm.tokenizer.encode(text))
    bos = getattr(lm.tokenizer, "bos_id", None)
    if getattr(lm.tokenizer, "add_bos", False) and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    m = float(x.mean())
    return m, float(math.sqrt(max(float(x.var()), 0.0) / (n - 1))) if n > 1 else float("nan")


@dataclass
class PerplexityResult:
    """ppl ± ppl_stderr over `tokens` scored tokens. `interrupted`: Ctrl-C stopped the run after `windows_done`
    of `windows` windows (the figures cover what was scored)."""

    ppl: float
    ppl_stderr: float
    tokens: int
    nll: float
    ctx: int
    stride: int
    windows: int
    windows_done: int
    seconds: float
    interrupted: bool = False
    window_tokens: int = 0   # tokens run through the model (overlapping windows count each time)
    nlls: np.ndarray | None = field(default=None, repr=False)

    @property
    def tokens_per_second(self) -> float:
        """Window tokens run through the model per second."""
        return self.window_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "nlls"}
        d["tokens_per_second"] = self.tokens_per_second
        return d


def result_from(nlls: list[np.ndarray], ctx: int, stride: int, wins: list[Window], done: int, t0: float,
                interrupted: bool, window_tokens: int) -> PerplexityResult:
    """A PerplexityResult from the per-window negative log-likelihoods scored so far."""
    x = np.concatenate(nlls) if nlls else np.zeros(0)
    m, se = _mean_stderr(x)
    ppl = math.exp(m) if len(x) else float("nan")
    return PerplexityResult(ppl=ppl, ppl_stderr=ppl * se if len(x) > 1 else float("nan"), tokens=len(x), nll=m,
                            ctx=ctx, stride=stride, windows=len(wins), windows_done=done,
                            seconds=time.perf_counter() - t0, interrupted=interrupted, nlls=x,
                            window_tokens=window_tokens)


def _window_batches(wins: list[Window], ctx: int, batch_size: int | None, batch_tokens: int):
    per = batch_size or max(1, batch_tokens // ctx)
    for a in range(0, len(wins), per):
        yield wins[a:a + per]


def perplexity(lm, ids: Sequence[int], *, ctx: int | None = None, stride: int | None = None,
               batch_size: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
               progress: Callable[[int], None] | None = None, dense: bool = True) -> PerplexityResult:
    """Perplexity of `ids` under `lm` with windows of `ctx` tokens advancing by `stride` (default: ctx).
    dense: see `ModelScorer` (False: through the packed kernels generation uses).

    Ctrl-C (KeyboardInterrupt) during the run returns the windows finished so far with interrupted=True.
    """
    ctx = check_ctx(lm, ctx)
    stride = ctx if stride is None else stride
    wins = windows(len(ids), ctx, stride)
    scorer = ModelScorer(lm, batch_size=batch_size, batch_tokens=batch_tokens, dense=dense)
    ids = [int(i) for i in ids]
    nlls: list[np.ndarray] = []
    done = seen = 0
    t0 = time.perf_counter()
    try:
        for group in _window_batches(wins, ctx, batch_size, batch_tokens):
            seqs = [ids[w.begin:w.end] for w in group]
            scored = scorer.score([(s, w.first - w.begin) for s, w in zip(seqs, group)])
            nlls += [-np.asarray(s.logprobs, dtype=np.float64) for s in scored]
            done += len(group)
            seen += sum(len(s) for s in seqs)
            if progress is not None:
                progress(len(group))
    except KeyboardInterrupt:
        return result_from(nlls, ctx, stride, wins, done, t0, True, seen)
    return result_from(nlls, ctx, stride, wins, done, t0, False, seen)


# ------------------------------------------------------------------------------------------------ KL divergence
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


@dataclass
class Comparison:
    """MODEL against a BASE model on the same tokens (llama.cpp `--kl-divergence` figures).

    kld: mean ± stderr, max, min and percentiles of KL(base || model) per token (nats).
    delta_p: model's minus base's probability of the actual next token: mean ± stderr, rms, percentiles.
    same_top: fraction of positions where both models' most likely token agree (± stderr).
    ppl / ppl_base / ln_ratio / ratio / difference: the perplexities and their ratio (each ± stderr);
    correlation: of the per-token log-likelihoods.
    """

    tokens: int
    ppl: float
    ppl_base: float
    ln_ratio: tuple[float, float]
    ratio: tuple[float, float]
    difference: tuple[float, float]
    correlation: float
    kld: dict
    delta_p: dict
    same_top: tuple[float, float]
    seconds: float
    interrupted: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _percentiles(x: np.ndarray, ps) -> dict:
    return {f"p{p:g}": float(np.percentile(x, p)) for p in ps}


def comparison_stats(nll_q: np.ndarray, nll_b: np.ndarray, kld: np.ndarray, same: np.ndarray,
                     seconds: float = 0.0, interrupted: bool = False) -> Comparison:
    """The figures of `Comparison` from per-token arrays (negative log-likelihoods, KL divergences, top-1 matches)."""
    n = len(nll_q)
    if n < 2:
        raise InvalidRequestError("need at least two scored tokens to compare models", field="file")
    mq, mb = float(nll_q.mean()), float(nll_b.mean())
    ppl_q, ppl_b = math.exp(mq), math.exp(mb)
    ln_r, ln_r_se = _mean_stderr(nll_q - nll_b)
    cov = np.cov(nll_q, nll_b)  # 2x2, ddof=1
    var_mq, var_mb, cov_m = cov[0, 0] / n, cov[1, 1] / n, cov[0, 1] / n
    diff_se = math.sqrt(max(ppl_q ** 2 * var_mq + ppl_b ** 2 * var_mb - 2 * ppl_q * ppl_b * cov_m, 0.0))
    corr = float(np.corrcoef(nll_q, nll_b)[0, 1]) if n > 1 else float("nan")
    k_mean, k_se = _mean_stderr(kld)
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    dp_mean, dp_se = _mean_stderr(dp)
    p_same = float(same.mean())
    return Comparison(
        tokens=n, ppl=ppl_q, ppl_base=ppl_b, ln_ratio=(ln_r, ln_r_se),
        ratio=(math.exp(ln_r), math.exp(ln_r) * ln_r_se), difference=(ppl_q - ppl_b, diff_se), correlation=corr,
        kld={"mean": k_mean, "stderr": k_se, "max": float(kld.max()), "min": float(kld.min()),
             **_percentiles(kld, KLD_PERCENTILES)},
        delta_p={"mean": dp_mean, "stderr": dp_se, "rms": float(np.sqrt((dp ** 2).mean())), "max": float(dp.max()),
                 "min": float(dp.min()), **_percentiles(dp, DP_PERCENTILES)},
        same_top=(p_same, math.sqrt(p_same * (1 - p_same) / (n - 1))), seconds=seconds, interrupted=interrupted)


def compare(lm, base, ids: Sequence[int], *, ctx: int | None = None, stride: int | None = None,
            batch_size: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
            progress: Callable[[int], None] | None = None, dense: bool = True) -> Comparison:
    """KL divergence of `lm`'s next-token distributions from `base`'s over the same windows of `ids`.
    dense: how `lm` is scored (see `ModelScorer`; False measures the packed kernels generation uses).

    Both models must share the vocabulary. Ctrl-C returns the figures of the windows finished so far.
    """
    if int(lm.config.vocab_size) != int(base.config.vocab_size):
        raise InvalidRequestError(f"the models have different vocabularies ({lm.config.vocab_size} and "
                                  f"{base.config.vocab_size} tokens); KL divergence needs the same one",
                                  field="kl_base")
    ctx = check_ctx(lm, ctx)
    check_ctx(base, ctx)
    stride = ctx if stride is None else stride
    wins = windows(len(ids), ctx, stride)
    ids = [int(i) for i in ids]
    sq = ModelScorer(lm, batch_size=batch_size, batch_tokens=batch_tokens, dense=dense)
    sb = ModelScorer(base, batch_size=batch_size, batch_tokens=batch_tokens)
    parts: dict[str, list[np.ndarray]] = {"q": [], "b": [], "kld": [], "same": []}
    t0 = time.perf_counter()
    interrupted = False
    try:
        for group in _window_batches(wins, ctx, batch_size, batch_tokens):
            seqs = [ids[w.begin:w.end] for w in group]
            firsts = [w.first - w.begin for w in group]
            for (_, lq, tq), (_, lb, _) in zip(sq.log_probs(seqs, firsts), sb.log_probs(seqs, firsts)):
                parts["q"].append(-lq.gather(1, tq[:, None])[:, 0].double().numpy())
                parts["b"].append(-lb.gather(1, tq[:, None])[:, 0].double().numpy())
                # KL(base || model) = sum_v p_base(v) (log p_base(v) - log p_model(v)), in float64 for the sum.
                parts["kld"].append((lb.exp() * (lb - lq)).double().sum(-1).clamp_min(0).numpy())
                parts["same"].append((lq.argmax(-1) == lb.argmax(-1)).numpy())
            if progress is not None:
                progress(len(group))
    except KeyboardInterrupt:
        interrupted = True
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    return comparison_stats(cat["q"], cat["b"], cat["kld"], cat["same"].astype(np.float64),
                            time.perf_counter() - t0, interrupted)
