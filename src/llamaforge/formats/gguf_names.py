"""The one GGUF <-> Hugging Face tensor-name table (readers and writers both use it)."""
from __future__ import annotations

import re

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# Tensors that carry no weights of ours: rope_freqs becomes config, attn_rot_embd is an old precomputed table.
_NON_WEIGHTS = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight")


def gguf_to_hf_name(name: str) -> str | None:
    """HF parameter name for a GGUF tensor name; None for tensors that are not model weights."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if _NON_WEIGHTS.fullmatch(name):
        return None
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise KeyError(name)


def hf_to_gguf_name(name: str) -> str:
    """GGUF tensor name for an HF parameter name (inverse of `gguf_to_hf_name`)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    raise KeyError(name)
