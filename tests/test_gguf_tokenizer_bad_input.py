"""Malformed GGUF files through the tokenizer's path (`read_gguf_metadata`, `load_tokenizer`): the same defensive
header reader as the weights loader, so every case fails fast with a named error and without allocating what the
header claims. Files are crafted byte by byte with the builders of test_gguf_bad_input.py."""
from __future__ import annotations

import os
import random
import struct
import time
import tracemalloc

import pytest

from llamaforge.errors import ModelFormatError, TokenizerError
from llamaforge.tokenizer.gguf_meta import read_gguf_metadata
from llamaforge.tokenizer.load import load_tokenizer
from test_gguf_bad_input import (ARR, BOOL, F32, HUGE, I32, STR, U8, U32, U64, gguf_bytes, gstr, kv, kv_str, kv_u32)

TOKENS = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab"]


def arr(key: str, etype: int, payload: bytes, count: int) -> bytes:
    return kv(key, ARR, struct.pack("<I", etype) + struct.pack("<Q", count) + payload)


def str_arr(key: str, items) -> bytes:
    return arr(key, STR, b"".join(gstr(s) for s in items), len(items))


def f32_arr(key: str, items) -> bytes:
    return arr(key, F32, struct.pack(f"<{len(items)}f", *items), len(items))


def i32_arr(key: str, items) -> bytes:
    return arr(key, I32, struct.pack(f"<{len(items)}i", *items), len(items))


def spm_kvs(tokens=TOKENS, scores=None, types=None, extra=()):
    """A small SentencePiece ("llama") vocabulary, valid as built (see test_baseline_vocabulary_loads)."""
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0] if scores is None else scores
    types = [2, 3, 3, 1, 1, 1, 1, 1] if types is None else types
    return [kv_str("general.architecture", "llama"), kv_str("tokenizer.ggml.model", "llama"),
            str_arr("tokenizer.ggml.tokens", tokens), f32_arr("tokenizer.ggml.scores", scores),
            i32_arr("tokenizer.ggml.token_type", types), kv_u32("tokenizer.ggml.bos_token_id", 1),
            kv_u32("tokenizer.ggml.eos_token_id", 2), *extra]


def vocab_file(kvs=None, **kw) -> bytes:
    """A tokenizer-only GGUF (no tensors), as llama.cpp's ggml-vocab-*.gguf files are."""
    return gguf_bytes(kvs=spm_kvs() if kvs is None else kvs, tensors=[], data=b"", **kw)


def _bounded(fn):
    """Run `fn`; the rejection must cost < 2 s of CPU and < 16 MiB of peak allocation."""
    tracemalloc.start()
    t0 = time.process_time()  # CPU time: a busy shared machine must not make this flaky
    try:
        return fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert time.process_time() - t0 < 2.0
        assert peak < 16 * 2**20, f"allocated {peak} bytes while rejecting the file"


def expect_rejected(tmp_path, content: bytes, match: str, name="bad.gguf"):
    """Both tokenizer entry points refuse the file: ModelFormatError from the metadata reader (with the path),
    TokenizerError from load_tokenizer, each one line, each within the CPU and memory bounds."""
    p = tmp_path / name
    p.write_bytes(content)

    def meta():
        with pytest.raises(ModelFormatError, match=match) as ei:
            read_gguf_metadata(p)
        return ei.value

    def tok():
        with pytest.raises(TokenizerError, match=match) as ei:
            load_tokenizer(p)
        return ei.value

    e1, e2 = _bounded(meta), _bounded(tok)
    assert e1.path == str(p) and "\n" not in str(e1) and "\n" not in str(e2)
    return e2


def expect_tokenizer_error(tmp_path, content: bytes, match: str):
    """A structurally valid GGUF whose vocabulary is wrong: the header reads, the tokenizer refuses it."""
    p = tmp_path / "vocab.gguf"
    p.write_bytes(content)
    read_gguf_metadata(p)

    def tok():
        with pytest.raises(TokenizerError, match=match) as ei:
            load_tokenizer(p)
        return ei.value
    assert "\n" not in str(_bounded(tok))


