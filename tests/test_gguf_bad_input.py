"""Malformed GGUF files, each crafted here byte by byte: every one must raise ModelFormatError fast, without
allocating what the header claims (cases after llama.cpp tests/test-gguf.cpp and GUIDE section 3 "Files")."""
from __future__ import annotations

import struct
import time
import tracemalloc

import pytest
import torch

from llamaforge.errors import ModelFormatError
from llamaforge.formats.gguf import read_gguf
from llamaforge.formats.load import load_model as _load_model


def load_model(path, **kw):
    """float32 reference weights: an explicit dtype keeps any default in-memory quantization out of the checks."""
    kw.setdefault("dtype", torch.float32)
    return _load_model(path, **kw)


U8, I32, U32, F32, BOOL, STR, ARR, U64 = 0, 5, 4, 6, 7, 8, 9, 10
HUGE = 2**60


def gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_str(key, value) -> bytes:
    return kv(key, STR, gstr(value))


def kv_u32(key, value) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def tensor_info(name, dims, ttype=0, offset=0) -> bytes:
    return (gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<I", ttype) + struct.pack("<Q", offset))


def gguf_bytes(kvs=None, tensors=None, data=None, *, version=3, n_tensors=None, n_kv=None, alignment=32,
               magic=b"GGUF") -> bytes:
    """A GGUF file: by default one key and one 2x4 F32 tensor, valid (see test_baseline_is_valid)."""
    kvs = [kv_str("general.architecture", "llama")] if kvs is None else kvs
    tensors = [tensor_info("token_embd.weight", [4, 2])] if tensors is None else tensors
    data = bytes(range(32)) if data is None else data
    head = (magic + struct.pack("<I", version) + struct.pack("<Q", len(tensors) if n_tensors is None else n_tensors)
            + struct.pack("<Q", len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors))
    return head + b"\0" * ((-len(head)) % alignment) + data


def expect_error(tmp_path, content: bytes, match: str, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(content)
    tracemalloc.start()
    t0 = time.process_time()  # CPU time: a busy shared machine must not make this flaky
    try:
        with pytest.raises(ModelFormatError, match=match) as ei:
            read_gguf(p)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.process_time() - t0 < 2.0
    assert peak < 16 * 2**20, f"allocated {peak} bytes while rejecting the file"
    assert ei.value.path == str(p) and "\n" not in str(ei.value)
    return ei.value


def test_baseline_is_valid(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf_bytes())
    gf = read_gguf(p)
    assert gf.version == 3 and gf.metadata == {"general.architecture": "llama"}
    info = gf.tensors["token_embd.weight"]
    assert info.shape == (2, 4) and info.nbytes == 32 and info.offset == gf.data_offset
    assert bytes(gf.raw("token_embd.weight")) == bytes(range(32))


def test_empty_file(tmp_path):
    expect_error(tmp_path, b"", "empty")


def test_every_truncation_is_rejected(tmp_path):
    full = gguf_bytes()
    for n in range(1, len(full)):
        expect_error(tmp_path, full[:n], "truncated|too small|past the end|can hold|exceeds")


@pytest.mark.parametrize("magic", [b"GGUE", b"FUGG", b"\0\0\0\0", b"PK\3\4"])
def test_bad_magic(tmp_path, magic):
    expect_error(tmp_path, gguf_bytes(magic=magic), "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 2**31])
def test_unsupported_version(tmp_path, version):
    expect_error(tmp_path, gguf_bytes(version=version), "version")


def test_big_endian_file_named_as_such(tmp_path):
    content = bytearray(gguf_bytes())
    content[4:8] = struct.pack(">I", 3)
    expect_error(tmp_path, bytes(content), "big-endian")


def test_fifo_is_refused_without_blocking(tmp_path):
    import os
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelFormatError, match="not a regular file"):
        read_gguf(fifo)
    with pytest.raises(ModelFormatError):
        load_model(fifo)


def test_version_2_is_accepted(tmp_path):
    p = tmp_path / "v2.gguf"
    p.write_bytes(gguf_bytes(version=2))
    assert read_gguf(p).version == 2


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
@pytest.mark.parametrize("count", [HUGE, 2**64 - 1, 1000])
def test_counts_exceeding_the_file(tmp_path, field, count):
    expect_error(tmp_path, gguf_bytes(**{field: count}), "more than the file can hold|truncated")


@pytest.mark.parametrize("length", [HUGE, 2**64 - 1, 10_000])
def test_string_length_exceeding_the_file(tmp_path, length):
    bad_key = struct.pack("<Q", length) + b"general.architecture" + struct.pack("<I", STR) + gstr("llama")
    expect_error(tmp_path, gguf_bytes(kvs=[bad_key]), "string length")
    bad_value = kv("general.name", STR, struct.pack("<Q", length) + b"abc")
    expect_error(tmp_path, gguf_bytes(kvs=[bad_value]), "string length")
    bad_name = struct.pack("<Q", length) + b"token_embd.weight" + tensor_info("", [4, 2])[8:]
    expect_error(tmp_path, gguf_bytes(tensors=[bad_name]), "string length")


@pytest.mark.parametrize("etype", [U8, U32, U64, STR, BOOL])
@pytest.mark.parametrize("count", [HUGE, 2**64 - 1, 2**40])
def test_array_length_exceeding_the_file(tmp_path, etype, count):
    arr = kv("tokenizer.ggml.tokens", ARR, struct.pack("<I", etype) + struct.pack("<Q", count) + b"\0" * 16)
    expect_error(tmp_path, gguf_bytes(kvs=[kv_str("general.architecture", "llama"), arr]),
                 "array of .* (needs|cannot fit)")


def test_nested_array_refused(tmp_path):
    inner = struct.pack("<I", U8) + struct.pack("<Q", 1) + b"\1"
    arr = kv("x", ARR, struct.pack("<I", ARR) + struct.pack("<Q", 1) + inner)
    expect_error(tmp_path, gguf_bytes(kvs=[arr]), "nested arrays")


def test_unknown_value_type(tmp_path):
    expect_error(tmp_path, gguf_bytes(kvs=[kv("x", 13, b"\0" * 8)]), "unknown value type id 13")
    arr = kv("x", ARR, struct.pack("<I", 99) + struct.pack("<Q", 1) + b"\0" * 8)
    expect_error(tmp_path, gguf_bytes(kvs=[arr]), "unknown array element type id 99")


def test_bad_bool(tmp_path):
    expect_error(tmp_path, gguf_bytes(kvs=[kv("tokenizer.ggml.add_bos_token", BOOL, b"\2")]), "boolean")


def test_duplicate_key(tmp_path):
    kvs = [kv_str("general.architecture", "llama"), kv_str("general.architecture", "llama")]
    expect_error(tmp_path, gguf_bytes(kvs=kvs), "duplicate metadata key 'general.architecture'")


def test_duplicate_tensor_name(tmp_path):
    tensors = [tensor_info("token_embd.weight", [4, 2]), tensor_info("token_embd.weight", [4, 2], offset=32)]
    expect_error(tmp_path, gguf_bytes(tensors=tensors, data=bytes(64)), "duplicate tensor name 'token_embd.weight'")


@pytest.mark.parametrize("dims,match", [
    ([4, 2, 1, 1, 1], "5 dimensions"),
    ([2**31, 2**31], "past the end"),               # 2^62 elements: bytes claimed far beyond the file
    ([2**62, 2**62], "overflow"),                   # element count overflows 64 bits
    ([2**63, 2], "overflow"),
    ([4, 0], "zero dimension"),
    ([2**60], "past the end"),
])
def test_bad_dimensions(tmp_path, dims, match):
    expect_error(tmp_path, gguf_bytes(tensors=[tensor_info("token_embd.weight", dims)]), match)


def test_dimension_count_huge(tmp_path):
    bad = gstr("token_embd.weight") + struct.pack("<I", 2**31) + struct.pack("<Q", 4)
    expect_error(tmp_path, gguf_bytes(tensors=[bad]), "dimensions")


@pytest.mark.parametrize("align,match", [(3, "power of two"), (0, "power of two"), (48, "power of two")])
def test_bad_alignment_value(tmp_path, align, match):
    kvs = [kv_str("general.architecture", "llama"), kv_u32("general.alignment", align)]
    expect_error(tmp_path, gguf_bytes(kvs=kvs), match)


def test_alignment_of_wrong_type(tmp_path):
    kvs = [kv_str("general.architecture", "llama"), kv("general.alignment", STR, gstr("32"))]
    expect_error(tmp_path, gguf_bytes(kvs=kvs), "uint32")


def test_misaligned_tensor_offset(tmp_path):
    tensors = [tensor_info("token_embd.weight", [4, 2], offset=4)]
    expect_error(tmp_path, gguf_bytes(tensors=tensors, data=bytes(64)), "not a multiple of the alignment")


def test_custom_alignment_is_honoured(tmp_path):
    kvs = [kv_str("general.architecture", "llama"), kv_u32("general.alignment", 64)]
    p = tmp_path / "a64.gguf"
    p.write_bytes(gguf_bytes(kvs=kvs, alignment=64))
    gf = read_gguf(p)
    assert gf.alignment == 64 and gf.data_offset % 64 == 0
    assert bytes(gf.raw("token_embd.weight")) == bytes(range(32))


@pytest.mark.parametrize("offset", [32, 2**40, 2**64 - 32])
def test_offset_past_end(tmp_path, offset):
    expect_error(tmp_path, gguf_bytes(tensors=[tensor_info("token_embd.weight", [4, 2], offset=offset)]),
                 "past the end")


def test_data_shorter_than_tensor(tmp_path):
    expect_error(tmp_path, gguf_bytes(data=bytes(31)), "past the end")


def test_overlapping_tensors(tmp_path):
    tensors = [tensor_info("token_embd.weight", [4, 2]), tensor_info("output_norm.weight", [8], offset=0)]
    expect_error(tmp_path, gguf_bytes(tensors=tensors), "overlap")


@pytest.mark.parametrize("ttype,match", [(99, "unknown or unsupported type id 99"), (2**32 - 1, "unknown"),
                                         (16, "IQ2_XXS"), (9, "Q8_1")])
def test_unknown_or_unsupported_tensor_type(tmp_path, ttype, match):
    expect_error(tmp_path, gguf_bytes(tensors=[tensor_info("token_embd.weight", [256, 2], ttype=ttype)],
                                      data=bytes(4096)), match)


def test_quantized_row_not_multiple_of_block(tmp_path):
    expect_error(tmp_path, gguf_bytes(tensors=[tensor_info("token_embd.weight", [48, 2], ttype=2)],
                                      data=bytes(4096)), "multiple of the Q4_0 block size 32")


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="directory"):
        read_gguf(tmp_path)
    with pytest.raises(ModelFormatError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")


# ------------------------------------------------------------------------------- structurally valid, wrong model
def _tiny_gguf(tmp_path, mutate):
    from conftest import make_tiny_hf
    from llamaforge.formats.gguf import write_gguf
    ref = make_tiny_hf("llama2")
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")
    sd = dict(lm.model.state_dict())
    mutate(sd)
    return write_gguf(tmp_path / "m.gguf", lm.config, sd, file_type="f32")


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    import torch

    def mutate(sd):
        sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(150, 64)
    path = _tiny_gguf(tmp_path, mutate)
    with pytest.raises(ModelFormatError) as ei:
        load_model(path)
    msg = str(ei.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "[150, 64]" in msg and "[160, 64]" in msg


@pytest.mark.parametrize("quant", ["q4", "int8"])
def test_wrong_shape_in_packed_load_names_the_file(tmp_path, quant):
    def mutate(sd):
        sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(150, 64)
    path = _tiny_gguf(tmp_path, mutate)
    with pytest.raises(ModelFormatError, match=r"up_proj.weight' has shape \[150, 64\], expected \[160, 64\]") as ei:
        _load_model(path, quant=quant)
    assert ei.value.path == str(path)


def test_missing_tensor(tmp_path):
    path = _tiny_gguf(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelFormatError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'.*\[160, 64\]"):
        load_model(path)


def test_missing_architecture_metadata(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(gguf_bytes(kvs=[kv_str("general.name", "x")]))
    with pytest.raises(ModelFormatError, match="general.architecture"):
        load_model(p)


def test_unexpected_tensor_name(tmp_path):
    import gguf as gg
    import numpy as np
    p = tmp_path / "x.gguf"
    w = gg.GGUFWriter(str(p), "llama")
    for k, v in (("context_length", 64), ("embedding_length", 8), ("block_count", 1), ("feed_forward_length", 16),
                 ("attention.head_count", 2)):
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    w.add_tensor("blk.0.attn_qkv.weight", np.zeros((24, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="unexpected tensor 'blk.0.attn_qkv.weight'"):
        load_model(p)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(p)
    with pytest.raises(ModelFormatError, match="not a model directory"):
        load_model(tmp_path)
