"""The guard classifier for Llama Guard models run by llamaforge's own engine (`Guard.check`); the built-in guard
(`builtin_guard.HeadGuard`) has the same interface and the same verdict rules (`decide`). The verdict:

- `score` = the probability that the first verdict token is the first token of "unsafe" (softmax over the whole
  vocabulary at the position after the format's lead text), the number Llama Guard users threshold on;
- per category, `category_scores[c]` = score x P(the first listed code is c | "unsafe\\n"), read from one
  teacher-forced pass over the code tokens;
- the listed categories are what the model writes after "unsafe\\n" (greedy, at most 24 tokens), computed only
  when some threshold could be reached.

A category is flagged when it is listed and `score` reaches its threshold (`thresholds.get(code, threshold)`),
or when the caller gave it an explicit threshold that its own category score reaches; the text is unsafe when
some category is flagged. Per-category thresholds thus both quiet over-eager categories (S6 at 0.9) and make
others more sensitive (S11 at 0.2).

Long text is cut into windows of the guard's context (token windows with overlap) and the worst window decides.
The fixed start of the prompt (task and categories) is kept in a KV cache and reused by every check.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..errors import InvalidRequestError, LlamaforgeError
from ..tokenizer.chat import encode_parts
from .categories import CODE_RE, Category, check_codes
from .guard_format import GuardFormat, conversation_turns

MAX_TEXT_CHARS = 1 << 20        # one check reads at most 1 MiB of text
MAX_WINDOWS = 64                # ... in at most this many guard windows
DEFAULT_WINDOW = 1024           # prompt tokens per check (content is windowed to fit)
WINDOW_OVERLAP = 32             # tokens shared by neighbouring windows, so a phrase cut in two is seen whole
MAX_CODE_TOKENS = 24            # the category line after "unsafe"


class GuardError(LlamaforgeError):
    """A guard model cannot be used (not in a guard format, missing tokens) or a check failed."""


@dataclass
class Verdict:
    """A guard's judgement of one text or conversation turn."""

    safe: bool
    categories: list[str]
    score: float
    category_scores: dict[str, float] = field(default_factory=dict)
    role: str = "user"
    model: str = ""
    windows: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """{"safe", "categories", "score"} plus per-category scores, role, guard model and windows."""
        return {"safe": self.safe, "categories": list(self.categories), "score": round(self.score, 6),
                "category_scores": {k: round(v, 6) for k, v in self.category_scores.items()},
                "role": self.role, "model": self.model, "windows": self.windows}


def decide(score: float, scores: Mapping[str, float], listed: Sequence[str], threshold: float,
           thresholds: Mapping[str, float], excluded: Sequence[str]) -> list[str]:
    """The flagged codes: listed ones whose threshold the unsafe score reaches, plus codes given an explicit
    threshold that their own category score reaches (sorted S1..Sn)."""
    flagged = {c for c in listed if c not in excluded and score >= thresholds.get(c, threshold)}
    flagged |= {c for c, t in thresholds.items() if c not in excluded and scores.get(c, 0.0) >= t}
    return sorted(flagged, key=lambda c: int(c[1:]))