# ------------------------------------------------------------------------------------------- the valid baseline
def test_baseline_vocabulary_loads(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(vocab_file())
    meta = read_gguf_metadata(p)
    assert meta["tokenizer.ggml.tokens"] == TOKENS and meta["tokenizer.ggml.token_type"] == [2, 3, 3, 1, 1, 1, 1, 1]
    tok = load_tokenizer(p)
    assert tok.vocab_size == len(TOKENS) and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.decode(tok.encode("ab a")) == "ab a"


def test_the_metadata_reader_agrees_with_the_weights_reader(tmp_path, smollm2_gguf, vocab_dir):
    """One header reader: the tokenizer's view is exactly the weights loader's metadata."""
    from llamaforge.formats.gguf import read_gguf
    for path in (smollm2_gguf, vocab_dir / "ggml-vocab-llama-bpe.gguf", vocab_dir / "ggml-vocab-llama-spm.gguf"):
        assert read_gguf_metadata(path) == read_gguf(path).metadata


def test_metadata_reader_never_reads_the_tensor_table(tmp_path):
    """Tensor entries past the key/value section are not the tokenizer's business (a weights file with a bad
    tensor table still yields its vocabulary, as llama.cpp's vocab-only load does)."""
    content = gguf_bytes(kvs=spm_kvs(), tensors=[b"\xff" * 40], data=b"")
    p = tmp_path / "m.gguf"
    p.write_bytes(content)
    assert load_tokenizer(p).vocab_size == len(TOKENS)


# ------------------------------------------------------------------------------------------- header damage
def test_empty_file(tmp_path):
    expect_rejected(tmp_path, b"", "empty")


def test_every_truncation_is_rejected(tmp_path):
    full = vocab_file(alignment=1)  # no padding after the header: every byte cut is a cut into the header
    for n in range(1, 4):  # not even the magic: the content sniffer answers
        (tmp_path / "short.gguf").write_bytes(full[:n])
        with pytest.raises(TokenizerError, match="not a known tokenizer format"):
            load_tokenizer(tmp_path / "short.gguf")
    for n in range(4, len(full)):
        expect_rejected(tmp_path, full[:n], "truncated|too small|exceeds|can hold|cannot fit|needs")


@pytest.mark.parametrize("magic", [b"GGUE", b"\0\0\0\0", b"PK\3\4"])
def test_bad_magic(tmp_path, magic):
    # load_tokenizer sniffs by content: a file without the magic is "not a known tokenizer format".
    p = tmp_path / "bad.gguf"
    p.write_bytes(vocab_file(magic=magic))
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        _bounded(lambda: read_gguf_metadata(p))
    with pytest.raises(TokenizerError, match="not a known tokenizer format"):
        _bounded(lambda: load_tokenizer(p))


@pytest.mark.parametrize("version", [0, 1, 4, 2**31])
def test_unsupported_version(tmp_path, version):
    expect_rejected(tmp_path, vocab_file(version=version), "version")


def test_big_endian_file_named_as_such(tmp_path):
    content = bytearray(vocab_file())
    content[4:8] = struct.pack(">I", 3)
    expect_rejected(tmp_path, bytes(content), "big-endian")


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
@pytest.mark.parametrize("count", [HUGE, 2**64 - 1, 10_000])
def test_counts_exceeding_the_file(tmp_path, field, count):
    expect_rejected(tmp_path, vocab_file(**{field: count}), "more than the file can hold")


@pytest.mark.parametrize("length", [HUGE, 2**64 - 1, 10_000])
def test_string_lengths_exceeding_the_file(tmp_path, length):
    bad_key = struct.pack("<Q", length) + b"tokenizer.ggml.model" + struct.pack("<I", STR) + gstr("llama")
    expect_rejected(tmp_path, vocab_file(kvs=[bad_key] + spm_kvs()[2:]), "string length")
    bad_value = kv("tokenizer.ggml.model", STR, struct.pack("<Q", length) + b"llama")
    expect_rejected(tmp_path, vocab_file(kvs=[bad_value] + spm_kvs()[2:]), "string length")
    # One token of the token list claims more bytes than there are.
    items = b"".join(gstr(s) for s in TOKENS[:3]) + struct.pack("<Q", length) + b"a"
    tokens = arr("tokenizer.ggml.tokens", STR, items, len(TOKENS))
    expect_rejected(tmp_path, vocab_file(kvs=spm_kvs()[:2] + [tokens]), "string length")


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                                 "tokenizer.ggml.merges"])
@pytest.mark.parametrize("etype", [U8, U32, U64, F32, STR, BOOL])
@pytest.mark.parametrize("count", [HUGE, 2**64 - 1, 2**40])
def test_array_counts_exceeding_the_file(tmp_path, key, etype, count):
    kvs = [k for k in spm_kvs() if key.encode() not in k] + [arr(key, etype, b"\0" * 16, count)]
    expect_rejected(tmp_path, vocab_file(kvs=kvs), "array of .* (needs|cannot fit)")


