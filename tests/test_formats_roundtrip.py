"""Writers and readers agree: HF safetensors <-> GGUF (F32/F16/Q8_0) <-> Meta, checked against transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_VARIANTS, make_tiny_hf
from llamaforge.errors import ModelFormatError
from llamaforge.formats.gguf import read_gguf, write_gguf
from llamaforge.formats.load import load_model as _load_model
from llamaforge.formats.meta import save_meta
from llamaforge.formats.safetensors import save_hf
from llamaforge.model.rope import permute_qk


def load_model(path, **kw):
    """float32 reference weights: an explicit dtype keeps any default in-memory quantization out of the checks."""
    kw.setdefault("dtype", torch.float32)
    return _load_model(path, **kw)


IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
# GGUF file types and the max abs logit error we accept against the float32 reference (logits are ~1 in size).
GGUF_TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(params=list(TINY_VARIANTS))
def tiny_dir(request, tmp_path):
    ref = make_tiny_hf(request.param)
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path


@pytest.mark.parametrize("file_type", list(GGUF_TOLERANCE))
def test_gguf_writer_round_trip(tiny_dir, file_type):
    ref, tmp = tiny_dir
    lm = load_model(tmp / "hf")
    out = write_gguf(tmp / f"m.{file_type}.gguf", lm.config, lm.model.state_dict(), file_type=file_type)
    back = load_model(out)
    assert back.metadata["format"] == "gguf" and back.metadata["file_type"] == file_type.upper()
    assert back.config.tie_word_embeddings == lm.config.tie_word_embeddings
    gf = read_gguf(out)
    assert ("output.weight" in gf.tensors) == (not lm.config.tie_word_embeddings)
    assert ("rope_freqs.weight" in gf.tensors) == (lm.config.rope_scaling is not None)
    diff = (logits(back.model) - logits(ref)).abs().max().item()
    assert diff <= GGUF_TOLERANCE[file_type], f"{file_type}: {diff}"
    if file_type == "q8_0":
        assert gf.tensors["blk.0.attn_q.weight"].type_name == "Q8_0"
        assert gf.tensors["blk.0.attn_norm.weight"].type_name == "F32"


def test_gguf_writer_layout_matches_llama_cpp_convention(tmp_path):
    """q/k are stored interleaved (permuted) exactly once, and transformers' own GGUF loader agrees with us.

    GQA without rope scaling: transformers' GGUF loader ignores `rope_freqs`, so scaled models cannot be compared.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)).eval()
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")
    path = write_gguf(tmp_path / "x.gguf", lm.config, lm.model.state_dict(), file_type="f32")
    gf = read_gguf(path)
    q = ref.model.layers[0].self_attn.q_proj.weight.detach()
    k = ref.model.layers[0].self_attn.k_proj.weight.detach()
    assert torch.equal(gf.dequantize("blk.0.attn_q.weight"), permute_qk(q, 4))
    assert torch.equal(gf.dequantize("blk.0.attn_k.weight"), permute_qk(k, 2))
    assert not torch.equal(permute_qk(q, 4), q)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="x.gguf", dtype=torch.float32).eval()
    assert (logits(theirs) - logits(ref)).abs().max().item() <= 1e-4


def test_meta_checkpoint_round_trip(tiny_dir):
    ref, tmp = tiny_dir
    lm = load_model(tmp / "hf")
    save_meta(tmp / "meta", lm.config, lm.model.state_dict())
    raw = torch.load(tmp / "meta" / "consolidated.00.pth", weights_only=True)
    q = ref.model.layers[1].self_attn.q_proj.weight.detach()
    assert torch.equal(raw["layers.1.attention.wq.weight"], permute_qk(q, lm.config.num_attention_heads))
    assert ("output.weight" in raw) == (not lm.config.tie_word_embeddings)
    params = json.loads((tmp / "meta" / "params.json").read_text())
    assert params["dim"] == 64 and params["n_kv_heads"] == lm.config.num_key_value_heads
    back = load_model(tmp / "meta")
    assert back.metadata["format"] == "meta"
    assert back.config == lm.config
    assert (logits(back.model) - logits(ref)).abs().max().item() <= 1e-5


def test_save_hf_loads_in_transformers(tiny_dir):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM
    ref, tmp = tiny_dir
    lm = load_model(tmp / "hf")
    out = save_hf(tmp / "out", lm.config, lm.model.state_dict(),
                  tokenizer_files={"tokenizer_config.json": '{"chat_template": "{{ messages }}"}'})
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not lm.config.tie_word_embeddings)
    theirs = LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert (logits(theirs) - logits(ref)).abs().max().item() <= 1e-5
    back = load_model(out)
    assert back.metadata["chat_template"] == "{{ messages }}"
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_save_hf_is_atomic(tmp_path, monkeypatch):
    ref = make_tiny_hf("llama2")
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")
    save_hf(tmp_path / "out", lm.config, lm.model.state_dict())
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_hf(tmp_path / "out", lm.config, {k: v * 2 for k, v in lm.model.state_dict().items()})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_sharded_safetensors_directory(tmp_path):
    ref = make_tiny_hf("llama31")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    lm = load_model(tmp_path / "hf")
    assert (logits(lm.model) - logits(ref)).abs().max().item() <= 1e-5


