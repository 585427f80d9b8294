"""Builders for hostile model files: a tiny, valid llama GGUF whose metadata and tensor table a test can bend
(wrong types, absurd values, missing or extra layers). Written with the `gguf` package's writer, so the bytes are
what llama.cpp's own tools would produce for the same (crafted) values."""
from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np

C, HEADS, FFN, VOCAB = 8, 2, 16, 12

# key -> (value, gguf value type name) of a valid tiny model
BASE_META = {
    "llama.context_length": (64, "UINT32"),
    "llama.embedding_length": (C, "UINT32"),
    "llama.block_count": (2, "UINT32"),
    "llama.feed_forward_length": (FFN, "UINT32"),
    "llama.attention.head_count": (HEADS, "UINT32"),
    "llama.attention.head_count_kv": (HEADS, "UINT32"),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, "FLOAT32"),
    "llama.rope.freq_base": (10000.0, "FLOAT32"),
}


def layer_tensors(i: int, c: int = C, ffn: int = FFN) -> dict[str, np.ndarray]:
    g = np.random.default_rng(i)
    return {
        f"blk.{i}.attn_norm.weight": np.ones(c, np.float32),
        f"blk.{i}.ffn_norm.weight": np.ones(c, np.float32),
        **{f"blk.{i}.attn_{x}.weight": g.standard_normal((c, c)).astype(np.float32) for x in ("q", "k", "v")},
        f"blk.{i}.attn_output.weight": g.standard_normal((c, c)).astype(np.float32),
        f"blk.{i}.ffn_gate.weight": g.standard_normal((ffn, c)).astype(np.float32),
        f"blk.{i}.ffn_up.weight": g.standard_normal((ffn, c)).astype(np.float32),
        f"blk.{i}.ffn_down.weight": g.standard_normal((c, ffn)).astype(np.float32),
    }


def base_tensors(layers: int = 2) -> dict[str, np.ndarray]:
    t = {"token_embd.weight": np.random.default_rng(99).standard_normal((VOCAB, C)).astype(np.float32),
         "output_norm.weight": np.ones(C, np.float32)}
    for i in range(layers):
        t.update(layer_tensors(i))
    return t


def write_llama_gguf(path: Path, meta: dict | None = None, *, drop=(), tensors: dict | None = None,
                     tokenizer: bool = False) -> Path:
    """A tiny llama GGUF: BASE_META updated with `meta` (key -> (value, type name); type None = removed),
    keys in `drop` left out, `tensors` (name -> array, or None to remove) over the two-layer base tensors."""
    import gguf
    m = dict(BASE_META)
    m.update(meta or {})
    ts = base_tensors()
    for k, v in (tensors or {}).items():
        if v is None:
            ts.pop(k, None)
        else:
            ts[k] = v
    w = gguf.GGUFWriter(str(path), "llama")
    for k, (v, vtype) in m.items():
        if k in drop or vtype is None:
            continue
        vt = gguf.GGUFValueType[vtype]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(k, v)
        else:
            w.add_key_value(k, v, vt)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(VOCAB)])
        w.add_token_merges([])
    for k, v in ts.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class Bounded:
    """`with Bounded(cpu_s, mib):` fails the test if the block used more CPU seconds or Python heap than that."""

    def __init__(self, cpu_s: float = 2.0, mib: float = 32):
        self.cpu_s, self.mib = cpu_s, mib

    def __enter__(self):
        tracemalloc.start()
        self.t0 = time.process_time()
        return self

    def __exit__(self, *exc):
        cpu = time.process_time() - self.t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if exc[0] is None or issubclass(exc[0], Exception):
            assert cpu < self.cpu_s, f"took {cpu:.2f} s of CPU"
            assert peak < self.mib * 2**20, f"allocated {peak / 2**20:.1f} MiB"
        return False
