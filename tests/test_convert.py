"""`llamaforge convert`: HF <-> GGUF round trips give the same logits (checked against transformers), the
tokenizer travels with the weights (checked against llama.cpp's tokenizer test vectors), bad options fail cleanly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamaforge.cli.main import main
from llamaforge.formats.gguf import file_type_name, read_gguf
from llamaforge.formats.load import load_model

from conftest import make_tiny_hf
from test_store import tiny_gguf

IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 7, 128, 64, 5, 200]])


def convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


@pytest.mark.parametrize("variant", ["llama2", "llama31", "llama32"])
def test_hf_gguf_hf_round_trip_f32_logits_equal(variant, tmp_path, capsys):
    ref = make_tiny_hf(variant)
    ref.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want = ref(IDS).logits
    assert convert(tmp_path / "hf", "--to", "gguf", "--out", tmp_path / "m.gguf", "--type", "f32") == 0
    assert convert(tmp_path / "m.gguf", "--to", "hf", "--out", tmp_path / "back", "--type", "f32") == 0
    assert f"wrote {tmp_path / 'back'}" in capsys.readouterr().out
    assert file_type_name(read_gguf(tmp_path / "m.gguf")) == "F32"
    with torch.no_grad():
        for p in (tmp_path / "m.gguf", tmp_path / "back"):
            torch.testing.assert_close(load_model(p).model(IDS), want, atol=1e-5, rtol=1e-5)
        # The HF directory we wrote is a real one: transformers itself loads it and agrees (rope scaling
        # recovered from the GGUF's rope_freqs factors included).
        from transformers import LlamaForCausalLM
        back = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
        torch.testing.assert_close(back(IDS).logits, want, atol=1e-5, rtol=1e-5)


def test_f16_and_q8_0_are_close_and_typed(tmp_path):
    ref = make_tiny_hf("llama31")
    ref.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want = ref(IDS).logits
    for t, tol in (("f16", 2e-2), ("q8_0", 6e-2)):
        out = tmp_path / f"m-{t}.gguf"
        assert convert(tmp_path / "hf", "--to", "gguf", "--out", out, "--type", t) == 0
        assert file_type_name(read_gguf(out)) == t.upper()
        with torch.no_grad():
            got = load_model(out).model(IDS)
        err = (got - want).abs().max().item()
        assert 0 < err < tol, (t, err)
    assert convert(tmp_path / "hf", "--to", "hf", "--out", tmp_path / "h16", "--type", "f16") == 0
    st = (tmp_path / "h16" / "config.json").read_text()
    assert '"torch_dtype": "float16"' in st


def test_convert_by_store_name(tmp_path):
    from llamaforge.store import Store
    src = tiny_gguf(tmp_path / "t.gguf")
    Store().pull(src, "tiny")
    assert convert("tiny", "--to", "hf", "--out", tmp_path / "out", "--type", "f32") == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "out").model(IDS), load_model(src).model(IDS))


@pytest.mark.parametrize("argv, needle", [
    (["tiny-missing", "--to", "hf", "--out", "{o}"], "llamaforge list"),
    (["{src}", "--to", "hf", "--out", "{o}", "--type", "q8_0"], "not available for --to hf"),
    (["{src}", "--to", "gguf", "--out", "{src}"], "already exists"),
])
def test_convert_errors(argv, needle, tmp_path, capsys):
    src = tiny_gguf(tmp_path / "t.gguf")
    argv = [a.format(src=src, o=tmp_path / "o") for a in argv]
    assert convert(*argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _vocab_model(vocab_dir: Path, name: str, out: Path) -> dict:
    """A tiny random model carrying a real llama.cpp test vocabulary; returns its tokenizer metadata."""
    from llamaforge.config import ModelConfig
    from llamaforge.formats.gguf_write import write_gguf
    vf = read_gguf(vocab_dir / f"ggml-vocab-{name}.gguf")
    tok = {k: v for k, v in vf.metadata.items() if k.startswith("tokenizer.")}
    m = make_tiny_hf("llama32", vocab_size=len(tok["tokenizer.ggml.tokens"]))
    write_gguf(out, ModelConfig.from_hf_config(m.config.to_dict()), m.state_dict(), tokenizer_metadata=tok,
               value_types=vf.value_types, file_type="f16")
    return tok


def _check_vectors(vocab_dir: Path, name: str, gguf_path: Path) -> None:
    from llamaforge.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata
    tok = tokenizer_from_gguf_metadata(read_gguf(gguf_path).metadata)
    inputs = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) > 40
    for text, ids in zip(inputs, outputs):
        assert tok.encode(text) == [int(x) for x in ids.split()], text


def _tokenizer_round_trip(vocab_dir: Path, name: str, tmp_path: Path):
    orig = _vocab_model(vocab_dir, name, tmp_path / "v.gguf")
    assert convert(tmp_path / "v.gguf", "--to", "hf", "--out", tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert convert(tmp_path / "hf", "--to", "gguf", "--out", tmp_path / "back.gguf") == 0
    back = read_gguf(tmp_path / "back.gguf").metadata
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id"):
        assert back[key] == orig[key], key
    _check_vectors(vocab_dir, name, tmp_path / "back.gguf")
    # HF -> HF copies the tokenizer files as they are.
    assert convert(tmp_path / "hf", "--to", "hf", "--out", tmp_path / "hf2") == 0
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf2" / f).read_bytes() == (tmp_path / "hf" / f).read_bytes()
    return orig, back


def test_spm_tokenizer_survives_gguf_hf_gguf(vocab_dir, tmp_path):
    orig, back = _tokenizer_round_trip(vocab_dir, "llama-spm", tmp_path)
    assert back["tokenizer.ggml.token_type"] == orig["tokenizer.ggml.token_type"]


@pytest.mark.slow
def test_llama3_bpe_tokenizer_survives_gguf_hf_gguf(vocab_dir, tmp_path):
    # 128k tokens and 280k merges: about a minute on two cores, hence slow.
    orig, back = _tokenizer_round_trip(vocab_dir, "llama-bpe", tmp_path)
    assert back["tokenizer.ggml.merges"] == orig["tokenizer.ggml.merges"]
    assert back["tokenizer.ggml.token_type"] == orig["tokenizer.ggml.token_type"]
    assert back["tokenizer.ggml.pre"] == "llama-bpe"
