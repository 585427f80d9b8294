"""Deep nesting and unbounded inputs (issue 17): a safetensors header, config.json, a training JSONL line, a
request string or a template nested thousands of levels deep, a 100 MB training record, /dev/zero as a
dataset, template, config or prompt: each is a named error in bounded time and memory, never a RecursionError,
a traceback or a read without limit."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from hostile_support import Bounded
from llamaforge._fs import loads_json
from llamaforge.errors import LlamaforgeError, ModelFormatError, TemplateError

DEEP = 200_000


def deep_json(n: int = DEEP, kind: str = "[") -> str:
    close = {"[": "]", "{": "}"}[kind]
    if kind == "{":
        return '{"a":' * n + "1" + close * n
    return kind * n + close * n


@pytest.mark.parametrize("kind", ["[", "{"])
def test_loads_json_turns_deep_nesting_into_a_decode_error(kind):
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        loads_json(deep_json(kind=kind))
    assert loads_json("[[1]]") == [[1]]


def test_deep_safetensors_header(tmp_path):
    from llamaforge.formats.safetensors import validate_safetensors
    header = ('{"__metadata__": ' + deep_json(50_000, "{") + "}").encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    with Bounded(cpu_s=3.0, mib=64), pytest.raises(ModelFormatError, match="nested too deeply"):
        validate_safetensors(p)


@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_deep_or_endless_model_config(tmp_path, name):
    from llamaforge.formats.load import load_model
    (tmp_path / name).write_text('{"x": ' + deep_json() + "}")
    (tmp_path / ("model.safetensors" if name == "config.json" else "consolidated.00.pth")).write_bytes(b"x" * 16)
    with Bounded(cpu_s=3.0, mib=64), pytest.raises(ModelFormatError, match=f"unreadable {name}: nested too deeply"):
        load_model(tmp_path)
    (tmp_path / name).unlink()
    os.symlink("/dev/zero", tmp_path / name)
    with Bounded(cpu_s=3.0, mib=64), pytest.raises(ModelFormatError, match="larger than the limit|not a model directory"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------- training data
@pytest.fixture()
def fmt():
    from test_generate_support import tiny_lm
    from llamaforge.tokenizer.chat import ChatFormat
    return tiny_lm().chat_format if hasattr(tiny_lm(), "chat_format") else ChatFormat


def _load(path, **kw):
    from llamaforge.train.data import iter_records
    return list(iter_records(path))


def test_deep_training_line_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n' + '{"prompt": ' + deep_json() + "}\n")
    recs = _load(p)
    assert recs[0][2] is None and recs[1][0] == 2 and "nested too deeply" in recs[1][2]
    p.write_text(deep_json())
    from llamaforge.train.data import DatasetError
    with pytest.raises(DatasetError, match="nested too deeply"):
        _load(p)


def test_huge_training_record_is_refused_without_reading_it_all(tmp_path):
    from llamaforge.train.data import MAX_RECORD_BYTES, DatasetError
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"prompt": "a", "completion": "b"}\n{"prompt": "')
        f.write(b"a" * (MAX_RECORD_BYTES + 10))
        f.write(b'", "completion": "b"}\n')
    with Bounded(cpu_s=3.0, mib=3 * (MAX_RECORD_BYTES >> 20) + 8):
        with pytest.raises(DatasetError, match=r"big.jsonl:2: record is longer than 16 MiB"):
            _load(p)


def test_dev_zero_as_training_data(tmp_path):
    from llamaforge.train.data import DatasetError
    os.symlink("/dev/zero", tmp_path / "z.jsonl")
    with Bounded(cpu_s=3.0, mib=80), pytest.raises(DatasetError):
        _load(tmp_path / "z.jsonl")


# ---------------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("template", [
    "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "{{ " + "[" * 5000 + "]" * 5000 + " }}",
    "{% if 1 %}" * 2000 + "{% endif %}" * 2000,
    "{% for a in b %}" * 200 + "{% endfor %}" * 200,
    "{{ 1" + "|abs" * 3000 + " }}",
    "{{ x" + ".a" * 3000 + " }}",
])
def test_deeply_nested_templates_are_refused(template):
    from llamaforge.tokenizer.jinja_sandbox import ChatTemplate
    with Bounded(cpu_s=4.0, mib=256), pytest.raises(TemplateError, match="nest"):
        ChatTemplate(template)


def test_dev_zero_as_a_template_file_is_bounded(tmp_path):
    from llamaforge.formats.safetensors import dir_chat_template
    os.symlink("/dev/zero", tmp_path / "chat_template.jinja")
    with Bounded(cpu_s=3.0, mib=64):
        try:
            dir_chat_template(tmp_path)
        except LlamaforgeError:
            pass


# ---------------------------------------------------------------------------------------------- CLI streams
def test_dev_zero_as_stdin_prompt_is_refused(smollm2_gguf):
    with open("/dev/zero", "rb") as zero:
        r = subprocess.run([sys.executable, "-m", "llamaforge", "generate", str(smollm2_gguf), "-", "--max-tokens", "1"],
                           stdin=zero, capture_output=True, timeout=120, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "limit" in r.stderr or "larger" in r.stderr


# ---------------------------------------------------------------------------------------------- other files
def _zero(tmp_path, name):
    p = tmp_path / name
    os.symlink("/dev/zero", p)
    return p


def test_dev_zero_as_training_config(tmp_path):
    from llamaforge.train.config import TrainConfig
    with Bounded(cpu_s=3.0, mib=16), pytest.raises(LlamaforgeError, match="larger than the limit"):
        TrainConfig.from_file(_zero(tmp_path, "c.yaml"))


@pytest.mark.parametrize("which", ["tokenizer.json", "tokenizer.model"])
def test_dev_zero_as_tokenizer_file(tmp_path, which):
    from llamaforge.errors import TokenizerError
    from llamaforge.tokenizer.hf import HFTokenizer
    from llamaforge.tokenizer.tiktoken import TiktokenTokenizer
    p = _zero(tmp_path, which)
    with Bounded(cpu_s=5.0, mib=300), pytest.raises(TokenizerError, match="larger than the limit"):
        HFTokenizer.from_file(p) if which == "tokenizer.json" else TiktokenTokenizer.from_file(p)


def test_dev_zero_as_create_template(tmp_path, capsys):
    from llamaforge.cli.main import main
    rc = main(["create", "x", "--from", "smollm2", "--template", str(_zero(tmp_path, "t.jinja"))])
    assert rc != 0 and "larger than the limit" in capsys.readouterr().err
