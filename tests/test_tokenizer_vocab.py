"""GGUF vocabularies against llama.cpp: its own test vectors, and recorded ids for the SmolLM2 GGUF."""
from __future__ import annotations

import json
import struct
from functools import lru_cache
from pathlib import Path

import pytest

from llamaforge.errors import ModelFormatError, TokenizerError
from llamaforge.tokenizer.gguf_meta import read_gguf_metadata
from llamaforge.tokenizer.load import load_tokenizer, tokenizer_from_gguf_metadata

DATA = Path(__file__).parent / "data" / "tokenizer"


@lru_cache(maxsize=None)
def _load(path: Path):
    return load_tokenizer(path)


def _vectors(vocab_dir: Path, name: str):
    base = vocab_dir / f"ggml-vocab-{name}.gguf"
    inputs = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")
    return base, [(text, [int(x) for x in outputs[i].split()]) for i, text in enumerate(inputs)]


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "gpt-2", "starcoder", "phi-3"])
def test_llama_cpp_vocab_vectors_exact(vocab_dir, name):
    path, cases = _vectors(vocab_dir, name)
    assert len(cases) > 40
    tok = _load(path)
    mismatches = [(text, want, tok.encode(text)) for text, want in cases if tok.encode(text) != want]
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe"])
def test_vocab_vectors_round_trip(vocab_dir, name):
    path, cases = _vectors(vocab_dir, name)
    tok = _load(path)
    for text, want in cases:
        # SPM: decode drops exactly the dummy-prefix space that encode added, so the round trip is exact.
        assert tok.decode(want) == text


def test_unsupported_pre_tokenizer_is_a_clear_error(vocab_dir):
    with pytest.raises(TokenizerError, match="unsupported pre-tokenizer 'deepseek-llm'"):
        load_tokenizer(vocab_dir / "ggml-vocab-deepseek-llm.gguf")


def test_phi3_messy_token_types(vocab_dir):
    # <unk> typed control, </s> user-defined, padding typed unknown: loads as llama.cpp reads it.
    tok = _load(vocab_dir / "ggml-vocab-phi-3.gguf")
    assert tok.is_special(0) and tok.is_special(32011) and tok.special_tokens["<|end|>"] == 32007
    assert 32011 not in tok.encode("[PAD32011]") and tok.encode("<|end|>", allow_special=True) == [32007]


def test_spm_flags_follow_llama_cpp_defaults(vocab_dir):
    tok = load_tokenizer(vocab_dir / "ggml-vocab-llama-spm.gguf")
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, False)
    assert tok.encode("Hello", add_special=True) == [1, 15043]
    assert tok.special_tokens["<s>"] == 1 and tok.is_special(0)  # <unk> counts as special
    assert tok.encode("<s>") != [1] and tok.encode("<s>", allow_special=True) == [1]
    # After a special token a new fragment gets the space prefix again (llama.cpp / SentencePiece).
    assert tok.encode("<s>Hello", allow_special=True) == [1, 15043]


def test_bpe_llama3_adds_bos_by_default(vocab_dir):
    tok = _load(vocab_dir / "ggml-vocab-llama-bpe.gguf")
    assert tok.bos_id == 128000 and tok.add_bos
    assert tok.encode("Hello world", add_special=True) == [128000, 9906, 1917]
    assert tok.encode("<|eot_id|>", allow_special=True) == [128009]
    assert 128009 not in tok.encode("<|eot_id|>")


# ----------------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def test_smollm2_matches_llama_cpp_recorded_ids(smol):
    data = json.loads((DATA / "smollm2_ids.json").read_text(encoding="utf-8"))
    cases = data["cases"]
    texts = " ".join(c["text"] for c in cases)
    for needle in ("日本語", "🦙", "def fib", "    ", "1234567890", "½ ² ٣ Ⅻ"):
        assert needle in texts  # the corpus covers what the issue asks for
    bad = [(c["text"], c["ids"], smol.encode(c["text"])) for c in cases if smol.encode(c["text"]) != c["ids"]]
    assert not bad, bad[:3]
    lossy = ("\x04", "\U00040000")  # bytes without a token in this vocabulary: dropped, as llama.cpp does
    for c in cases:
        if not any(ch in c["text"] for ch in lossy):
            assert smol.decode(c["ids"]) == c["text"]


