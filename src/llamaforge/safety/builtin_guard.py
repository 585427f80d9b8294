"""llamaforge's built-in guard: a classifier head over SmolLM2-135M-Instruct's hidden states.

The default model (already on every install, run by our own engine, quantized fast path) reads the text as a
user turn; the final-norm hidden states give a feature vector (mean over the turn's tokens, concatenated with
the last token's state, standardised). Logistic heads on it give P(unsafe) and, one per hazard code with enough
training examples, P(code). The head (`data/guard_head.safetensors`, ~100 KB) is trained by
scripts/train_builtin_guard.py on the train split of data/guard_prompts.jsonl; the held-out figures are in
data/README.md. Verdicts follow the same rules as Llama Guard models (`classifier.decide`).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import InvalidRequestError
from .categories import LLAMA_GUARD_3, check_codes
from .classifier import MAX_TEXT_CHARS, MAX_WINDOWS, GuardError, Verdict, decide, threshold_value
from .guard_format import conversation_turns

HEAD_PATH = Path(__file__).resolve().parent / "data" / "guard_head.safetensors"
WINDOW = 512                   # tokens of text per feature pass; longer text is windowed
OVERLAP = 32
BATCH = 16


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids the head reads: the text as a ChatML user turn, <|im_start|>user\\n ... <|im_end|>."""
    start, end = tokenizer.special_tokens["<|im_start|>"], tokenizer.special_tokens["<|im_end|>"]
    return [start] + tokenizer.encode("user\n" + text) + [end]


@torch.inference_mode()
def features(lm, texts: Sequence[str]) -> torch.Tensor:
    """[N, 2C] float32 features of `texts` (batched, right-padded; causal attention keeps padding invisible)."""
    tok = lm.tokenizer
    rows = [text_ids(tok, t)[:WINDOW + 8] for t in texts]
    dev = next(lm.model.parameters()).device
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]))  # batch similar lengths: little padding
    out: list = [None] * len(rows)
    for i in range(0, len(order), BATCH):
        idx = order[i:i + BATCH]
        n = max(len(rows[k]) for k in idx)
        x = torch.zeros(len(idx), n, dtype=torch.long, device=dev)
        for j, k in enumerate(idx):
            x[j, :len(rows[k])] = torch.tensor(rows[k])
        h = lm.model.hidden_states(x).float()               # [B, T, C]
        for j, k in enumerate(idx):
            hj = h[j, 1:len(rows[k])]
            out[k] = torch.cat([hj.mean(0), hj[-1]])
    return torch.stack(out).cpu()


class HeadGuard:
    """The built-in guard; the same `check` interface as `classifier.Guard`."""

    name = "llamaforge-guard (builtin)"

    def __init__(self, lm, head_path: Path = HEAD_PATH, *, excluded: Sequence[str] = (), threshold: float = 0.5,
                 thresholds: Mapping[str, float] | None = None):
        from safetensors.torch import load_file
        if not head_path.exists():
            raise GuardError(f"the built-in guard head is missing ({head_path}); a broken install?")
        t = load_file(str(head_path))
        self.lm = lm
        self.mu, self.sd = t["mu"].float(), t["sd"].float()
        self.w, self.b = t["weight"].float(), t["bias"].float()            # [1 + K, D], [1 + K]
        self.codes = [f"S{int(i)}" for i in t["codes"].tolist()]         # the heads after the first
        self.all_categories = LLAMA_GUARD_3
        self.excluded = check_codes(excluded, self.all_categories, "excluded")
        self.categories = tuple(c for c in self.all_categories if c.code not in self.excluded)
        self.threshold = threshold_value(threshold, "threshold")
        self.thresholds = {}
        for code, v in (thresholds or {}).items():
            check_codes([code], self.all_categories, "thresholds")
            self.thresholds[code] = threshold_value(v, f"thresholds.{code}")
        self._lock = threading.Lock()

    def _probs(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            x = (features(self.lm, texts) - self.mu) / self.sd
        return torch.sigmoid(x @ self.w.T + self.b)                        # [N, 1 + K]

    def _windows(self, text: str) -> list[str]:
        tok = self.lm.tokenizer
        ids = tok.encode(text)
        if len(ids) <= WINDOW:
            return [text]
        step = WINDOW - OVERLAP
        pieces = [ids[i:i + WINDOW] for i in range(0, len(ids) - OVERLAP, step)]
        if len(pieces) > MAX_WINDOWS:
            raise InvalidRequestError(f"text to check has {len(ids)} tokens: more than {MAX_WINDOWS} guard windows "
                                      f"of {WINDOW} tokens", field="text")
        return [tok.decode(p) for p in pieces]

    def check(self, content, *, role: str = "user") -> Verdict:
        """Judge the last `role` turn of a conversation, or one text (the head reads that turn's text)."""
        t0 = time.perf_counter()
        if isinstance(content, (bytes, bytearray)):
            raise InvalidRequestError("text must be a string (decode binary input first)", field="text")
        turns = conversation_turns(content, role)
        text = turns[-1][1]
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidRequestError(f"text to check has {len(text)} characters; the guard reads at most "
                                      f"{MAX_TEXT_CHARS}", field="text")
        windows = self._windows(text)
        p = self._probs(windows).max(dim=0).values                         # the worst window decides
        score = float(p[0])
        enabled = {c.code for c in self.categories}
        cat = {c: float(q) for c, q in zip(self.codes, p[1:].tolist()) if c in enabled}
        total = sum(cat.values()) or 1.0
        scores = {c: score * q / total for c, q in cat.items()}
        listed = [c for c, q in cat.items() if q >= 0.5] or ([max(cat, key=cat.get)] if cat else [])
        flagged = decide(score, scores, listed, self.threshold, self.thresholds, self.excluded)
        return Verdict(not flagged, flagged, score, scores, role, self.name, len(windows), time.perf_counter() - t0)
