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
