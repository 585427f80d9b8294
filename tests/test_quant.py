"""Packed weight formats (llamaforge.model.quant) against float references."""
from __future__ import annotations

import pytest
import torch

from llamaforge.errors import InvalidRequestError, ModelFormatError
from llamaforge.formats.gguf import read_gguf
from llamaforge.formats import packed as P
from llamaforge.model import quant as Q
from conftest import make_tiny_hf


def _ref_int4(q, scale, zero):
    """The kernel's convention, written out: w = (q - 8) * scale + zero per group of 32."""
    return ((q.float() - 8).unflatten(1, (-1, Q.GROUP)) * scale[..., None] + zero[..., None]).flatten(1)


def test_int4_linear_matches_float_matmul():
    torch.manual_seed(0)
    N, K = 96, 128
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scale, zero = torch.rand(N, K // 32) * 0.1 + 0.01, torch.randn(N, K // 32) * 0.1
    bias = torch.randn(N)
    lin = Q.Int4Linear(q, scale, zero, bias)
    x = torch.randn(2, 5, K)
    want = x @ _ref_int4(q, scale, zero).T + bias
    got = lin(x)
    assert got.shape == (2, 5, N) and got.dtype == torch.float32
    # bf16 inputs / scales: relative error a few 1e-3 of the output scale.
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_int4_from_float_error_is_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    q, scale, zero = Q.int4_from_float(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    err = (w - _ref_int4(q, scale, zero)).abs().unflatten(1, (-1, 32))
    assert (err <= scale[..., None] / 2 + 1e-6).all()


def test_int8_linear_and_embedding_match_float():
    torch.manual_seed(2)
    w = torch.randn(200, 64)
    q, s = Q.int8_from_float(w)
    assert ((w - q.float() * s[:, None]).abs() <= s[:, None] / 2 + 1e-6).all()
    lin, emb = Q.Int8Linear(q, s), Q.Int8Embedding(q, s)
    x = torch.randn(3, 64)
    want = x @ w.T
    assert (lin(x) - want).abs().max() <= 2e-2 * want.abs().max()
    ids = torch.tensor([[0, 5, 199]])
    assert torch.allclose(emb(ids), (q.float() * s[:, None])[ids], rtol=1e-6, atol=1e-6)


def test_gguf_q4_1_blocks_convert_exactly(smollm2_gguf):
    """Q4_1 -> (q, scale, zero) is lossless: its dequantization equals the gguf package's, bit for bit in float32."""
    gf = read_gguf(smollm2_gguf)
    name = "blk.3.ffn_down.weight"
    assert gf.tensors[name].type_name == "Q4_1"
    q, scale, zero = P.int4_from_gguf(gf, name)
    want = gf.dequantize(name, torch.float32)
    assert q.shape == want.shape
    # zero = m + 8 d rounds once in float32, hence the tiny tolerance.
    assert torch.allclose(_ref_int4(q, scale, zero), want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_gguf_q8_0_to_int8_rows(smollm2_gguf):
    gf = read_gguf(smollm2_gguf)
    q, s = P.int8_from_gguf(gf, "token_embd.weight", rows_per_chunk=1000)  # chunking must not matter
    want = gf.dequantize("token_embd.weight", torch.float32)
    assert q.shape == want.shape and q.dtype == torch.int8
    assert ((q.float() * s[:, None] - want).abs() <= s[:, None] / 2 + 1e-6).all()


def _fake_quantized(state_dict, quant):
    """The float weights the packed model should be equivalent to (quantize, then dequantize in float32)."""
    out = {}
    for k, w in state_dict.items():
        if quant == "q4" and k.endswith("_proj.weight"):
            w = _ref_int4(*Q.int4_from_float(w))
        elif quant == "int8" and k.endswith("_proj.weight") or quant in ("q4", "int8") and "embed_tokens" in k:
            q, s = Q.int8_from_float(w)
            w = q.float() * s[:, None]
        out[k] = w
    return out


@pytest.mark.parametrize("quant,tol", [("q4", 0.02), ("int8", 0.02), ("bf16", 0.03)])
def test_quantized_tiny_model_matches_its_float_equivalent(quant, tol):
    """Fusion, q/k order, tied head: the packed model equals the float model with the same rounded weights, up
    to the bfloat16 rounding of the kernels' inputs; and the KV cache path agrees with the full forward."""
    from llamaforge.config import ModelConfig
    from llamaforge.model import Llama
    hf = make_tiny_hf("llama31")
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    ref = Llama(cfg).eval()
    ref.load_state_dict(_fake_quantized(hf.state_dict(), quant), strict=False)
    ref.tie_weights()
    model = Llama(cfg).eval()
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    Q.quantize_model(model, quant)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids), model(ids).float()
        assert (got - want).abs().max() <= tol * want.abs().max(), quant
        # Prefill + one-token decode through the KV cache gives the full forward's last logits.
        cache = model.new_cache(1, 32)
        model(ids[:, :11], cache=cache, input_pos=0)
        step = model(ids[:, 11:], cache=cache, input_pos=11).float()
    assert torch.allclose(step[0, -1], got[0, -1], atol=2e-2 * got.abs().max().item())
    if quant != "none":
        assert model.model.layers[0].self_attn.qkv_proj is not None  # fused at inference
        assert not hasattr(model.model.layers[0].self_attn, "q_proj")


def test_resolve_quant_defaults_and_errors():
    assert Q.resolve_quant(None, file_type="Q4_1") == "q4"
    assert Q.resolve_quant("auto", file_type="Q8_0") == "int8"
    assert Q.resolve_quant("auto", file_type="F16") == "none"
    assert Q.resolve_quant(None, dtype=torch.float32, file_type="Q4_1") == "none"  # explicit dtype wins
    assert Q.resolve_quant("INT4") == "q4"
    with pytest.raises(InvalidRequestError) as e:
        Q.resolve_quant("q3")
    assert e.value.field == "quant"
    with pytest.raises(InvalidRequestError):
        Q.resolve_quant(4)


def test_int4_rejects_rows_not_in_groups_of_32():
    with pytest.raises(ModelFormatError, match="multiple of 32"):
        Q.int4_from_float(torch.randn(8, 40))


def _int4_layer(N=128, K=128, seed=3):
    torch.manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scale, zero = torch.rand(N, K // 32) * 0.1 + 0.01, torch.randn(N, K // 32) * 0.1
    return Q.Int4Linear(q, scale, zero), q, scale, zero


def test_dequantized_int4_weights_are_the_values_the_kernel_uses():
    """torch's packed layout is read back exactly: w = (q - 8) * scale + zero with the stored (bf16) scales."""
    lin, q, scale, zero = _int4_layer()
    assert Q.int4pack_block_rows() is not None and lin.can_dequantize()
    want = _ref_int4(q, scale.bfloat16().float(), zero.bfloat16().float())
    assert torch.equal(lin.dequantized(), want)
    bn = Q.int4pack_block_rows()
    assert torch.equal(lin.dequantized(bn, 2 * bn), want[bn:2 * bn])


def test_dense_matmuls_runs_float32_gemms_only_inside_the_block(monkeypatch):
    import threading
    lin, q, scale, zero = _int4_layer(N=256, K=256, seed=4)
    w = _ref_int4(q, scale.bfloat16().float(), zero.bfloat16().float())
    x = torch.randn(Q.DENSE_MIN_ROWS + 16, 256)
    kernel = lin(x)                                   # outside the block: the packed kernel (bf16 inputs)
    with Q.dense_matmuls():
        dense = lin(x)
        few = lin(x[:Q.DENSE_MIN_ROWS - 1])           # too few rows: still the kernel
        other = []
        t = threading.Thread(target=lambda: other.append(lin(x)))  # another thread is not in the block
        t.start(), t.join()
    assert torch.equal(few, kernel[:Q.DENSE_MIN_ROWS - 1]) and torch.equal(other[0], kernel)
    exact = x @ w.T
    assert (dense - exact).abs().max() < 1e-4 * exact.abs().max()      # float32 all the way
    assert (kernel - exact).abs().max() > (dense - exact).abs().max()  # the kernel rounds inputs to bf16
    # Tiled over output rows (small tile) gives the same numbers as one GEMM.
    monkeypatch.setattr(Q, "DENSE_TILE", Q.int4pack_block_rows() * 256)
    with Q.dense_matmuls():
        assert torch.equal(lin(x), dense)
    assert torch.equal(lin(x), kernel)
