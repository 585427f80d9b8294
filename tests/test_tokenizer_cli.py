"""`llamaforge tokenize`: names, tokenizer files, stdin, --special/--json/--bos, clean errors."""
from __future__ import annotations

import io
import json
import sys

import pytest

from llamaforge.cli.main import main
from llamaforge.tokenizer.load import load_tokenizer


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch):
    # The command must load only the tokenizer: loading a model would fail loudly here.
    import llamaforge.formats.load as fl

    def refuse(*a, **k):
        raise AssertionError("tokenize loaded model weights")
    monkeypatch.setattr(fl, "load_model", refuse)


def _run(capsys, *argv):
    rc = main(["tokenize", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_builtin_name_json(capsys, smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    rc, out, _ = _run(capsys, "smollm2", "Hello <|im_end|> 2024", "--json")
    assert rc == 0 and json.loads(out) == tok.encode("Hello <|im_end|> 2024")
    assert 2 not in json.loads(out)
    rc, out, _ = _run(capsys, "smollm2", "Hello <|im_end|>", "--json", "--special")
    assert rc == 0 and json.loads(out)[-1] == 2


def test_tokenizer_files(capsys, llama3_tokenizer_model, vocab_dir):
    rc, out, _ = _run(capsys, str(llama3_tokenizer_model), "Hello world")
    assert rc == 0 and out.split() == ["9906", "1917"]
    rc, out, _ = _run(capsys, str(vocab_dir / "ggml-vocab-llama-spm.gguf"), "Hello", "--bos", "--json")
    assert json.loads(out) == [1, 15043]
    rc, out, _ = _run(capsys, str(llama3_tokenizer_model), "Hi", "--pieces")
    assert out == '13347\t"Hi"\n'


def test_stdin(capsys, monkeypatch, llama3_tokenizer_model):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xc3\xa9 \xff!")))
    rc, out, _ = _run(capsys, str(llama3_tokenizer_model), "-", "--json")
    tok = load_tokenizer(llama3_tokenizer_model)
    assert rc == 0 and tok.decode(json.loads(out)) == "café \ufffd!"


def test_errors(capsys, tmp_path):
    rc, _, err = _run(capsys, "no-such-model", "x")
    assert rc == 1 and err.startswith("Error:") and "not found" in err
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01\x02 not a tokenizer")
    rc, _, err = _run(capsys, str(junk), "x")
    assert rc == 1 and "not a known tokenizer format" in err
    with pytest.raises(SystemExit):
        main(["tokenize", "--json"])
