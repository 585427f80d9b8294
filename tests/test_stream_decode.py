"""Streaming detokenization: joined deltas == decode(all ids), never a partial UTF-8 character."""
from __future__ import annotations

from functools import lru_cache

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llamaforge.tokenizer.load import load_tokenizer

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from([
    "日本語のテキスト", "🦙🚀😶‍🌫️ emoji", "  leading spaces", "\n\ttabs\n", "½ ² ٣ Ⅻ", "naïve café", "x",
])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@lru_cache(maxsize=None)
def _tok(path):
    return load_tokenizer(path)


def _stream(tok, ids, **kw):
    dec = tok.stream_decoder(**kw)
    deltas = [dec.feed(i) for i in ids]
    deltas.append(dec.flush())
    return deltas


@lru_cache(maxsize=None)
def _byte_alphabet(tok) -> frozenset[int]:
    """Bytes the vocabulary has a single-byte token for (SmolLM2 lacks e.g. 0x04 and 0xF1: llama.cpp drops
    such bytes too, see smollm2_ids.json)."""
    return frozenset(tok.token_bytes(i)[0] for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1)


def _check(tok, text):
    if tok.strip_leading_space is False:
        assume(set(text.encode("utf-8")) <= _byte_alphabet(tok))
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)  # valid text never shows a replacement character


@SETTINGS
@given(text=TEXT)
def test_stream_smollm2(smollm2_gguf, text):
    _check(_tok(smollm2_gguf), text)


@SETTINGS
@given(text=TEXT)
def test_stream_spm(vocab_dir, text):
    _check(_tok(vocab_dir / "ggml-vocab-llama-spm.gguf"), text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 31999), max_size=30), skip=st.booleans(), cont=st.booleans())
def test_stream_equals_decode_for_any_ids(vocab_dir, ids, skip, cont):
    # Arbitrary ids (stray byte tokens, control tokens): still joined deltas == decode.
    tok = _tok(vocab_dir / "ggml-vocab-llama-spm.gguf")
    kw = dict(skip_special=skip, continuation=cont)
    assert "".join(_stream(tok, ids, **kw)) == tok.decode(ids, **kw)


def test_byte_fallback_character_is_held_back(vocab_dir):
    tok = _tok(vocab_dir / "ggml-vocab-llama-spm.gguf")
    ids = tok.encode("🦙")  # no piece for it: four <0xXX> byte tokens
    assert b"".join(tok.token_bytes(i) for i in ids[-4:]) == "🦙".encode() and len(ids) >= 4
    dec = tok.stream_decoder()
    deltas = [dec.feed(i) for i in ids]
    assert deltas[-1] == "🦙" and all(d in ("", " ") for d in deltas[:-1])


def test_bytelevel_japanese_is_held_back(smollm2_gguf):
    tok = _tok(smollm2_gguf)
    ids = tok.encode("東")  # a 3-byte character spread over byte-level pieces
    assert len(ids) > 1
    dec = tok.stream_decoder()
    deltas = [dec.feed(i) for i in ids]
    assert "".join(deltas) == "東" and all(d in ("", "東") for d in deltas)


def test_spm_leading_space_consistent(vocab_dir):
    tok = _tok(vocab_dir / "ggml-vocab-llama-spm.gguf")
    ids = tok.encode("Hello world", add_special=True)  # <s> ▁Hello ▁world
    assert tok.decode(ids) == "Hello world"
    assert "".join(_stream(tok, ids)) == "Hello world"
    # Not skipping specials: the control token is shown and the first word still loses its dummy space.
    assert tok.decode(ids, skip_special=False) == "<s>Hello world" == "".join(_stream(tok, ids, skip_special=False))
    # A raw completion continues the prompt: its first "▁Paris" keeps the space, in decode and stream alike.
    paris = tok.encode("The capital is Paris")[-1:]
    assert tok.decode(paris) == "Paris"
    assert tok.decode(paris, continuation=True) == " Paris" == "".join(_stream(tok, paris, continuation=True))


def test_invalid_sequences_are_replaced_identically(smollm2_gguf):
    tok = _tok(smollm2_gguf)
    # Byte-level pieces that are lone continuation bytes / a truncated sequence at the end.
    byte_ids = [tok.encode(c)[0] for c in ("a", "b")]
    ids = tok.encode("東")[:1] + byte_ids + tok.encode("🦙")[:2]
    joined = "".join(_stream(tok, ids))
    assert joined == tok.decode(ids) and "\ufffd" in joined