def test_gguf_tokenizer_metadata_copied_with_types(tmp_path, smollm2_gguf):
    src = read_gguf(smollm2_gguf)
    ref = make_tiny_hf("llama32")
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")
    out = write_gguf(tmp_path / "t.gguf", lm.config, lm.model.state_dict(), tokenizer_metadata=src.metadata,
                     value_types=src.value_types, file_type="f16")
    gf = read_gguf(out)
    tok_keys = [k for k in src.metadata if k.startswith("tokenizer.")]
    assert len(tok_keys) > 5
    for k in tok_keys:
        assert gf.metadata[k] == src.metadata[k], k
        assert gf.value_types[k] == src.value_types[k], k
    assert "general.license" not in gf.metadata  # only tokenizer.* keys are copied
    # Without explicit types, well-known keys still get llama.cpp's types.
    out2 = write_gguf(tmp_path / "t2.gguf", lm.config, lm.model.state_dict(), tokenizer_metadata=src.metadata)
    types2 = read_gguf(out2).value_types
    assert types2["tokenizer.ggml.token_type"] == ("array", "int32")
    assert types2["tokenizer.ggml.eos_token_id"] == ("uint32", None)


def test_write_gguf_accepts_tokenizer_objects(tmp_path, smollm2_gguf):
    src = read_gguf(smollm2_gguf)
    ref = make_tiny_hf("llama32", vocab_size=49152)
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")

    class Described:
        def gguf_metadata(self):
            return src.metadata

    out = write_gguf(tmp_path / "a.gguf", lm.config, lm.model.state_dict(), tokenizer=Described())
    assert read_gguf(out).metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
    with pytest.warns(UserWarning, match="no GGUF metadata"):
        out = write_gguf(tmp_path / "b.gguf", lm.config, lm.model.state_dict(), tokenizer=object())
    assert not any(k.startswith("tokenizer.") for k in read_gguf(out).metadata)


def test_write_gguf_is_atomic_and_validates_file_type(tmp_path, monkeypatch):
    ref = make_tiny_hf("llama2")
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")
    with pytest.raises(ValueError):
        write_gguf(tmp_path / "x.gguf", lm.config, lm.model.state_dict(), file_type="q3")
    sd = dict(lm.model.state_dict())
    sd["model.layers.0.bogus.weight"] = torch.zeros(2, 2)
    with pytest.raises(ModelFormatError, match="bogus"):
        write_gguf(tmp_path / "x.gguf", lm.config, sd)
    assert list(tmp_path.glob("*.gguf")) == [] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------- dequantization
def _one_tensor_gguf(path, name, data: np.ndarray, raw_dtype=None, shape=None):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    if raw_dtype is None:
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, data, raw_dtype=raw_dtype)  # shape derived from the byte shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read_gguf(path)


def test_dequantize_hand_made_blocks(tmp_path):
    """Exact values for hand-built Q8_0 and Q4_0 blocks (layouts from ggml-quants.c)."""
    from gguf import GGMLQuantizationType as Q
    d = np.float16(0.5).tobytes()
    q8 = np.arange(-16, 16, dtype=np.int8)
    block8 = np.frombuffer(d + q8.tobytes(), dtype=np.uint8)
    # Q4_0: byte j holds value j (low nibble) and value j+16 (high nibble); value = (nibble - 8) * d.
    nib = np.arange(32) % 16
    packed = (nib[:16] | (nib[16:][::-1] << 4)).astype(np.uint8)
    block4 = np.frombuffer(d + packed.tobytes(), dtype=np.uint8)
    gf = _one_tensor_gguf(tmp_path / "q8.gguf", "t", block8.reshape(1, 34), Q.Q8_0, (1, 32))
    assert gf.dequantize("t").tolist() == [(q8.astype(np.float32) * 0.5).tolist()]
    gf = _one_tensor_gguf(tmp_path / "q4.gguf", "t", block4.reshape(1, 18), Q.Q4_0, (1, 32))
    want = np.concatenate([nib[:16], nib[16:][::-1]]).astype(np.float32) - 8
    assert gf.dequantize("t").tolist() == [(want * 0.5).tolist()]


