"""The vocabularies `convert` writes, checked by llama.cpp itself (llama-cpp-python, `make peers`): a GGUF -> HF ->
GGUF round trip must tokenize llama.cpp's own test vectors to the recorded ids."""
from __future__ import annotations

import pytest

from test_convert import _vocab_model, convert

pytestmark = pytest.mark.peer


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe"])
def test_llama_cpp_tokenizes_converted_vocab(name, vocab_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    _vocab_model(vocab_dir, name, tmp_path / "v.gguf")
    assert convert(tmp_path / "v.gguf", "--to", "hf", "--out", tmp_path / "hf") == 0
    assert convert(tmp_path / "hf", "--to", "gguf", "--out", tmp_path / "back.gguf", "--type", "f16") == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "back.gguf"), vocab_only=True, verbose=False)
    inputs = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    for text, ids in zip(inputs, outputs):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == [int(x) for x in ids.split()], text
