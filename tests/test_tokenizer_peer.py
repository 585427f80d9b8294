"""Live parity with llama.cpp (llama-cpp-python) on random text. Needs the compiled peer: `-m peer`."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaforge.tokenizer.load import load_tokenizer

pytestmark = pytest.mark.peer

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60) | st.lists(
    st.sampled_from(["Hello", " world", "  ", "\n", "\t", "123", "4567", "½", "²", "٣", "Ⅻ", "日本語", "🦙", "'s",
                     "'LL", "don't", "!!", "...", "<|im_end|>", "é", "\u00a0", "\u3000", "x", " x", "𝟘", "①"]),
    max_size=15).map("".join)


_PAIRS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _close_peers():
    yield
    for _, ref in _PAIRS.values():
        ref.close()  # explicit: llama.cpp's __del__ at interpreter exit prints tracebacks
    _PAIRS.clear()


def _pair(path):
    if path not in _PAIRS:
        llama_cpp = pytest.importorskip("llama_cpp")
        _PAIRS[path] = load_tokenizer(path), llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return _PAIRS[path]


def _agree(path, text):
    ours, ref = _pair(path)
    assert ours.encode(text) == ref.tokenize(text.encode("utf-8"), add_bos=False, special=False), repr(text)


SET = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SET
@given(text=TEXT)
def test_smollm2_vs_llama_cpp(smollm2_gguf, text):
    _agree(smollm2_gguf, text)


@SET
@given(text=TEXT)
def test_llama_spm_vs_llama_cpp(vocab_dir, text):
    _agree(vocab_dir / "ggml-vocab-llama-spm.gguf", text)


@SET
@given(text=TEXT)
def test_llama_bpe_vs_llama_cpp(vocab_dir, text):
    _agree(vocab_dir / "ggml-vocab-llama-bpe.gguf", text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_smollm2_special_parsing_vs_llama_cpp(smollm2_gguf, text):
    ours, ref = _pair(smollm2_gguf)
    text = text.replace("x", "<|im_start|>").replace("é", "<file_sep>")
    want = ref.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert ours.encode(text, allow_special=True) == want, repr(text)


@SET
@given(text=TEXT)
def test_phi3_vs_llama_cpp(vocab_dir, text):
    # Messy token types: </s> user-defined (always matched), padding typed unknown, <unk> typed control.
    _agree(vocab_dir / "ggml-vocab-phi-3.gguf", text.replace("x", "</s>").replace("é", "[PAD32011]"))
