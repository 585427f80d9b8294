"""The grammar engine: llguidance (chosen by measurement, bench/grammar_engines.py and bench/NOTES.md), bridged to
llamaforge's own `Tokenizer`.

- `engine_tokenizer(tok)`: llguidance's tokenizer built from our token bytes (every id), control tokens (so a
  grammar can name `<|python_tag|>`, and plain text can never produce one) and end ids (EOS + end-of-turn).
  Built once per tokenizer (~0.4 s for 49K ids).
- `compile_grammar(tok, kind, text)`: a `Grammar` for one tokenizer, cached (LRU, `CACHE_SIZE` entries, keyed by
  kind, text and tokenizer), with bounded cost: the text is at most `MAX_GRAMMAR_CHARS`, llguidance's fuel limits
  (`LIMITS`) bound the work of building and of every later step, and building runs on a small worker pool with a
  wall-clock deadline (`COMPILE_SECONDS`), so a grammar that is too big or too slow is refused in bounded time
  while the process keeps serving. Concurrent requests for the same grammar share one build.
- `Grammar.matcher()`: a fresh matcher (a copy of a pristine one) for each generated row; `Grammar.check(text)`:
  (prefix_ok, complete) for a finished text.

Grammar kinds: "lark" (llguidance's Lark dialect, `%json{...}` embeds a JSON Schema), "regex" (full match),
"json_schema" (text of the llguidance JSON options + schema, see schema.py).
"""
from __future__ import annotations

import concurrent.futures
import threading
import weakref
from collections import OrderedDict
from typing import Sequence

import llguidance

from ...errors import InvalidRequestError

MAX_GRAMMAR_CHARS = 1 << 20      # schema JSON or grammar text
COMPILE_SECONDS = 10.0           # wall-clock bound on building one grammar (waiting for a busy pool included)
CACHE_SIZE = 128                 # compiled grammars kept (all tokenizers together)
COMPILE_WORKERS = 2
# llguidance's own resource bounds (its defaults, spelled out so they are visible and testable); exceeding one
# while building refuses the grammar, while generating ends the row (see processor.py).
LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=250_000, max_grammar_size=500_000, max_items_in_row=2_000)

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


class _TokenizerView:
    """What llguidance.TokenizerWrapper reads from a tokenizer object."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        special = set(tok.special_tokens.values())
        # Control tokens carry their name (llguidance marks them as special and matches them only where a grammar
        # names them); every other id its exact output bytes.
        self.tokens = [tok.id_to_piece(i).encode("utf-8") if i in special else tok.token_bytes(i)
                       for i in range(tok.vocab_size)]
        self.special_token_ids = sorted(i for i in special if i < tok.vocab_size)

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tok.encode(text))


def engine_tokenizer(tok) -> "llguidance.LLTokenizer":
    """llguidance's tokenizer for llamaforge tokenizer `tok` (built once per tokenizer object)."""
    with _tokenizers_lock:
        hit = _tokenizers.get(tok)
        if hit is not None:
            return hit
    ends = sorted(i for i in tok.stop_ids if i < tok.vocab_size)
    if not ends:
        raise InvalidRequestError("constrained decoding needs a tokenizer with an end-of-sequence token",
                                  field="constraint")
    built = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tok)), eos_token=ends)
    with _tokenizers_lock:
        return _tokenizers.setdefault(tok, built)


class Grammar:
    """A grammar compiled for one tokenizer."""

    def __init__(self, lltok, pristine, kind: str, text: str):
        self.lltok = lltok
        self._pristine = pristine
        self.kind = kind
        self.text = text
        self._lock = threading.Lock()

    def matcher(self):
        """A fresh matcher at the start of the grammar (each generated row needs its own)."""
        with self._lock:  # deep_copy reads the pristine matcher; keep copies from racing each other
            return self._pristine.deep_copy()

    def check(self, text: str) -> tuple[bool, bool]:
        """(every byte of `text` fits the grammar, `text` is a complete match)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: no tokenizer output looks like this
            return False, False
        m = self.matcher()
        ids = self.lltok.greedy_tokenize(text)  # matching is on bytes: any tokenization of the text will do
        ok = m.try_consume_tokens(ids) == len(ids) and not m.is_error()
        return ok, ok and m.is_accepting()

    def matches(self, text: str) -> bool:
        return self.check(text)[1]


class GrammarError(Exception):
    """llguidance refused a grammar (its message); turned into InvalidRequestError by the caller."""


_cache: "OrderedDict[tuple, concurrent.futures.Future]" = OrderedDict()
_cache_lock = threading.Lock()
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=COMPILE_WORKERS, thread_name_prefix="grammar-compile")


def _build(lltok, kind: str, grammar: str, text: str) -> Grammar:
    # LLMatcher never raises for grammar errors: it enters an error state with the reason.
    m = llguidance.LLMatcher(lltok, grammar, log_level=0, limits=llguidance.LLParserLimits(**LIMITS))
    if m.is_error():
        raise GrammarError(m.get_error())
    return Grammar(lltok, m, kind, text)


def compile_grammar(tok, kind: str, grammar: str, *, text: str | None = None) -> Grammar:
    """The `Grammar` for llguidance grammar source `grammar` (see `lark_grammar`, `regex_grammar`,
    schema.py) on tokenizer `tok`, from the cache when it was built before.

    text: the caller's own text of it (schema JSON, regex, grammar) for `Grammar.text`.
    Raises GrammarError (llguidance's reason) or InvalidRequestError (too large, too slow).
    """
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(f"the {kind} is larger than the limit of {MAX_GRAMMAR_CHARS} characters",
                                  field="constraint")
    lltok = engine_tokenizer(tok)
    key = (id(lltok), kind, grammar)  # the cached Grammar keeps lltok alive, so its id cannot be reused
    with _cache_lock:
        fut = _cache.get(key)
        if fut is not None:
            _cache.move_to_end(key)
        else:
            fut = _pool.submit(_build, lltok, kind, grammar, grammar if text is None else text)
            _cache[key] = fut
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    try:
        return fut.result(timeout=COMPILE_SECONDS)
    except concurrent.futures.TimeoutError:
        # The build goes on in the background (llguidance's fuel bounds it); a later request for the same
        # grammar picks up its result.
        raise InvalidRequestError(f"the {kind} took longer than {COMPILE_SECONDS:g} s to compile; simplify it",
                                  field="constraint") from None


def cached_grammars() -> int:
    """How many grammars the cache holds (for tests and metrics)."""
    with _cache_lock:
        return len(_cache)


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def lark_grammar(text: str) -> str:
    """llguidance grammar source for a Lark grammar."""
    return llguidance.LLMatcher.grammar_from_lark(text)


def gbnf_to_lark(text: str) -> str:
    """Lark text for a GBNF grammar (llama.cpp's syntax); ValueError with the position of a syntax error."""
    from llguidance.gbnf_to_lark import any_to_lark
    try:
        return any_to_lark(text)
    except RecursionError:
        raise ValueError("the grammar is nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - the converter raises plain Exceptions for syntax errors
        raise ValueError(str(e)) from None


def regex_grammar(pattern: str) -> str:
    """llguidance grammar source for a regular expression (the whole output must match it)."""
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def special_names(tok, ids: Sequence[int]) -> list[str]:
    """Lark spellings of control tokens (`<|eot_id|>`, or `<[id]>` when the name is not Lark-safe)."""
    out = []
    for i in ids:
        name = tok.id_to_piece(i)
        out.append(name if name.startswith("<") and name.endswith(">") and " " not in name else f"<[{i}]>")
    return out