def threshold_value(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InvalidRequestError(f"{what} must be a number between 0 and 1, got {value!r}", field=what)
    return float(value)


class Guard:
    """A guard model ready to check text.

    lm: a `LoadedModel` whose vocabulary fits `fmt`. categories: the taxonomy (default: the format's standard
    one); excluded: codes left out of the prompt and ignored in answers; threshold: default probability of
    "unsafe" above which a listed category is flagged; thresholds: per-code overrides. window: prompt tokens per
    check (content longer than that is split into windows).
    """

    def __init__(self, lm, fmt: GuardFormat, categories: Sequence[Category], *, name: str = "",
                 excluded: Sequence[str] = (), threshold: float = 0.5,
                 thresholds: Mapping[str, float] | None = None, window: int = DEFAULT_WINDOW):
        self.lm, self.fmt, self.name = lm, fmt, name or fmt.name
        self.all_categories = tuple(categories)
        self.excluded = check_codes(excluded, self.all_categories, "excluded")
        self.categories = tuple(c for c in self.all_categories if c.code not in self.excluded)
        if not self.categories:
            raise InvalidRequestError("every category is excluded; nothing left to check", field="excluded")
        self.threshold = threshold_value(threshold, "threshold")
        self.thresholds = {}
        for code, v in (thresholds or {}).items():
            check_codes([code], self.all_categories, "thresholds")
            self.thresholds[code] = threshold_value(v, f"thresholds.{code}")
        tok = lm.tokenizer
        if tok is None:
            raise GuardError(f"guard model {self.name} has no tokenizer")
        missing = [t for t in fmt.required_tokens if t not in tok.special_tokens]
        if missing:
            raise GuardError(f"{self.name} is not a {fmt.name} model: its vocabulary lacks {', '.join(missing)}")
        self.window = max(128, min(int(window), _context(lm)))
        self._lead = tok.encode(fmt.lead) if fmt.lead else []
        self._safe_first = tok.encode(fmt.safe_word)[0]
        self._unsafe = tok.encode(fmt.unsafe_word)
        nl = tok.encode(fmt.unsafe_word + "\n")
        if not self._unsafe or nl[:len(self._unsafe)] != self._unsafe or self._unsafe[0] == self._safe_first:
            raise GuardError(f"{self.name}: the vocabulary does not tell '{fmt.safe_word}' from "
                             f"'{fmt.unsafe_word}' by their first token")
        self._unsafe_nl = nl
        self._code_paths = self._code_token_paths(tok)
        self._stop = set(tok.stop_ids) | set(tok.encode("\n")[-1:])
        self._lock = threading.Lock()
        self._cache = None
        self._cached_ids: list[int] = []
        self.overhead = len(self._encode(conversation_turns("", "user")))

    # ------------------------------------------------------------------------------------------ public
    def check(self, content: str | Sequence[dict], *, role: str = "user") -> Verdict:
        """Judge the last `role` turn ("user" or "agent") of a conversation, or one text spoken by `role`."""
        t0 = time.perf_counter()
        if isinstance(content, (bytes, bytearray)):
            raise InvalidRequestError("text must be a string (decode binary input first)", field="text")
        turns = conversation_turns(content, role)
        total = sum(len(t) for _, t in turns)
        if total > MAX_TEXT_CHARS:
            raise InvalidRequestError(f"text to check has {total} characters; the guard reads at most "
                                      f"{MAX_TEXT_CHARS}", field="text")
        windows = self._windows(turns)
        verdicts = [self._check_ids(self._encode(w), role) for w in windows]
        v = max(verdicts, key=lambda x: (not x.safe, x.score))
        if len(verdicts) > 1:
            cats = sorted({c for x in verdicts for c in x.categories}, key=lambda c: int(c[1:]))
            scores: dict[str, float] = {}
            for x in verdicts:
                for c, s in x.category_scores.items():
                    scores[c] = max(scores.get(c, 0.0), s)
            v = Verdict(not cats, cats, max(x.score for x in verdicts), scores, role, self.name)
        v.windows, v.seconds = len(windows), time.perf_counter() - t0
        return v

    def prompt_ids(self, content, role: str = "user") -> list[int]:
        """The token ids the guard reads for `content` (the first window when it needs several)."""
        return self._encode(self._windows(conversation_turns(content, role))[0])

    # ------------------------------------------------------------------------------------------ prompt
    def _encode(self, turns) -> list[int]:
        segs = encode_parts(self.lm.tokenizer, self.fmt.parts(turns, self.categories), with_mask=False)
        return [i for ids, _ in segs for i in ids] + self._lead

    def _windows(self, turns) -> list[list[tuple[str, str]]]:
        """Fit the conversation into the guard's window: earlier turns are dropped first, then the judged turn
        is cut into overlapping token windows."""
        tok = self.lm.tokenizer
        room = self.window - self.overhead - MAX_CODE_TOKENS - 16
        if room < 32:
            raise GuardError(f"{self.name}: a context of {self.window} tokens leaves no room for the text")
        lens = [len(tok.encode(t)) + 4 for _, t in turns]
        keep = len(turns) - 1
        used = lens[-1]
        while keep > 0 and used + lens[keep - 1] <= room:
            keep -= 1
            used += lens[keep]
        turns = turns[keep:]
        if turns[0][0] != "user":  # the guard's conversation starts with the user
            turns = [("user", "")] + turns
        if used <= room:
            return [turns]
        speaker, text = turns[-1]
        ids = tok.encode(text)
        step = room - WINDOW_OVERLAP
        pieces = [ids[i:i + room] for i in range(0, max(1, len(ids) - WINDOW_OVERLAP), step)]
        if len(pieces) > MAX_WINDOWS:
            raise InvalidRequestError(f"text to check has {len(ids)} tokens: more than {MAX_WINDOWS} guard windows "
                                      f"of {room} tokens", field="text")
        prefix = [("user", "")] if speaker == "agent" else []
        return [prefix + [(speaker, tok.decode(p))] for p in pieces]

    def _code_token_paths(self, tok) -> dict[str, list[int]]:
        """Each category code's tokens as the model writes them after "unsafe\\n"."""
        base = self._unsafe_nl
        out = {}
        for c in self.categories:
            ids = tok.encode(self.fmt.unsafe_word + "\n" + c.code)
            if ids[:len(base)] != base or len(ids) == len(base):
                raise GuardError(f"{self.name}: category code {c.code} does not tokenize after the verdict line")
            out[c.code] = ids[len(base):]
        return out

    # ------------------------------------------------------------------------------------------ model
    @torch.inference_mode()
    def _check_ids(self, ids: list[int], role: str) -> Verdict:
        with self._lock:
            logits = self._prefill(ids)
            probs = torch.softmax(logits.float(), dim=-1)
            score = float(probs[self._unsafe[0]])
            lowest = min([self.threshold] + list(self.thresholds.values()))
            scores: dict[str, float] = {}
            listed: list[str] = []
            if score >= lowest or score >= 0.5:
                shares = self._code_shares(len(ids))
                scores = {c: score * s for c, s in shares.items()}
                listed = self._listed_codes(len(ids))
                if not listed and shares:
                    listed = [max(shares, key=shares.get)]
        flagged = decide(score, scores, listed, self.threshold, self.thresholds, self.excluded)
        return Verdict(not flagged, flagged, score, scores, role, self.name)

    def _forward(self, ids: Sequence[int], pos: int, all_positions: bool = False) -> torch.Tensor:
        model = self.lm.model
        dev = next(model.parameters()).device
        x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        out = model(x, cache=self._cache, input_pos=pos, last_only=not all_positions)
        return out[0]

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Logits after `ids`, reusing the cached keys/values of the longest prefix shared with the last call."""
        need = len(ids) + len(self._unsafe_nl) + MAX_CODE_TOKENS + 8
        if self._cache is None or self._cache.max_seq_len < need:
            size = min(_context(self.lm), max(need, self.window + MAX_CODE_TOKENS + 16))
            if need > size:
                raise GuardError(f"{self.name}: the guard prompt needs {need} tokens, its context holds {size}")
            self._cache = self.lm.model.new_cache(1, size)
            self._cached_ids = []
        n = 0
        m = min(len(ids) - 1, len(self._cached_ids))
        while n < m and ids[n] == self._cached_ids[n]:
            n += 1
        logits = None
        for start in range(n, len(ids), 256):
            logits = self._forward(ids[start:start + 256], start)[-1]
        self._cached_ids = list(ids)
        return logits

    def _code_shares(self, pos: int) -> dict[str, float]:
        """P(first listed code = c | "unsafe\\n"), normalised over the enabled codes; teacher-forced along the
        code tokens (one pass per distinct path through the codes' token tree)."""
        head = self._unsafe_nl
        # Distribution after each distinct token prefix of the codes.
        dists: dict[tuple, torch.Tensor] = {}
        for path in sorted(self._code_paths.values(), key=len, reverse=True):
            if tuple(path[:-1]) in dists:
                continue
            seq = head + path[:-1]
            lp = torch.log_softmax(self._forward(seq, pos, all_positions=True).float(), dim=-1)
            for k in range(len(path)):
                dists.setdefault(tuple(path[:k]), lp[len(head) - 1 + k])
        self._cached_ids = self._cached_ids[:pos]  # positions past the prompt were overwritten
        raw = {}
        for code, path in self._code_paths.items():
            lp = sum(float(dists[tuple(path[:k])][t]) for k, t in enumerate(path))
            raw[code] = lp
        m = max(raw.values())
        weights = {c: pow(2.718281828459045, v - m) for c, v in raw.items()}
        total = sum(weights.values())
        return {c: w / total for c, w in weights.items()}

    def _listed_codes(self, pos: int) -> list[str]:
        """The codes the model writes after "unsafe\\n" (greedy)."""
        head = self._unsafe_nl
        logits = self._forward(head, pos)[-1]
        out: list[int] = []
        p = pos + len(head)
        for _ in range(MAX_CODE_TOKENS):
            t = int(torch.argmax(logits))
            if t in self._stop:
                break
            out.append(t)
            logits = self._forward([t], p)[-1]
            p += 1
        self._cached_ids = self._cached_ids[:pos]
        text = self.lm.tokenizer.decode(out)
        enabled = {c.code for c in self.categories}
        codes = []
        for m in CODE_RE.finditer(text):
            if m.group(0) in enabled and m.group(0) not in codes:
                codes.append(m.group(0))
        return codes


def _context(lm) -> int:
    return int(getattr(lm.config, "max_position_embeddings", 0) or 2048)