def test_nested_arrays_refused(tmp_path):
    inner = struct.pack("<I", STR) + struct.pack("<Q", 1) + gstr("a")
    nested = kv("tokenizer.ggml.tokens", ARR, struct.pack("<I", ARR) + struct.pack("<Q", 1) + inner)
    expect_rejected(tmp_path, vocab_file(kvs=spm_kvs()[:2] + [nested]), "nested arrays")
    # Deep nesting costs nothing either: refused at the first level.
    deep = inner
    for _ in range(10_000):
        deep = struct.pack("<I", ARR) + struct.pack("<Q", 1) + deep
    expect_rejected(tmp_path, vocab_file(kvs=[kv("x", ARR, deep)]), "nested arrays")


def test_unknown_value_and_element_types(tmp_path):
    expect_rejected(tmp_path, vocab_file(kvs=spm_kvs() + [kv("x", 13, b"\0" * 8)]), "unknown value type id 13")
    bad = arr("tokenizer.ggml.scores", 99, b"\0" * 8, 1)
    expect_rejected(tmp_path, vocab_file(kvs=[k for k in spm_kvs() if b"scores" not in k] + [bad]),
                    "unknown array element type id 99")


def test_bad_booleans(tmp_path):
    expect_rejected(tmp_path, vocab_file(kvs=spm_kvs(extra=[kv("tokenizer.ggml.add_bos_token", BOOL, b"\2")])),
                    "boolean")
    flags = arr("tokenizer.ggml.flags", BOOL, b"\0\1\7", 3)
    expect_rejected(tmp_path, vocab_file(kvs=spm_kvs(extra=[flags])), "boolean array")


def test_duplicate_key(tmp_path):
    dup = str_arr("tokenizer.ggml.tokens", ["x"])
    expect_rejected(tmp_path, vocab_file(kvs=spm_kvs(extra=[dup])), "duplicate metadata key 'tokenizer.ggml.tokens'")


@pytest.mark.parametrize("align", [0, 3, 48])
def test_bad_alignment(tmp_path, align):
    expect_rejected(tmp_path, vocab_file(kvs=spm_kvs(extra=[kv_u32("general.alignment", align)])), "power of two")
    expect_rejected(tmp_path, vocab_file(kvs=spm_kvs(extra=[kv("general.alignment", STR, gstr("32"))])), "uint32")


def test_fifo_directory_and_missing_file(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelFormatError, match="not a regular file"):
        read_gguf_metadata(fifo)
    with pytest.raises(TokenizerError):
        load_tokenizer(fifo)
    with pytest.raises(ModelFormatError, match="directory"):
        read_gguf_metadata(tmp_path)
    with pytest.raises(ModelFormatError, match="no such file"):
        read_gguf_metadata(tmp_path / "nope.gguf")
    with pytest.raises(TokenizerError, match="no such"):
        load_tokenizer(tmp_path / "nope.gguf")


