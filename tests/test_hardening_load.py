"""Crafted model files fail fast, before anything the header claims is allocated (issue 17, hole 3 and the
"metadata with wrong types or values" class): a named ModelFormatError / ConfigError naming the key, in bounded
CPU time and memory, through `load_model`, `pull` and the server (a 4xx, and the server keeps serving)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hostile_support import Bounded, base_tensors, write_llama_gguf
from llamaforge.config import ModelConfig
from llamaforge.errors import ConfigError, ModelFormatError, StoreError
from llamaforge.formats.architecture import expected_shapes
from llamaforge.formats.load import load_model


def _fails(path, match, quant=None):
    with Bounded(cpu_s=2.0, mib=32):
        with pytest.raises(ModelFormatError, match=match) as ei:
            load_model(path, dtype="float32") if quant is None else load_model(path, quant=quant)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 600
    return ei.value


def test_the_baseline_file_loads(tmp_path):
    lm = load_model(write_llama_gguf(tmp_path / "ok.gguf"), dtype="float32")
    assert lm.config.num_hidden_layers == 2 and lm.config.hidden_size == 8


@pytest.mark.parametrize("quant", [None, "q4", "int8"])
@pytest.mark.parametrize("blocks,match", [
    (3_000_000, r"llama.block_count is 3000000, outside the supported range"),
    (3000, r"llama.block_count is 3000 but the file holds tensors for 2 layers"),
    (1, r"llama.block_count is 1 but the file holds tensors for 2 layers"),
])
def test_crafted_block_count_fails_before_building_layers(tmp_path, blocks, match, quant):
    p = write_llama_gguf(tmp_path / "m.gguf", {"llama.block_count": (blocks, "UINT32")})
    _fails(p, match, quant)


def test_a_missing_middle_layer_is_named(tmp_path):
    t = {k: None for k in base_tensors() if k.startswith("blk.0.")}
    t.update({k.replace("blk.1.", "blk.2."): v for k, v in base_tensors().items() if k.startswith("blk.1.")})
    p = write_llama_gguf(tmp_path / "m.gguf", {"llama.block_count": (3, "UINT32")}, tensors=t)
    _fails(p, r"no tensors for layer 0|holds tensors for")


@pytest.mark.parametrize("key,value,vtype,match", [
    ("llama.attention.head_count", 0, "UINT32", r"llama.attention.head_count is 0"),
    ("llama.attention.head_count_kv", 0, "UINT32", r"llama.attention.head_count_kv is 0"),
    ("llama.attention.head_count_kv", 3, "UINT32", r"not a multiple of"),
    ("llama.embedding_length", 0, "UINT32", r"llama.embedding_length is 0"),
    ("llama.embedding_length", 16, "UINT32", r"has shape .*expected"),
    ("llama.feed_forward_length", 17, "UINT32", r"has shape .*expected"),
    ("llama.context_length", 2**40, "UINT64", r"llama.context_length is 1099511627776"),
    ("llama.context_length", -5, "INT32", r"llama.context_length is -5"),
    ("llama.embedding_length", "8", "STRING", r"llama.embedding_length must be an integer, got the string"),
    ("llama.block_count", [2, 2], "ARRAY", r"llama.block_count must be an integer, got a list"),
    ("llama.block_count", 2.5, "FLOAT32", r"llama.block_count must be an integer"),
    ("llama.block_count", True, "BOOL", r"llama.block_count must be an integer"),
    ("llama.rope.freq_base", "x", "STRING", r"llama.rope.freq_base must be a number"),
    ("llama.rope.freq_base", float("inf"), "FLOAT32", r"llama.rope.freq_base must be a positive finite"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "FLOAT32", r"layer_norm_rms_epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, "FLOAT32", r"layer_norm_rms_epsilon"),
    ("llama.attention.key_length", 3, "UINT32", r"llama.attention.key_length \(head_dim\) must be even"),
    ("llama.vocab_size", 13, "UINT32", r"llama.vocab_size is 13 but token_embd.weight has 12 rows"),
    ("llama.vocab_size", "many", "STRING", r"llama.vocab_size must be an integer"),
    ("llama.rope.scaling.type", "yarn", "STRING", r"unsupported rope scaling type the string 'yarn'"),
    ("llama.rope.scaling.type", [1], "ARRAY", r"unsupported rope scaling type"),
    ("general.architecture", 7, "UINT32", r"unsupported GGUF architecture 7"),
    ("general.architecture", "x" * 5000, "STRING", r"unsupported GGUF architecture the string 'xxx"),
])
def test_wrong_metadata_types_and_values_name_the_key(tmp_path, key, value, vtype, match):
    p = write_llama_gguf(tmp_path / "m.gguf", {key: (value, vtype)})
    e = _fails(p, match)
    assert e.path == str(p)


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                                 "llama.context_length", "llama.feed_forward_length"])
def test_missing_required_key(tmp_path, key):
    _fails(write_llama_gguf(tmp_path / "m.gguf", drop={key}), key)


@pytest.mark.parametrize("tensors,match", [
    ({"blk.0.attn_q.weight": np.float32(1.0)}, r"'blk.0.attn_q.weight' has 0 dimensions|shape"),
    ({"blk.0.attn_q.weight": np.zeros((8, 8, 1), np.float32)}, r"q_proj.weight' has shape \[8, 8, 1\], expected \[8, 8\]"),
    ({"token_embd.weight": np.zeros(12, np.float32)}, r"token_embd.weight' has shape \[12\], expected 2-D"),
    ({"rope_freqs.weight": np.ones(1000, np.float32)}, r"rope_freqs.weight' has 1000 values, expected"),
    ({"rope_freqs.weight": np.array([1.0, -1.0], np.float32)}, r"rope_freqs factors must be positive"),
    ({"blk.0.attn_qkv.weight": np.zeros((24, 8), np.float32)}, r"unexpected tensor 'blk.0.attn_qkv.weight'"),
    ({"blk.01.attn_q.weight": np.zeros((8, 8), np.float32)}, r"names the same weight"),
    ({"blk.0.ffn_up.weight": None}, r"missing tensor 'model.layers.0.mlp.up_proj.weight'.*blk.0.ffn_up"),
])
def test_wrong_tensor_tables(tmp_path, tensors, match):
    _fails(write_llama_gguf(tmp_path / "m.gguf", tensors=tensors), match)


@pytest.mark.parametrize("cfg", [
    dict(bias=False), dict(bias=True, tie=True),
])
def test_expected_shapes_match_the_model(cfg):
    from llamaforge.model import Llama
    c = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, tie_word_embeddings=cfg.get("tie", False),
                    attention_bias=cfg["bias"], mlp_bias=cfg["bias"])
    with torch.device("meta"):
        m = Llama(c)
    actual = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if c.tie_word_embeddings:
        actual.pop("lm_head.weight")
    assert expected_shapes(c) == actual


# ---------------------------------------------------------------------------------------------- HF / Meta configs
def _hf_dir(tmp_path, **over):
    from conftest import make_tiny_hf
    d = tmp_path / "hf"
    make_tiny_hf("llama2").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in over.items():
        if v is KeyError:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("over,match", [
    (dict(num_attention_heads=0), r"num_attention_heads is 0"),
    (dict(num_attention_heads="4"), r"num_attention_heads must be an integer, got the string"),
    (dict(hidden_size=[64]), r"hidden_size must be an integer, got a list"),
    (dict(num_hidden_layers=3_000_000), r"num_hidden_layers is 3000000, outside"),
    (dict(num_hidden_layers=40), r"num_hidden_layers is 40 but the file holds tensors for 2 layers"),
    (dict(max_position_embeddings=2**40), r"max_position_embeddings is 1099511627776"),
    (dict(rms_norm_eps="1e-5"), r"rms_norm_eps must be a number"),
    (dict(rope_theta=-1), r"rope_theta must be a positive"),
    (dict(num_key_value_heads=3), r"not a multiple of"),
    (dict(head_dim=0), r"head_dim is 0"),
    (dict(tie_word_embeddings="yes"), r"tie_word_embeddings must be true or false"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                        "original_max_position_embeddings": 64}), r"rope_scaling.factor must be a number"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                        "original_max_position_embeddings": 64}), r"high_freq_factor > low_freq_factor"),
    (dict(rope_scaling=[1, 2]), r"rope_scaling must be an object, got a list"),
    (dict(vocab_size=10**30), r"vocab_size is 1000000000000000000000000000000, outside"),
])
def test_hf_config_wrong_types_and_values(tmp_path, over, match):
    d = _hf_dir(tmp_path, **over)
    with pytest.raises(ConfigError if "holds tensors" not in match else ModelFormatError, match=match):
        load_model(d, dtype="float32")
    from llamaforge.store import Store
    with pytest.raises((StoreError, ModelFormatError), match=match):
        Store().pull(d, "bad")
    assert "bad" not in Store().names()


def test_meta_params_wrong_types(tmp_path):
    from llamaforge.formats.meta import meta_params_config
    for params, match in [({"dim": 0, "n_layers": 1, "n_heads": 1}, "dim is 0"),
                          ({"dim": 8, "n_layers": 1, "n_heads": 0}, "n_heads is 0"),
                          ({"dim": 8, "n_layers": "1", "n_heads": 2}, "n_layers must be an integer"),
                          ({"dim": 8, "n_layers": 1, "n_heads": 2, "norm_eps": [1]}, "norm_eps must be a number"),
                          ({"dim": 8, "n_layers": 1, "n_heads": 2, "max_seq_len": 2**40}, "max_seq_len is")]:
        (tmp_path / "params.json").write_text(json.dumps(params))
        with pytest.raises(ConfigError, match=match):
            meta_params_config(tmp_path)


# ---------------------------------------------------------------------------------------------- pull and server
def test_pull_refuses_a_gguf_that_cannot_load(tmp_path):
    from llamaforge.store import Store
    s = Store()
    for i, meta in enumerate([{"llama.block_count": (3000, "UINT32")}, {"llama.attention.head_count": (0, "UINT32")},
                              {"llama.embedding_length": (16, "UINT32")}]):
        p = write_llama_gguf(tmp_path / f"b{i}.gguf", meta)
        with pytest.raises(StoreError):
            s.pull(p, f"bad{i}")
    assert s.names() == [n for n in s.names() if not n.startswith("bad")]
    assert s.pull(write_llama_gguf(tmp_path / "ok.gguf"), "fine").startswith("fine")


def test_server_answers_400_for_a_crafted_stored_model_and_keeps_serving(tmp_path):
    import httpx
    from llamaforge.server.app import ServerConfig, create_app
    from llamaforge.store import Store, parse_name
    from test_server_e2e import Running
    s = Store()
    for name, meta in (("crafted", {"llama.block_count": (3000, "UINT32")}),
                       ("zeroheads", {"llama.attention.head_count": (0, "UINT32")})):
        p = write_llama_gguf(tmp_path / f"{name}.gguf", meta, tokenizer=True)
        d, size = s.import_file(p)   # planted past `pull`, as an older version or another tool might have
        s.write_manifest(parse_name(name), {"format": "gguf", "weights": {"digest": d, "size": size},
                                            "defaults": {}, "created_at": "2026-01-01T00:00:00Z"})
    r = Running(create_app(ServerConfig()))
    try:
        for name in ("crafted", "zeroheads"):
            resp = httpx.post(r.url + "/v1/chat/completions", timeout=30,
                              json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 400, resp.text
            err = resp.json()["error"]
            assert err["code"] == "invalid_model" and ("llama." in err["message"])
            assert str(s.blob_path(d).parent) not in err["message"]  # no file-system layout in the answer
            resp = httpx.post(r.url + "/api/chat", timeout=30,
                              json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 400 and "llama." in resp.json()["error"]
        assert httpx.get(r.url + "/health", timeout=5).status_code == 200
    finally:
        r.stop()
