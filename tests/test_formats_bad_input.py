"""Malformed Hugging Face safetensors directories and Meta checkpoints; the CLI-style one-line error."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_hf
from llamaforge.errors import ModelFormatError
from llamaforge.formats.load import load_model as _load_model
from llamaforge.formats.meta import save_meta
from llamaforge.formats.safetensors import validate_safetensors


def load_model(path, **kw):
    """float32 reference weights: an explicit dtype keeps any default in-memory quantization out of the checks."""
    kw.setdefault("dtype", torch.float32)
    return _load_model(path, **kw)


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_config_json():
    return make_tiny_hf("llama2").config.to_json_string()


def st_bytes(header: dict, data: bytes, *, header_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


def hf_dir(tmp_path, tiny_config_json, content: bytes) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(tiny_config_json)
    (d / "model.safetensors").write_bytes(content)
    return d


def expect(tmp_path, tiny_config_json, content: bytes, match: str):
    d = hf_dir(tmp_path, tiny_config_json, content)
    t0 = time.process_time()  # CPU time: a busy shared machine must not make this flaky
    with pytest.raises(ModelFormatError, match=match) as ei:
        load_model(d)
    assert time.process_time() - t0 < 2.0
    assert "model.safetensors" in str(ei.value) and "\n" not in str(ei.value)


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def test_safetensors_validator_accepts_a_real_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "x.safetensors"))
    assert validate_safetensors(tmp_path / "x.safetensors") == {"a": ("F32", (2, 3)), "b": ("BF16", (4,))}


def test_empty_and_truncated(tmp_path, tiny_config_json):
    expect(tmp_path, tiny_config_json, b"", "truncated")
    expect(tmp_path, tiny_config_json, b"\x10\0\0", "truncated")
    full = st_bytes({"a": F32_2x2}, bytes(16))
    expect(tmp_path, tiny_config_json, full[:-1], "outside|not described|needs")
    expect(tmp_path, tiny_config_json, full[:20], "header claims")


@pytest.mark.parametrize("n", [2**63, 2**40, 100 * 1024 * 1024 + 1])
def test_header_too_large(tmp_path, tiny_config_json, n):
    expect(tmp_path, tiny_config_json, st_bytes({"a": F32_2x2}, bytes(16), header_len=n), "larger than|header claims")


@pytest.mark.parametrize("header", [b"not json at all", b"\xff\xfe{}", b"[1, 2, 3]", b'{"a": 1'])
def test_header_not_json_object(tmp_path, tiny_config_json, header):
    expect(tmp_path, tiny_config_json, struct.pack("<Q", len(header)) + header, "not valid JSON|not a JSON object")


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}, "outside"),          # past the end
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}, "outside"),           # reversed
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}, "needs 24 bytes"),   # shape vs bytes
    ({"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}, "invalid shape"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}, "invalid data_offsets"),
    ("zzz", "not an object"),
])
def test_bad_tensor_entries(tmp_path, tiny_config_json, entry, match):
    expect(tmp_path, tiny_config_json, st_bytes({"a": entry}, bytes(16)), match)


def test_overlapping_offsets(tmp_path, tiny_config_json):
    header = {"a": F32_2x2, "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}
    expect(tmp_path, tiny_config_json, st_bytes(header, bytes(24)), "overlaps")


def test_gap_between_tensors(tmp_path, tiny_config_json):
    header = {"a": F32_2x2, "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [20, 36]}}
    expect(tmp_path, tiny_config_json, st_bytes(header, bytes(36)), "gap of 4 bytes")


def test_trailing_bytes(tmp_path, tiny_config_json):
    expect(tmp_path, tiny_config_json, st_bytes({"a": F32_2x2}, bytes(20)), "not described")


def test_missing_and_wrong_shape_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    ref = make_tiny_hf("llama2")
    ref.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("model.layers.0.self_attn.v_proj.weight")
    save_file(sd, str(f))
    with pytest.raises(ModelFormatError, match=r"missing tensor 'model.layers.0.self_attn.v_proj.weight'.*\[64, 64\]"):
        load_model(tmp_path / "m")
    sd["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(64, 32)
    save_file(sd, str(f))
    with pytest.raises(ModelFormatError, match=r"v_proj.weight' has shape \[64, 32\], expected \[64, 64\]"):
        load_model(tmp_path / "m")


def test_bad_config_json(tmp_path, tiny_config_json):
    d = hf_dir(tmp_path, tiny_config_json, st_bytes({"a": F32_2x2}, bytes(16)))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ModelFormatError, match="missing required keys"):
        load_model(d)


def test_shard_index_cannot_escape_the_directory(tmp_path, tiny_config_json):
    d = hf_dir(tmp_path, tiny_config_json, st_bytes({"a": F32_2x2}, bytes(16)))
    (d / "model.safetensors").unlink()
    (tmp_path / "outside.safetensors").write_bytes(st_bytes({"a": F32_2x2}, bytes(16)))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(ModelFormatError, match="invalid shard file name"):
        load_model(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(ModelFormatError, match="missing"):
        load_model(d)


def test_pickled_bin_only_is_refused(tmp_path, tiny_config_json):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(tiny_config_json)
    (d / "pytorch_model.bin").write_bytes(b"whatever")
    with pytest.raises(ModelFormatError, match="pytorch_model.bin"):
        load_model(d)


# ------------------------------------------------------------------------------------------- Meta checkpoints
class _Payload:
    """Unpickling this calls open(marker, "w"): creates a file, i.e. code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _meta_dir(tmp_path) -> Path:
    ref = make_tiny_hf("llama2")
    ref.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf")
    return save_meta(tmp_path / "meta", lm.config, lm.model.state_dict())


