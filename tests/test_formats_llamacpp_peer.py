"""Our GGUF writer checked by the real peer: llama.cpp (llama-cpp-python) runs the files we write and gives the
logits we compute, including Llama 3.1-style `rope_freqs` and tied embeddings. Needs `make peers`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_VARIANTS, make_tiny_hf
from llamaforge.formats.gguf import read_gguf, write_gguf
from llamaforge.formats.load import load_model

pytestmark = pytest.mark.peer
PROMPT = [1, 4093, 198, 36971, 281, 253, 1443, 8545, 1701, 260, 6376, 314, 4461, 981, 260, 1194, 284, 2382, 418,
          21822, 28, 284, 732, 13739, 43464, 24484, 553, 288, 536, 351, 357, 30]


# Measured: ~1.7e-4 / 3e-4 / 7e-3 (llama.cpp quantizes activations to 8 bits for Q8_0 matmuls; logits ~1).
@pytest.mark.parametrize("file_type,tol", [("f32", 5e-4), ("f16", 1e-3), ("q8_0", 2e-2)])
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_llama_cpp_runs_our_gguf(tmp_path, smollm2_gguf, variant, file_type, tol):
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = make_tiny_hf(variant, vocab_size=49152)  # SmolLM2's vocabulary, so its tokenizer metadata fits
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf", dtype=torch.float32)
    src = read_gguf(smollm2_gguf)
    path = write_gguf(tmp_path / "m.gguf", lm.config, lm.model.state_dict(), tokenizer_metadata=src.metadata,
                      value_types=src.value_types, file_type=file_type)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    theirs = np.array(llm.scores[:len(PROMPT)], dtype=np.float32)
    mine = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        ours = mine.model(torch.tensor([PROMPT]))[0].numpy()
        want = ref(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= tol, np.abs(ours - theirs).max()
    if file_type == "f32":
        assert np.abs(ours - want).max() <= 1e-4


@pytest.fixture(scope="module")
def f32_gguf_256(tmp_path_factory, smollm2_gguf):
    """A random Llama with 256-wide rows (K-quant super-blocks are 256) as F32 GGUF, plus its HF reference."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("kq")
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)).eval()
    ref.save_pretrained(d / "hf")
    lm = load_model(d / "hf", dtype=torch.float32)
    src = read_gguf(smollm2_gguf)
    path = write_gguf(d / "f32.gguf", lm.config, lm.model.state_dict(), tokenizer_metadata=src.metadata,
                      value_types=src.value_types, file_type="f32")
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0].numpy()
    return path, want


# llama.cpp file types (LlamaFileType) and the ggml tensor types each one produces for this model.
LLAMA_CPP_FTYPES = {2: {"Q4_0"}, 3: {"Q4_1"}, 8: {"Q5_0"}, 9: {"Q5_1"}, 10: {"Q2_K", "Q3_K"},
                    12: {"Q3_K", "Q4_K", "Q5_K"}, 15: {"Q4_K"}, 17: {"Q5_K"}, 18: {"Q6_K"}}


@pytest.mark.parametrize("ftype", list(LLAMA_CPP_FTYPES))
def test_files_quantized_by_llama_cpp_dequantize_like_llama_cpp(f32_gguf_256, ftype):
    """llama.cpp's own quantizer writes every block type; our dequantized model must compute what llama.cpp does.

    Measured: ours vs llama.cpp ~0.02-0.027 (llama.cpp rounds activations to 8 bits), while the quantization error
    itself (ours vs float32) is 0.08 (Q6_K) to 0.9 (Q2_K): a wrong decoder would be off by at least that much.
    """
    import ctypes
    llama_cpp = pytest.importorskip("llama_cpp")
    src, want = f32_gguf_256
    out = src.parent / f"ftype{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    types = {t.type_name for t in read_gguf(out).tensors.values()}
    assert LLAMA_CPP_FTYPES[ftype] <= types
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    theirs = np.array(llm.scores[:len(PROMPT)], dtype=np.float32)
    with torch.no_grad():
        ours = load_model(out, dtype=torch.float32).model(torch.tensor([PROMPT]))[0].numpy()
    assert np.abs(ours - theirs).max() <= 0.05
    assert np.abs(ours - want).max() > 0.05  # the weights really are quantized
