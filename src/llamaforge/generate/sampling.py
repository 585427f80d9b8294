"""Sampling parameters and the per-request sampler.

A `Sampler` is a chain of logits processors (penalties first, then any caller-supplied hooks such as a future
constrained/JSON-schema decoder) followed by the token choice: greedy (temperature 0) or temperature -> top-k ->
top-p -> min-p -> a draw from a per-request `torch.Generator`. The filter order and semantics match Hugging Face
`TemperatureLogitsWarper`/`TopKLogitsWarper`/`TopPLogitsWarper`/`MinPLogitsWarper`; the penalties follow
llama.cpp (`repeat_penalty` over the last `repeat_last_n` tokens, OpenAI-style presence/frequency penalties).
"""
from __future__ import annotations

import dataclasses
import math
import operator
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch

from ..errors import InvalidRequestError

# A logits processor sees every token so far (prompt + generated) and the next-token logits [V] (float32) and
# returns the logits to use. It may modify them in place.
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]

MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 1000
MAX_TOP_LOGPROBS = 20
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_LOGIT_BIAS = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Defaults follow llama.cpp's.

    max_tokens: generate at most this many tokens (>= 1); the context window may end generation earlier.
    temperature: 0 = greedy (argmax); higher = more random. Must be finite and >= 0.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p; in (0, 1], 1 = off.
    min_p: drop tokens less likely than min_p times the most likely one; in [0, 1], 0 = off.
    repeat_penalty: divide positive / multiply negative logits of recently seen tokens by this (> 0, 1 = off).
    presence_penalty: subtract this from the logit of every recently seen token (0 = off).
    frequency_penalty: subtract this times the token's recent count (0 = off).
    repeat_last_n: how many recent tokens (prompt included) the penalties look at; 0 = none, -1 = all.
    seed: seeds the request's own random generator (same seed => same output); None or -1 = random.
    stop: strings that end generation; the stop string itself is not part of the output (tuple of str).
    stop_ids: extra token ids that end generation (the tokenizer's EOS/end-of-turn ids always do).
    logprobs: None = no top alternatives; N (0..20) = also report the N most likely tokens at each step.
    ignore_eos: keep going past the tokenizer's EOS/end-of-turn ids (stop_ids and stop still apply).
    logit_bias: ((token id, bias), ...) added to those tokens' logits before sampling (OpenAI's logit_bias;
        a bias in [-100, 100], -100 bans the token).
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        # Accept any iterable (a list from JSON, a single string) but store immutable tuples.
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop) if stop is not None else ())
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids) if self.stop_ids is not None else ())
        bias = self.logit_bias
        if isinstance(bias, Mapping):
            bias = bias.items()
        try:
            object.__setattr__(self, "logit_bias", tuple(tuple(b) for b in (bias or ())))
        except TypeError:
            raise InvalidRequestError("logit_bias must map token ids to numbers", field="logit_bias") from None

    def validate(self) -> "SamplingParams":
        """Raise `InvalidRequestError(field=...)` for any out-of-range value; return self."""
        _int(self.max_tokens, "max_tokens", lo=1, hi=MAX_TOKENS_LIMIT)
        _float(self.temperature, "temperature", lo=0.0)
        _int(self.top_k, "top_k", lo=0)
        top_p = _float(self.top_p, "top_p")
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", field="top_p")
        _float(self.min_p, "min_p", lo=0.0, hi=1.0)
        rp = _float(self.repeat_penalty, "repeat_penalty")
        if rp <= 0.0:
            raise InvalidRequestError(f"repeat_penalty must be > 0, got {self.repeat_penalty!r}",
                                      field="repeat_penalty")
        _float(self.presence_penalty, "presence_penalty")
        _float(self.frequency_penalty, "frequency_penalty")
        _int(self.repeat_last_n, "repeat_last_n", lo=-1)
        if self.seed is not None:
            _int(self.seed, "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed", field="stop")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}", field="stop")
            if len(s) > MAX_STOP_LENGTH:
                raise InvalidRequestError(f"a stop string is longer than {MAX_STOP_LENGTH} characters",
                                          field="stop")
        for i in self.stop_ids:
            _int(i, "stop_ids", lo=0)
        if self.logprobs is not None:
            _int(self.logprobs, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}", field="ignore_eos")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens", field="logit_bias")
        for pair in self.logit_bias:
            if len(pair) != 2:
                raise InvalidRequestError("logit_bias must map token ids to numbers", field="logit_bias")
            _int(pair[0], "logit_bias", lo=0)
            _float(pair[1], "logit_bias", lo=-100.0, hi=100.0)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        """Build and validate from keyword arguments; an unknown name raises InvalidRequestError(field=name)."""
        names = cls.field_names()
        for k in kwargs:
            if k not in names:
                raise InvalidRequestError(f"unknown sampling parameter {k!r}", field=k)
        return cls(**kwargs).validate()