# Worst-case rounding error as a fraction of the largest |weight|: half a step (a full step where ggml clamps;
# the *_1 types span max - min, up to twice the largest |weight|).
@pytest.mark.parametrize("qtype,tol", [("Q4_0", 1 / 8), ("Q4_1", 1 / 15), ("Q5_0", 1 / 16), ("Q5_1", 1 / 31),
                                       ("Q8_0", 1 / 254), ("BF16", 1 / 256)])
def test_dequantize_quantized_weights_close_to_original(tmp_path, qtype, tol):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    data = quantize(w.numpy(), Q[qtype])
    gf = _one_tensor_gguf(tmp_path / "w.gguf", "w", data, Q[qtype], (8, 64))
    assert gf.tensors["w"].shape == (8, 64) and gf.tensors["w"].type_name == qtype
    back = gf.dequantize("w")
    assert back.shape == (8, 64)
    err = (back - w).abs().max().item()
    assert 0 < err <= tol * w.abs().max().item() * 1.01, err
    assert gf.dequantize("w", torch.bfloat16).dtype == torch.bfloat16


def test_float_types_decode_exactly(tmp_path):
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    for name, t in (("f32", w), ("f16", w.half())):
        gf = _one_tensor_gguf(tmp_path / f"{name}.gguf", "w", t.numpy())
        assert torch.equal(gf.dequantize("w"), t.float())
    from gguf import GGMLQuantizationType as Q
    b = w.bfloat16()
    raw = b.view(torch.int16).numpy().view(np.uint8).reshape(3, 16)
    gf = _one_tensor_gguf(tmp_path / "bf16.gguf", "w", raw, Q.BF16, (3, 8))
    assert torch.equal(gf.dequantize("w"), b.float())


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_tensors_routed_to_the_right_decoder(tmp_path, qtype):
    """K-quant blocks (random payload, finite scales) decode to gguf's reference numbers, right shape and order."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    from gguf.quants import dequantize
    block, size = GGML_QUANT_SIZES[Q[qtype]]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(3, 2 * size), dtype=np.uint8)
    # Overwrite every fp16 field position candidates with small finite halves so no NaN/inf appears.
    halves = raw.view(np.uint16)
    halves[:] = np.where((halves & 0x7C00) == 0x7C00, halves & 0x3FFF, halves)
    gf = _one_tensor_gguf(tmp_path / "k.gguf", "w", raw, Q[qtype], (3, 2 * block))
    got = gf.dequantize("w")
    want = torch.from_numpy(dequantize(raw, Q[qtype]))
    assert got.shape == (3, 2 * block)
    assert torch.equal(got, want)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("embed_split", [0, 1])
def test_meta_model_parallel_shards_are_merged(tmp_path, embed_split):
    """Two consolidated.*.pth shards split like Meta's Column/RowParallel layers load as one model."""
    ref = make_tiny_hf("llama2")
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")
    d = save_meta(tmp_path / "meta", lm.config, lm.model.state_dict())
    full = torch.load(d / "consolidated.00.pth", weights_only=True)
    shards = [{}, {}]
    for name, t in full.items():
        if "norm" in name:
            dim = None
        elif name == "tok_embeddings.weight":
            dim = embed_split        # Llama 2 split the width (1), Llama 3 the vocabulary (0)
        elif any(k in name for k in ("attention.wo", "feed_forward.w2")):
            dim = 1
        else:
            dim = 0
        parts = [t, t] if dim is None else list(t.chunk(2, dim=dim))
        for s, p in zip(shards, parts):
            s[name] = p.clone()
    for i, s in enumerate(shards):
        torch.save(s, d / f"consolidated.{i:02d}.pth")
    back = load_model(d)
    assert (logits(back.model) - logits(ref)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("extra", [
    dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    dict(attention_bias=True, mlp_bias=True),
    dict(head_dim=32),                      # head_dim * heads != hidden size
], ids=["linear-rope", "biases", "wide-heads"])
def test_less_common_llama_configs_round_trip(tmp_path, extra):
    """Linear RoPE scaling, q/k/v/o and MLP biases (q/k biases are permuted too), head_dim != hidden / heads."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(11)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                       **extra)).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)   # HF initialises biases to zero, which would hide a layout error
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")
    want = logits(ref)
    assert (logits(lm.model) - want).abs().max().item() <= 1e-4
    back = load_model(write_gguf(tmp_path / "m.gguf", lm.config, lm.model.state_dict(), file_type="f32"))
    assert back.config.attention_bias == lm.config.attention_bias
    assert (logits(back.model) - want).abs().max().item() <= 1e-4
    if "attention_bias" in extra:  # Meta params.json can express neither linear scaling nor a wider head_dim
        meta = load_model(save_meta(tmp_path / "meta", lm.config, lm.model.state_dict()))
        assert meta.config.attention_bias and meta.config.mlp_bias
        assert (logits(meta.model) - want).abs().max().item() <= 1e-4
