"""Meta reference checkpoints: `params.json` + `consolidated.NN.pth` (one per model-parallel shard).

Loaded only with `torch.load(weights_only=True, mmap=True)`: a pickle that carries code is refused, never
retried with the unsafe loader. Meta names map to HF names; q/k rows are converted from Meta's interleaved rotary
layout to HF's half-split layout with `unpermute_qk` (the one conversion, in model/rope.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from ..config import ModelConfig
from ..errors import LlamaforgeError, ModelFormatError
from ..model.rope import permute_qk, unpermute_qk
from .._fs import atomic_dir, read_bounded

_GLOBAL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
          "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
          "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
# How model-parallel shards split each weight (Meta's ColumnParallel / RowParallel layers); None = replicated.
_SPLIT_DIM = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1, "feed_forward.w1": 0,
              "feed_forward.w3": 0, "feed_forward.w2": 1, "attention_norm": None, "ffn_norm": None}
_IGNORED = {"rope.freqs"}  # Llama 2 saved its precomputed rotary table; it is derived from params


def meta_to_hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{int(m.group(1))}.{_LAYER[m.group(2)]}.{m.group(3)}"
    raise KeyError(name)


def hf_to_meta_name(name: str) -> str:
    for k, v in _GLOBAL.items():
        if v == name:
            return k
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for k, v in _LAYER.items():
            if v == m.group(2):
                return f"layers.{m.group(1)}.{k}.{m.group(3)}"
    raise KeyError(name)


def _torch_load(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; all mean "refused / malformed"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(path, f"refused to load checkpoint (weights-only loader): {first}") from None
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in sd.items()):
        raise ModelFormatError(path, "checkpoint is not a flat {name: tensor} state dict")
    return sd


def _merge_shards(shards: list[dict], files: list[Path], dim: int) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    names = list(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if list(s) != names and set(s) != set(names):
            raise ModelFormatError(f, "shard holds different tensors than consolidated.00.pth")
    out = {}
    for n in names:
        parts = [s[n] for s in shards]
        m = _LAYER_RE.fullmatch(n)
        kind = m.group(2) if m else n.rsplit(".", 1)[0]
        if n == "tok_embeddings.weight":
            # Llama 2 split the embedding width, Llama 3 the vocabulary.
            split = 1 if parts[0].shape[1] != dim and parts[0].shape[1] * len(parts) == dim else 0
        elif n == "output.weight":
            split = 0
        else:
            split = _SPLIT_DIM.get(kind)
        try:
            out[n] = parts[0] if split is None or parts[0].dim() == 1 else torch.cat(parts, dim=split)
        except RuntimeError as e:
            raise ModelFormatError(files[0].parent, f"cannot merge shards of {n!r}: {e}") from None
    return out


MAX_PARAMS_BYTES = 1 << 20   # params.json: a few hundred bytes in practice


def read_params(dirpath) -> dict:
    """params.json of a Meta directory as a dict (read bounded; ModelFormatError if unreadable)."""
    ppath = Path(dirpath) / "params.json"
    try:
        params = json.loads(read_bounded(ppath, MAX_PARAMS_BYTES, "params.json"))
    except (LlamaforgeError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ModelFormatError(ppath, f"unreadable params.json: {why}") from None
    if not isinstance(params, dict):
        raise ModelFormatError(ppath, "params.json is not a JSON object")
    return params


def meta_params_config(dirpath) -> ModelConfig:
    """params.json parsed and range-checked (the vocabulary size, when -1, stands in until the weights say)."""
    return ModelConfig.from_meta_params(read_params(dirpath), vocab_size=1, path=Path(dirpath) / "params.json")


def load_meta(dirpath, dtype: torch.dtype = torch.float32):
    """(ModelConfig, HF-named state_dict, metadata) for a Meta checkpoint directory."""
    dirpath = Path(dirpath)
    ppath = dirpath / "params.json"
    params = read_params(dirpath)
    files = sorted(dirpath.glob("consolidated.*.pth"))
    if not files:
        raise ModelFormatError(dirpath, "no consolidated.*.pth checkpoint next to params.json")
    shards = [_torch_load(f) for f in files]
    dim = params.get("dim")
    raw = _merge_shards(shards, files, dim)
    emb = raw.get("tok_embeddings.weight")
    if emb is None or emb.dim() != 2:
        raise ModelFormatError(files[0], "missing or malformed tensor 'tok_embeddings.weight'")
    config = ModelConfig.from_meta_params(params, vocab_size=emb.shape[0], path=ppath)
    # params.json has no words for these; the tensors present say it (as for GGUF).
    config = config.replace(tie_word_embeddings="output.weight" not in raw,
                            attention_bias="layers.0.attention.wq.bias" in raw,
                            mlp_bias="layers.0.feed_forward.w1.bias" in raw)
    sd = {}
    for name, t in raw.items():
        if name in _IGNORED:
            continue
        try:
            hf = meta_to_hf_name(name)
        except KeyError:
            raise ModelFormatError(files[0], f"unexpected tensor {name!r} in a Llama checkpoint") from None
        if ".q_proj." in hf or ".k_proj." in hf:
            n = config.num_attention_heads if ".q_proj." in hf else config.num_key_value_heads
            if t.shape[0] % (2 * n):
                raise ModelFormatError(files[0], f"tensor {name!r} has {t.shape[0]} rows, not divisible into "
                                                 f"{n} heads of even size")
            t = unpermute_qk(t, n)
        sd[hf] = t.to(dtype)
    stored = next(iter(raw.values())).dtype
    file_type = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(stored, str(stored))
    return config, sd, {"format": "meta", "file_type": file_type, "license": None, "chat_template": None}


def meta_params(config: ModelConfig) -> dict:
    """params.json for `config` (Meta's keys, plus `hidden_dim` and the full rope scaling so it round-trips)."""
    p = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
         "n_kv_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
         "hidden_dim": config.intermediate_size, "multiple_of": 256, "ffn_dim_multiplier": None,
         "norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
         "max_seq_len": config.max_position_embeddings, "use_scaled_rope": False}
    rs = config.rope_scaling
    if rs is not None:
        if rs.rope_type != "llama3":
            raise ModelFormatError(None, f"Meta params.json cannot express rope scaling {rs.rope_type!r}")
        p.update(use_scaled_rope=True, rope_scaling_factor=rs.factor, rope_low_freq_factor=rs.low_freq_factor,
                 rope_high_freq_factor=rs.high_freq_factor,
                 rope_original_max_position_embeddings=rs.original_max_position_embeddings)
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ModelFormatError(None, "Meta checkpoints need head_dim * n_heads == dim")
    return p


def save_meta(dirpath, config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write params.json + consolidated.00.pth (Meta names, interleaved q/k), atomically as a directory."""
    dirpath = Path(dirpath)
    params = meta_params(config)
    out = {}
    for name, t in state_dict.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        if ".q_proj." in name or ".k_proj." in name:
            t = permute_qk(t, config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads)
        out[hf_to_meta_name(name)] = t.contiguous().clone()
    with atomic_dir(dirpath) as tmp:
        torch.save(out, tmp / "consolidated.00.pth")
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return dirpath