def check_token_ids(ids: Any, vocab_size: int, field: str = "prompt") -> list[int]:
    """The one vocabulary check: a non-empty sequence of ints in [0, vocab_size) -> list, else
    InvalidRequestError naming `field`."""
    if isinstance(ids, (str, bytes, bytearray)):
        raise InvalidRequestError("token ids must be a sequence of integers", field=field)
    try:
        out = [operator.index(i) for i in ids if not isinstance(i, bool) or _not_an_id()]
    except TypeError:
        raise InvalidRequestError("token ids must be integers", field=field) from None
    if not out:
        raise InvalidRequestError("the prompt is empty", field=field)
    bad = next((i for i in out if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary (size {vocab_size})", field=field)
    return out


def _not_an_id():
    raise TypeError


def _int(v: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequestError(f"{name} must be an integer, got {v!r}", field=name)
    if lo is not None and v < lo:
        raise InvalidRequestError(f"{name} must be >= {lo}, got {v}", field=name)
    if hi is not None and v > hi:
        raise InvalidRequestError(f"{name} must be <= {hi}, got {v}", field=name)
    return v


def check_number(v: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite number in [lo, hi], else InvalidRequestError naming `name`."""
    return _float(v, name, lo, hi)


def _float(v: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {v!r}", field=name)
    f = float(v)
    if not math.isfinite(f):
        raise InvalidRequestError(f"{name} must be a finite number, got {v!r}", field=name)
    if lo is not None and f < lo:
        raise InvalidRequestError(f"{name} must be >= {lo:g}, got {v!r}", field=name)
    if hi is not None and f > hi:
        raise InvalidRequestError(f"{name} must be <= {hi:g}, got {v!r}", field=name)
    return f


# Ollama-style option names (Modelfile PARAMETER, /set parameter, `create --param`) -> SamplingParams fields.
OPTION_ALIASES = {"num_predict": "max_tokens"}
# Stored model options that set how the model is loaded or served (threads, context window), not how it samples.
LOAD_TIME_OPTIONS = frozenset({"num_thread", "num_ctx"})
_OPTION_TYPES = {
    "max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
    "repeat_penalty": float, "presence_penalty": float, "frequency_penalty": float, "repeat_last_n": int,
    "seed": int, "stop": str, "logprobs": int, "ignore_eos": bool,
}


def params_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Turn Ollama-style options ({"num_predict": "64", "temperature": "0.2", "stop": ["x"]}) into validated
    SamplingParams keyword arguments. String values (from a command line) are converted; an unknown name or a
    bad value raises InvalidRequestError naming the option. `num_predict` -1 means "no limit" (dropped).
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = OPTION_ALIASES.get(key, key)
        typ = _OPTION_TYPES.get(name)
        if typ is None:
            raise InvalidRequestError(f"unknown parameter {key!r} (known: {', '.join(sorted(_known_options()))})",
                                      field=key)
        if name == "stop":
            vals = [value] if isinstance(value, str) else list(value or [])
            out["stop"] = tuple(out.get("stop", ())) + tuple(str(s) for s in vals)
            continue
        v = _convert(value, typ, key)
        if name == "max_tokens" and v in (-1, -2):
            continue  # Ollama: -1 = infinite, -2 = fill the context; the context window bounds us anyway
        out[name] = v
    try:
        SamplingParams(**out).validate()  # defaults are valid, so any error is about an option given here
    except InvalidRequestError as e:
        user_key = next((k for k in options if OPTION_ALIASES.get(k, k) == e.field), e.field)
        raise InvalidRequestError(str(e).replace(str(e.field), str(user_key), 1), field=user_key) from None
    return out


def _known_options() -> set[str]:
    return set(_OPTION_TYPES) | set(OPTION_ALIASES)


def _convert(value: Any, typ: type, key: str) -> Any:
    if isinstance(value, str):
        s = value.strip()
        try:
            if typ is bool:
                if s.lower() in ("1", "true", "yes", "on"):
                    return True
                if s.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(s)
            if typ is int:
                return int(s)
            return float(s)
        except ValueError:
            raise InvalidRequestError(f"{key} must be {_TYPE_WORDS[typ]}, got {value!r}", field=key) from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # validate() reports wrong types with the field name


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


# ---------------------------------------------------------------------------------------------------------------
# Sampler


class Sample(NamedTuple):
    """One chosen token: its id, its log-probability under the model, and the top alternatives (id, logprob)."""

    id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None


class LogitBiasProcessor:
    """Adds fixed biases to chosen tokens' logits (OpenAI `logit_bias`)."""

    def __init__(self, bias: Sequence[tuple[int, float]]):
        self.ids = torch.tensor([i for i, _ in bias], dtype=torch.long)
        self.values = torch.tensor([float(b) for _, b in bias], dtype=torch.float32)

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self.ids] += self.values.to(logits.dtype)
        return logits


class PenaltyProcessor:
    """Repetition (llama.cpp/CTRL: divide positive, multiply negative logits), presence and frequency penalties
    (OpenAI: logit -= frequency * count + presence * [count > 0]) over the last `repeat_last_n` tokens."""

    def __init__(self, repeat_penalty: float, presence: float, frequency: float, last_n: int):
        self.repeat_penalty, self.presence, self.frequency, self.last_n = repeat_penalty, presence, frequency, last_n

    @classmethod
    def from_params(cls, p: SamplingParams) -> "PenaltyProcessor | None":
        if p.repeat_last_n == 0 or (p.repeat_penalty == 1.0 and p.presence_penalty == 0.0
                                    and p.frequency_penalty == 0.0):
            return None
        return cls(p.repeat_penalty, p.presence_penalty, p.frequency_penalty, p.repeat_last_n)

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        window = token_ids if self.last_n < 0 else token_ids[-self.last_n:]
        if not len(window):
            return logits
        ids = torch.as_tensor(list(window), dtype=torch.long, device=logits.device)
        ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
        uniq, counts = torch.unique(ids, return_counts=True)
        sel = logits[uniq]
        if self.repeat_penalty != 1.0:
            sel = torch.where(sel > 0, sel / self.repeat_penalty, sel * self.repeat_penalty)
        if self.frequency != 0.0 or self.presence != 0.0:
            sel = sel - counts.to(sel.dtype) * self.frequency - self.presence
        logits[uniq] = sel
        return logits


_NUCLEUS_PROBE = 1024  # top-p first looks for the nucleus among this many best tokens before sorting them all


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """Apply temperature, top-k, top-p and min-p to logits [V] (float32).

    Returns (candidate ids [N], their scaled logits [N]), sorted by decreasing logit when any filter is on
    (in vocabulary order when none is); the dropped tokens are gone.
    """
    scaled = logits / temperature
    V = scaled.shape[-1]
    if 0 < top_k < V:
        vals, idx = torch.topk(scaled, top_k)
        probs = torch.softmax(vals, dim=-1) if top_p < 1.0 else None
    elif top_p < 1.0:
        # The nucleus is nearly always small: find it among the best few, normalised over the whole vocabulary;
        # sort everything only when those do not reach top_p.
        vals, idx = torch.topk(scaled, min(_NUCLEUS_PROBE, V))
        probs = torch.exp(vals - torch.logsumexp(scaled, dim=-1))
        if float(probs.sum()) < top_p and V > _NUCLEUS_PROBE:
            vals, idx = torch.sort(scaled, descending=True)
            probs = torch.softmax(vals, dim=-1)
    elif min_p > 0.0:
        keep = scaled >= scaled.max() + math.log(min_p)
        vals, order = torch.sort(scaled[keep], descending=True)
        return torch.nonzero(keep)[:, 0][order], vals
    else:
        return torch.arange(V, device=scaled.device), scaled
    if top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        keep = before < top_p
        keep[0] = True
        vals, idx = vals[keep], idx[keep]
    if min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)   (renormalisation does not matter)
        keep = vals >= vals[0] + math.log(min_p)
        keep[0] = True
        vals, idx = vals[keep], idx[keep]
    return idx, vals


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


class Sampler:
    """Chooses tokens for one request. Owns its `torch.Generator`, so a seeded request's output does not depend
    on what else runs in the same batch.

    processors: extra logits processors run after the penalties (open hook list, e.g. constrained decoding).
    """

    def __init__(self, params: SamplingParams, processors: Iterable[LogitsProcessor] | None = None):
        self.params = params
        self.processors: list[LogitsProcessor] = []
        pen = PenaltyProcessor.from_params(params)
        if pen is not None:
            self.processors.append(pen)
        if params.logit_bias:
            self.processors.append(LogitBiasProcessor(params.logit_bias))
        self.processors.extend(processors or ())
        seed = params.seed
        if seed is None or seed == -1:
            seed = random_seed()
        self.seed = seed % 2**63
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor, token_ids: Sequence[int]) -> Sample:
        """Pick the next token from logits [V] given every token so far (prompt + generated)."""
        p = self.params
        raw = logits.detach().to(device="cpu", dtype=torch.float32)
        logprobs = torch.log_softmax(raw, dim=-1)  # reported logprobs are the model's, before any processing
        x = raw.clone() if self.processors else raw
        for proc in self.processors:
            x = proc(token_ids, x)
        if p.greedy:
            tok = int(torch.argmax(x))
        else:
            idx, vals = filter_logits(x, p.temperature, p.top_k, p.top_p, p.min_p)
            probs = torch.softmax(vals, dim=-1)
            if not torch.isfinite(probs).all() or probs.sum() <= 0:
                tok = int(idx[0])  # every candidate was masked to -inf by a processor: fall back to the best
            else:
                tok = int(idx[torch.multinomial(probs, 1, generator=self.generator)])
        top = None
        if p.logprobs:
            n = min(p.logprobs, logprobs.shape[-1])
            tv, ti = torch.topk(logprobs, n)
            top = [(int(i), float(v)) for i, v in zip(ti.tolist(), tv.tolist())]
        elif p.logprobs == 0:
            top = []
        return Sample(tok, float(logprobs[tok]), top)