def test_pth_with_code_is_refused_and_code_not_run(tmp_path):
    d = _meta_dir(tmp_path)
    marker = tmp_path / "pwned"
    ckpt = d / "consolidated.00.pth"
    sd = torch.load(ckpt, weights_only=True)
    sd["tok_embeddings.weight"] = _Payload(marker)
    torch.save(sd, ckpt)  # a genuine zip checkpoint whose pickle carries a call
    with pytest.raises(ModelFormatError, match="refused") as ei:
        load_model(d)
    assert "consolidated.00.pth" in str(ei.value)
    assert not marker.exists()
    # A bare (non-zip) pickle is refused as well, also without running it.
    ckpt.write_bytes(pickle.dumps({"tok_embeddings.weight": _Payload(marker)}))
    with pytest.raises(ModelFormatError, match="refused"):
        load_model(d)
    assert not marker.exists()


def test_pth_not_a_state_dict(tmp_path):
    d = _meta_dir(tmp_path)
    torch.save([torch.zeros(2)], d / "consolidated.00.pth")
    with pytest.raises(ModelFormatError, match="not a flat"):
        load_model(d)
    (d / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="refused"):
        load_model(d)


def test_meta_bad_params_and_missing_weights(tmp_path):
    d = _meta_dir(tmp_path)
    (d / "params.json").write_text("[]")
    with pytest.raises(ModelFormatError, match="params.json"):
        load_model(d)
    (d / "params.json").write_text(json.dumps({"dim": 64}))
    with pytest.raises(ModelFormatError, match="missing required keys"):
        load_model(d)
    (d / "consolidated.00.pth").unlink()
    with pytest.raises(ModelFormatError, match="no consolidated"):
        load_model(d)


def test_meta_wrong_shape(tmp_path):
    d = _meta_dir(tmp_path)
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 100)
    torch.save(sd, d / "consolidated.00.pth")
    with pytest.raises(ModelFormatError, match=r"down_proj.weight' has shape \[64, 100\], expected \[64, 160\]"):
        load_model(d)


# ------------------------------------------------------------------------------------------- user-facing
def test_bad_file_gives_one_line_and_exit_code_1(tmp_path):
    """What the CLI does with any LlamaforgeError: `Error: <path>: <reason>` on one stderr line, exit 1."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 2**60) + struct.pack("<Q", 0))
    code = ("import sys\nfrom llamaforge.errors import LlamaforgeError\nfrom llamaforge.formats.load import load_model\n"
            "try:\n    load_model(sys.argv[1])\nexcept LlamaforgeError as e:\n"
            "    print(f'Error: {e}', file=sys.stderr)\n    sys.exit(1)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(bad) in lines[0]
    assert "tensors" in lines[0] and "Traceback" not in r.stderr