def test_smollm2_metadata(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
    assert smol.special_tokens["<|im_end|>"] == 2 and 2 in smol.stop_ids
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    # SmolLM's pre-tokenizer splits every digit, including non-ASCII numerals.
    assert [smol.decode([i]) for i in smol.encode("2024")] == ["2", "0", "2", "4"]


def test_control_text_is_plain_unless_allowed(smol):
    plain = smol.encode("<|im_start|>user<|im_end|>")
    assert not set(plain) & set(smol.special_tokens.values())
    assert smol.decode(plain) == "<|im_start|>user<|im_end|>"
    assert smol.encode("<|im_start|>user<|im_end|>", allow_special=True) == [1, 4093, 2]


def test_invalid_text_never_crashes(smol, vocab_dir):
    spm = _load(vocab_dir / "ggml-vocab-llama-spm.gguf")
    for tok in (smol, spm):
        # Lone surrogates and invalid UTF-8 bytes become U+FFFD (documented in base.Tokenizer.encode).
        assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
        assert tok.decode(tok.encode(b"x\xff\xfey")) == "x\ufffd\ufffdy"
        assert tok.encode("\ud83d\ude00") == tok.encode("\ufffd\ufffd")
    with pytest.raises(TypeError):
        smol.encode(12)


def test_out_of_range_ids_raise(smol):
    with pytest.raises(TokenizerError):
        smol.decode([49152])
    with pytest.raises(TokenizerError):
        smol.token_bytes(-1)


def test_user_defined_tokens_always_split():
    meta = _bpe_meta()
    meta["tokenizer.ggml.tokens"].append("<tool>")
    meta["tokenizer.ggml.token_type"].append(4)  # USER_DEFINED: matched even without allow_special
    tok = tokenizer_from_gguf_metadata(meta)
    tid = len(meta["tokenizer.ggml.tokens"]) - 1
    assert tid in tok.encode("a<tool>b")
    assert tok.decode(tok.encode("a<tool>b")) == "a<tool>b"


# ------------------------------------------------------------------------------------------ malformed vocab
def _bpe_meta() -> dict:
    from llamaforge.tokenizer.bytelevel import byte_to_char
    chars = [byte_to_char()[b] for b in range(256)]
    tokens = chars + ["ab", "<|end|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 257 + [3], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.eos_token_id": 257}


def _spm_meta() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "\u2581a"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -0.5], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}


def test_tiny_vocabs_work():
    bpe = tokenizer_from_gguf_metadata(_bpe_meta())
    assert bpe.encode("ab") == [256] and bpe.decode([256, 257]) == "ab"
    assert bpe.encode("<|end|>", allow_special=True) == [257] and bpe.stop_ids == {257}
    spm = tokenizer_from_gguf_metadata(_spm_meta())
    assert spm.encode("a a", add_special=True) == [1, 261, 261]
    meta = _spm_meta()
    del meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]
    assert (tokenizer_from_gguf_metadata(meta).bos_id, tokenizer_from_gguf_metadata(meta).eos_id) == (1, 2)
    assert spm.decode(spm.encode("a\u00e9")) == "a\u00e9"  # é by byte fallback


@pytest.mark.parametrize("breakage, match", [
    (lambda m: m.update({"tokenizer.ggml.merges": []}), "merges"),
    (lambda m: m.pop("tokenizer.ggml.merges"), "merges"),
    (lambda m: m.update({"tokenizer.ggml.merges": ["a zz"]}), "missing"),
    (lambda m: m.update({"tokenizer.ggml.merges": ["abc"]}), "two"),
    (lambda m: m["tokenizer.ggml.token_type"].pop(), "token_type"),
    (lambda m: m.update({"general.architecture": "llama", "llama.vocab_size": 300}), "vocab_size"),
    (lambda m: m.update({"tokenizer.ggml.eos_token_id": 9999}), "outside"),
    (lambda m: m.update({"tokenizer.ggml.pre": "klingon"}), "pre-tokenizer"),
    (lambda m: m.update({"tokenizer.ggml.model": "t5"}), "unsupported"),
    (lambda m: m.pop("tokenizer.ggml.model"), "no tokenizer"),
    (lambda m: m.update({"tokenizer.ggml.tokens": []}), "empty"),
    (lambda m: m["tokenizer.ggml.tokens"].__setitem__(256, "a\udcff"), "UTF-8"),
    (lambda m: m.update({"tokenizer.ggml.tokens": "abc"}), "array"),
])
def test_malformed_bpe_vocab(breakage, match):
    meta = _bpe_meta()
    breakage(meta)
    with pytest.raises(TokenizerError, match=match):
        tokenizer_from_gguf_metadata(meta)


