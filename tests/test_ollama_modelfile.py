"""Ollama Modelfiles: `llamaforge create NAME -f Modelfile` with FROM / PARAMETER / TEMPLATE / SYSTEM / ADAPTER /
MESSAGE / LICENSE, read back with `show`; Go templates and unknown instructions refused with the line named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge.cli.main import main
from llamaforge.store import Store
from llamaforge.store.modelfile import parse_modelfile, render_modelfile

from test_store import tiny_gguf

MODELFILE = '''# a pirate, built on a local file
FROM ./tiny.gguf
PARAMETER temperature 0.3
PARAMETER num_ctx 128
PARAMETER num_predict 42
PARAMETER stop "<|im_end|>"
PARAMETER stop "User:"
parameter top_k 20
SYSTEM """You are a pirate.
Answer briefly."""
TEMPLATE """{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}
{% endfor %}assistant:"""
ADAPTER ./lora
MESSAGE user Who are you?
MESSAGE assistant "Arr, a \\"pirate\\"!"
LICENSE """Licence text one."""
LICENSE Second licence
'''


def _fake_adapter(path):
    """A PEFT adapter directory as `create` checks it (config + weights file); it is stored, not applied here."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                          "target_modules": ["q_proj"]}))
    (path / "adapter_model.safetensors").write_bytes(b"weights bytes")


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_create_from_a_modelfile_with_every_instruction(capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    tiny_gguf(work / "tiny.gguf")
    _fake_adapter(work / "lora")
    (work / "Modelfile").write_text(MODELFILE)
    monkeypatch.chdir(tmp_path)   # FROM and ADAPTER are relative to the Modelfile, not to the current folder
    rc, out, err = _run(capsys, "create", "pirate", "-f", str(work / "Modelfile"))
    assert rc == 0, err
    assert out.strip() == "created 'pirate:latest'"
    rc, out, _ = _run(capsys, "show", "pirate", "--json")
    info = json.loads(out)
    assert info["system"] == "You are a pirate.\nAnswer briefly."
    assert info["options"] == {"temperature": 0.3, "num_ctx": 128, "max_tokens": 42,
                               "stop": ["<|im_end|>", "User:"], "top_k": 20}
    assert info["template"].startswith("{% for m in messages %}") and info["template"].endswith("assistant:")
    assert info["messages"] == [{"role": "user", "content": "Who are you?"},
                                {"role": "assistant", "content": 'Arr, a "pirate"!'}]
    assert info["license"] == "Licence text one.\n\nSecond licence"
    assert info["adapter"] and sorted(p.name for p in Path(info["adapter"]).iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    assert Store().resolve("pirate").path.read_bytes() == (work / "tiny.gguf").read_bytes()   # FROM was copied in
    rc, out, _ = _run(capsys, "show", "pirate", "--license")
    assert out.strip() == "Licence text one.\n\nSecond licence"
    # `show --modelfile` prints a Modelfile that says the same again
    rc, out, _ = _run(capsys, "show", "pirate", "--modelfile")
    again = parse_modelfile(out)
    assert again.from_ == "pirate:latest" and again.system == info["system"]
    assert again.messages == info["messages"] and again.template == info["template"]
    assert again.parameters == {"temperature": 0.3, "num_ctx": 128, "num_predict": 42,
                                "stop": ["<|im_end|>", "User:"], "top_k": 20}
    assert "PARAMETER num_predict" in out and "max_tokens" not in out
    # a Modelfile FROM a store model, in the current folder by default, flags overriding it
    (tmp_path / "Modelfile").write_text("FROM pirate\nSYSTEM quiet\n")
    rc, _, err = _run(capsys, "create", "calm", "--system", "calm")
    assert rc == 0, err
    calm = Store().resolve("calm").defaults
    assert calm["system"] == "calm" and calm["messages"] == info["messages"]   # the rest is inherited


@pytest.mark.parametrize("text, needle", [
    ("FROM smollm2\nTEMPLATE \"\"\"{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}\"\"\"\n",
     "Go template (line 1"),
    ("FROM smollm2\nTEMPLATE {{- range .Messages }}{{ .Content }}{{ end }}\n", "Go template"),
    ("FROM smollm2\nPARAMETER num_predict 0\n", "num_predict must be >= 1"),
    ("FROM smollm2\nPARAMETER mirostat 1\n", "unknown parameter 'mirostat'"),
    ("FROM smollm2\nPARAMETER num_ctx 0\n", "num_ctx"),
    ("FROM smollm2\n\nQUANTIZE q4\n", "line 3: unknown instruction 'QUANTIZE'"),
    ("SYSTEM hi\n", "no FROM line"),
    ("FROM smollm2\nSYSTEM \"\"\"never closed\n", "line 2: a \"\"\" block is never closed"),
    ("FROM smollm2\nMESSAGE tool hi\n", "messages[0].role must be one of system, user, assistant"),
    ("FROM smollm2\nFROM smollm2\n", "line 2: more than one FROM"),
    ("FROM ./missing.gguf\n", "no such model file or directory"),
    ("FROM smollm2\nREQUIRES 0.6.0\n", "REQUIRES"),
])
def test_bad_modelfiles_are_one_line_errors(capsys, tmp_path, text, needle):
    mf = tmp_path / "Modelfile"
    mf.write_text(text)
    rc, out, err = _run(capsys, "create", "bad", "-f", str(mf))
    assert rc == 1 and err.startswith("Error: ") and err.count("\n") == 1, err
    assert needle in err
    assert "bad:latest" not in Store().names()


def test_modelfile_round_trip_keeps_awkward_text():
    defaults = {"system": 'ends with a quote "', "template": 'has """ inside {{ x }}',
                "options": {"stop": ["\n\n", "a=b"], "seed": 7, "max_tokens": 5},
                "messages": [{"role": "user", "content": "line one\nline two"}], "license": "L"}
    mf = parse_modelfile(render_modelfile("m:latest", defaults))
    assert (mf.system, mf.template, mf.licenses) == (defaults["system"], defaults["template"], ["L"])
    assert mf.parameters == {"stop": ["\n\n", "a=b"], "seed": 7, "num_predict": 5}
    assert mf.messages == defaults["messages"]


def test_oversized_modelfile_is_refused(capsys, tmp_path):
    mf = tmp_path / "Modelfile"
    mf.write_bytes(b"FROM smollm2\nSYSTEM " + b"x" * (5 << 20) + b"\n")
    rc, _, err = _run(capsys, "create", "big", "-f", str(mf))
    assert rc == 1 and "Modelfile" in err and err.count("\n") == 1
