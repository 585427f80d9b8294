"""Our GGUF header parser against the `gguf` package's reader on real files (llama.cpp vocab files, SmolLM2)."""
from __future__ import annotations

import numpy as np
import pytest

from llamaforge.formats.gguf import gguf_to_hf_name, hf_to_gguf_name, read_gguf


def _reference(path):
    import gguf
    r = gguf.GGUFReader(str(path))
    meta, types = {}, {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
        t = field.types
        types[name] = (t[0].name.lower(), t[1].name.lower() if len(t) > 1 else None)
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type), int(t.data_offset),
                        int(t.n_bytes)) for t in r.tensors}
    return meta, types, tensors


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return np.float32(a) == np.float32(b) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# GGUFReader takes seconds per large vocabulary, so a varied few: SentencePiece (scores, bools), a small BPE
# vocabulary, and SmolLM2 (tensors of three types, merges).
REFERENCE_VOCABS = ("ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf")


def _files(vocab_dir, smollm2_gguf):
    return [vocab_dir / n for n in REFERENCE_VOCABS] + [smollm2_gguf]


def test_metadata_and_tensor_table_match_gguf_package(vocab_dir, smollm2_gguf):
    files = _files(vocab_dir, smollm2_gguf)
    for path in files:
        gf = read_gguf(path)
        meta, types, tensors = _reference(path)
        assert set(gf.metadata) == set(meta), path.name
        for k, v in meta.items():
            assert _same(gf.metadata[k], v), (path.name, k)
            assert gf.value_types[k] == types[k], (path.name, k)
        assert list(gf.tensors) == list(tensors), path.name
        for name, (shape, ttype, offset, nbytes) in tensors.items():
            info = gf.tensors[name]
            assert (info.shape, info.ggml_type, info.offset, info.nbytes) == (shape, ttype, offset, nbytes), name


def test_every_llama_cpp_vocab_file_parses(vocab_dir):
    files = sorted(vocab_dir.glob("*.gguf"))
    assert len(files) >= 5
    for path in files:
        gf = read_gguf(path)
        tokens = gf.metadata["tokenizer.ggml.tokens"]
        assert len(tokens) > 1000 and all(isinstance(t, str) for t in tokens[:100])
        assert gf.value_types["tokenizer.ggml.tokens"] == ("array", "string")


def test_smollm2_tensor_bytes_and_names(smollm2_gguf):
    gf = read_gguf(smollm2_gguf)
    assert gf.version == 3 and len(gf.tensors) == 272
    emb = gf.tensors["token_embd.weight"]
    assert emb.shape == (49152, 576) and emb.type_name == "Q8_0" and emb.nbytes == 49152 * 576 // 32 * 34
    raw = gf.raw("token_embd.weight")
    assert raw.dtype == np.uint8 and raw.shape == (emb.nbytes,) and not raw.flags.writeable
    for name in gf.tensors:
        hf = gguf_to_hf_name(name)
        assert hf is not None and hf_to_gguf_name(hf) == name
    assert "output.weight" not in gf.tensors  # SmolLM2 ties its embeddings


@pytest.mark.parametrize("gguf_name,hf_name", [
    ("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"), ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
    ("blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias"),
    ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"),
    ("blk.12.ffn_gate.weight", "model.layers.12.mlp.gate_proj.weight"),
    ("blk.12.ffn_up.weight", "model.layers.12.mlp.up_proj.weight"),
    ("blk.12.ffn_down.weight", "model.layers.12.mlp.down_proj.weight"),
    ("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
    ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
])
def test_name_table(gguf_name, hf_name):
    assert gguf_to_hf_name(gguf_name) == hf_name and hf_to_gguf_name(hf_name) == gguf_name


def test_non_weight_and_unknown_names():
    assert gguf_to_hf_name("rope_freqs.weight") is None
    with pytest.raises(KeyError):
        gguf_to_hf_name("blk.0.attn_qkv.weight")
    with pytest.raises(KeyError):
        hf_to_gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")