@pytest.mark.parametrize("breakage, match", [
    (lambda m: m["tokenizer.ggml.tokens"].__setitem__(3, "<0xZZ>"), "<0xZZ>"),
    (lambda m: m["tokenizer.ggml.scores"].pop(), "scores"),
    (lambda m: m["tokenizer.ggml.scores"].__setitem__(7, "high"), "malformed"),
    (lambda m: m["tokenizer.ggml.token_type"].__setitem__(7, "x"), "malformed"),
    (lambda m: m.update({"tokenizer.ggml.bos_token_id": "one"}), "malformed"),
    (lambda m: m["tokenizer.ggml.tokens"].__setitem__(261, "a"), "twice"),
    (lambda m: m["tokenizer.ggml.token_type"].__setitem__(5, 9), "token type"),
])
def test_malformed_spm_vocab(breakage, match):
    meta = _spm_meta()
    breakage(meta)
    with pytest.raises(TokenizerError, match=match):
        tokenizer_from_gguf_metadata(meta)


# ---------------------------------------------------------------------------------------- GGUF metadata reader
def _gguf_bytes(kvs: list[tuple[str, int, bytes]], version=3, n_kv=None) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs) if n_kv is None else n_kv)
    for key, vtype, payload in kvs:
        k = key.encode()
        out += struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload
    return out


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def test_gguf_metadata_reader(tmp_path):
    good = _gguf_bytes([("general.name", 8, _s("x")), ("a.n", 4, struct.pack("<I", 7)),
                        ("a.arr", 9, struct.pack("<IQ", 8, 2) + _s("p") + _s("q")),
                        ("a.f", 9, struct.pack("<IQ", 6, 2) + struct.pack("<2f", 1.5, -2.0))])
    p = tmp_path / "ok.gguf"
    p.write_bytes(good)
    assert read_gguf_metadata(p) == {"general.name": "x", "a.n": 7, "a.arr": ["p", "q"], "a.f": [1.5, -2.0]}
    cases = {
        "magic": b"GGUX" + good[4:],
        "version": _gguf_bytes([], version=99),
        "truncated": good[:-3],
        "count": _gguf_bytes([], n_kv=1 << 40),
        "strlen": _gguf_bytes([("k", 8, struct.pack("<Q", 1 << 60))]),
        "arrlen": _gguf_bytes([("k", 9, struct.pack("<IQ", 8, 1 << 60))]),
        "type": _gguf_bytes([("k", 77, b"")]),
        "dup": _gguf_bytes([("k", 4, b"\0" * 4), ("k", 4, b"\0" * 4)]),
        "empty": b"",
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(data)
        with pytest.raises(ModelFormatError):
            read_gguf_metadata(bad)
        with pytest.raises(TokenizerError):
            load_tokenizer(bad)


@pytest.mark.parametrize("name", ["smollm2", "llama-spm", "llama-bpe", "llama3-tiktoken"])
def test_no_control_token_from_plain_text(name, smollm2_gguf, vocab_dir, llama3_tokenizer_model):
    path = {"smollm2": smollm2_gguf, "llama3-tiktoken": llama3_tokenizer_model}.get(name) or \
        vocab_dir / f"ggml-vocab-{name}.gguf"
    tok = _load(path)
    control = set(tok.special_tokens.values())
    everything = " ".join(tok.special_tokens) + "".join(tok.special_tokens)
    assert not set(tok.encode(everything)) & control
    assert set(tok.encode(everything, allow_special=True)) >= control - {tok.special_tokens.get("<unk>")}