# ------------------------------------------------------------------------------------------- wrong vocabularies
@pytest.mark.parametrize("kvs,match", [
    # tokens of the wrong type: a number, an array of numbers, an empty array
    (spm_kvs()[:2] + [kv_u32("tokenizer.ggml.tokens", 5)], "must be an array"),
    (spm_kvs()[:2] + [i32_arr("tokenizer.ggml.tokens", [1, 2, 3])], "must hold strings"),
    (spm_kvs()[:2] + [str_arr("tokenizer.ggml.tokens", [])], "empty"),
    # parallel arrays of another length, or of the wrong element type
    (spm_kvs(scores=[0.0] * 3), "scores has 3 entries"),
    (spm_kvs(types=[1] * 20), "token_type has 20 entries"),
    (spm_kvs()[:3] + [str_arr("tokenizer.ggml.scores", ["x"] * len(TOKENS))], "malformed tokenizer metadata"),
    (spm_kvs(types=[1, 1, 1, 1, 1, 1, 1, 99]), "unknown token type 99"),
    # ids outside the vocabulary, a missing or unknown model kind, a duplicate token
    (spm_kvs()[:5] + [kv_u32("tokenizer.ggml.bos_token_id", 4000)], "outside the vocabulary"),
    (spm_kvs()[2:], "no tokenizer.ggml.model"),
    ([kv_str("tokenizer.ggml.model", "t5")] + spm_kvs()[2:], "unsupported tokenizer.ggml.model 't5'"),
    (spm_kvs(tokens=TOKENS[:-1] + ["a"]), "appears twice"),
    (spm_kvs(tokens=TOKENS[:-1] + [""]), "empty"),
    (spm_kvs(extra=[kv_u32("llama.vocab_size", 9)]), "vocab_size is 9"),
    # BPE without merges; a byte token that is not <0xNN>
    ([kv_str("tokenizer.ggml.model", "gpt2"), str_arr("tokenizer.ggml.tokens", TOKENS)], "merges"),
    (spm_kvs(tokens=TOKENS[:-1] + ["<0xZZ>"], types=[2, 3, 3, 1, 1, 1, 1, 6]), "0xZZ"),
])
def test_wrong_vocabularies_are_tokenizer_errors(tmp_path, kvs, match):
    expect_tokenizer_error(tmp_path, vocab_file(kvs=kvs), match)


def test_token_bytes_not_utf8_are_refused(tmp_path):
    items = b"".join(gstr(s) for s in TOKENS[:-1]) + gstr(b"\xff\xfe")
    tokens = arr("tokenizer.ggml.tokens", STR, items, len(TOKENS))
    kvs = spm_kvs()
    kvs[2] = tokens
    expect_tokenizer_error(tmp_path, vocab_file(kvs=kvs), "not valid UTF-8")


def test_random_damage_is_always_a_named_error(tmp_path):
    """Byte flips anywhere in a valid vocabulary file: the tokenizer either loads or raises TokenizerError, never
    another exception, and never takes long or allocates much (a fixed seed: the same files every run)."""
    good = vocab_file(kvs=spm_kvs(extra=[kv_str("tokenizer.chat_template", "{{ messages }}")]))
    rng = random.Random(1234)
    p = tmp_path / "fuzz.gguf"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(4, len(data))  # keep the magic: a wrong magic is just "not a tokenizer"
            data[i] = rng.choice([0, 0xFF, rng.randrange(256)])
        p.write_bytes(bytes(data))

        def attempt():
            try:
                load_tokenizer(p)
                outcomes["loaded"] += 1
            except TokenizerError as e:
                assert "\n" not in str(e)
                outcomes["refused"] += 1
        _bounded(attempt)
    assert outcomes["loaded"] and outcomes["refused"]
