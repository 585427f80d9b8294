"""Prompt perturbations for the robustness mode: the same task re-run with the prompt's fields changed in ways
that keep their meaning, to measure how much a model's score drops.

Each perturbation is seeded per example (same input, same output, in every run and process) and touches only the
fields the task names in `perturb` (never the choices or references):
  case        words switched at random to UPPER, lower or Title case
  typos       about one word in eight (of 4+ letters) gets a keyboard typo: swapped, dropped, doubled or
              neighbouring letter
  whitespace  extra spaces between words and a few line breaks inside the text
  distractor  an unrelated sentence placed before the text
"""
from __future__ import annotations

import random
import re
import zlib
from typing import Callable

PERTURBATIONS = ("case", "typos", "whitespace", "distractor")

_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_KEYBOARD):
    for _c, _ch in enumerate(_row):
        near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
        near += [_KEYBOARD[r][_c] for r in (_r - 1, _r + 1) if 0 <= r < len(_KEYBOARD) and _c < len(_KEYBOARD[r])]
        _NEIGHBOURS[_ch] = "".join(near)

# Written for llamaforge: true-sounding, topic-free statements that bear on no question.
DISTRACTORS = (
    "The library on the corner closes at six on Sundays.",
    "Many people prefer tea to coffee in the afternoon.",
    "A light rain fell over the hills during the night.",
    "The old bicycle in the garage still has a working bell.",
    "Some painters like to work only in the early morning.",
    "The train to the coast was ten minutes late yesterday.",
    "Fresh bread is often sold out before noon at the market.",
    "Her neighbour keeps a small collection of glass bottles.",
)

_WORD = re.compile(r"[A-Za-z]+")


def _rng(kind: str, text: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{kind}:{text}".encode("utf-8")))


def perturb_case(text: str, rng: random.Random) -> str:
    styles = (str.upper, str.lower, str.title)
    return _WORD.sub(lambda m: rng.choice(styles)(m.group(0)), text)


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    op = rng.randrange(4)
    if op == 0:                                   # swap two neighbouring letters
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:                                   # drop a letter
        return word[:i] + word[i + 1:]
    if op == 2:                                   # double a letter
        return word[:i] + word[i] + word[i:]
    ch = word[i]                                  # hit a neighbouring key
    near = _NEIGHBOURS.get(ch.lower())
    if not near:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    rep = rng.choice(near)
    return word[:i] + (rep.upper() if ch.isupper() else rep) + word[i + 1:]


def perturb_typos(text: str, rng: random.Random, rate: float = 0.125) -> str:
    def sub(m):
        w = m.group(0)
        return _typo(w, rng) if len(w) >= 4 and rng.random() < rate else w
    out = _WORD.sub(sub, text)
    if out == text:  # at least one typo, so every example is actually perturbed
        words = [m for m in _WORD.finditer(text) if len(m.group(0)) >= 4]
        if words:
            m = rng.choice(words)
            out = text[:m.start()] + _typo(m.group(0), rng) + text[m.end():]
    return out


def perturb_whitespace(text: str, rng: random.Random) -> str:
    parts = text.split(" ")
    out = parts[0]
    for p in parts[1:]:
        r = rng.random()
        sep = " " * rng.randint(2, 4) if r < 0.3 else "\n" if r < 0.35 else " "
        out += sep + p
    return out if out != text or len(parts) < 2 else parts[0] + "  " + " ".join(parts[1:])


def perturb_distractor(text: str, rng: random.Random) -> str:
    return f"{rng.choice(DISTRACTORS)} {text}"


_FUNCS: dict[str, Callable[[str, random.Random], str]] = {
    "case": perturb_case, "typos": perturb_typos, "whitespace": perturb_whitespace,
    "distractor": perturb_distractor}


def perturb(kind: str, text: str, seed: int = 0) -> str:
    """`text` with perturbation `kind` applied (deterministic for the same kind, text and seed)."""
    if kind not in _FUNCS:
        raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")
    return _FUNCS[kind](text, _rng(kind, text, seed))


def perturb_record(kind: str, record: dict, fields, seed: int = 0) -> dict:
    """A copy of `record` with the string values of `fields` perturbed (the distractor goes into the first field
    only: one unrelated sentence per prompt)."""
    out = dict(record)
    for n, f in enumerate(fields):
        v = out.get(f)
        if isinstance(v, str) and v and not (kind == "distractor" and n > 0):
            out[f] = perturb(kind, v, seed)
    return out
