"""Write a Llama model as GGUF (F32, F16, Q8_0, Q4_0 or Q4_1) with the `gguf` package's writer, atomically.

Layout follows llama.cpp's converter: HF names -> GGUF names, q/k rows re-permuted to the interleaved rotary
layout (`permute_qk`, the inverse of what the reader undoes), 1-D tensors (norms, biases) kept in F32,
`llama.*` hyper-parameters, `rope_freqs` for Llama 3.1-style scaling, and optional `tokenizer.*` metadata.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..model.rope import llama3_freq_factors, permute_qk
from .._fs import atomic_file
from .gguf_names import hf_to_gguf_name

FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}   # llama.cpp LlamaFileType values
# In 4-bit files the embedding table and the output head stay Q8_0: they set what every logit sees (llama.cpp's
# quantizer likewise keeps them at higher precision); every other matrix uses the file's type.
_KEEP_Q8_IN_4BIT = ("token_embd.weight", "output.weight")

# Value types of well-known tokenizer keys (the reader returns plain Python values, so types must be restored).
_KEY_TYPES = {
    "tokenizer.ggml.model": ("STRING", None), "tokenizer.ggml.pre": ("STRING", None),
    "tokenizer.ggml.tokens": ("ARRAY", "STRING"), "tokenizer.ggml.merges": ("ARRAY", "STRING"),
    "tokenizer.ggml.scores": ("ARRAY", "FLOAT32"), "tokenizer.ggml.token_type": ("ARRAY", "INT32"),
    "tokenizer.chat_template": ("STRING", None),
}


def _value_type(key: str, value, value_types: Mapping | None):
    from gguf import GGUFValueType as V
    if value_types and key in value_types:
        t, sub = value_types[key]
        return V[t.upper()], (V[sub.upper()] if sub else None)
    if key in _KEY_TYPES:
        t, sub = _KEY_TYPES[key]
        return V[t], (V[sub] if sub else None)
    if key.endswith("_token_id"):
        return V.UINT32, None

    def scalar(v):
        if isinstance(v, bool):
            return V.BOOL
        if isinstance(v, int):
            return V.INT32 if -2**31 <= v < 2**31 else V.INT64
        if isinstance(v, float):
            return V.FLOAT32
        if isinstance(v, str):
            return V.STRING
        raise ModelFormatError(None, f"metadata key {key!r}: cannot store a value of type {type(v).__name__}")
    if isinstance(value, (list, tuple)):
        return V.ARRAY, (scalar(value[0]) if value else V.INT32)
    return scalar(value), None


def _tensor_data(name: str, t: torch.Tensor, file_type: str):
    """(numpy array, ggml raw dtype or None) for one tensor in the requested file type."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if a.ndim < 2 or file_type == "f32":
        return a, None
    if file_type == "f16":
        return a.astype(np.float16), None
    if a.shape[-1] % 32:  # Q8_0/Q4_x blocks are 32 values of a row; odd rows stay F16 as llama.cpp does
        return a.astype(np.float16), None
    qtype = Q.Q8_0 if file_type == "q8_0" or name in _KEEP_Q8_IN_4BIT else Q[file_type.upper()]
    return quantize(a, qtype), qtype


def _tokenizer_mapping(tok):
    """`tokenizer.*` metadata from a mapping or from a tokenizer object that can describe itself."""
    if tok is None or isinstance(tok, Mapping):
        return tok
    meta = getattr(tok, "gguf_metadata", None)
    meta = meta() if callable(meta) else meta
    if isinstance(meta, Mapping):
        return meta
    warnings.warn(f"{type(tok).__name__} has no GGUF metadata (pass tokenizer_metadata=); "
                  "the GGUF file will carry no vocabulary", stacklevel=3)
    return None


def write_gguf(path, config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
               tokenizer_metadata: Mapping[str, Any] | None = None, file_type: str = "f16", *,
               tokenizer: Mapping[str, Any] | None = None, value_types: Mapping | None = None,
               extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `state_dict` (HF names) as a GGUF file at `path`; the file appears only once complete.

    tokenizer_metadata (alias `tokenizer`): `tokenizer.*` keys to copy, e.g. `read_gguf(src).metadata`
    (other keys are ignored); `value_types` (e.g. `read_gguf(src).value_types`) keeps their exact types.
    A tokenizer object is accepted if it offers `gguf_metadata` (a mapping or a method returning one).
    extra_metadata: further `general.*` keys (name, license, ...).
    """
    import gguf
    file_type = file_type.lower()
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")
    tok = _tokenizer_mapping(tokenizer_metadata if tokenizer_metadata is not None else tokenizer)
    path = Path(path)
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(config.name)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_rope_freq_base(config.rope_theta)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        w.add_rope_dimension_count(config.head_dim)
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            w.add_key_length(config.head_dim)
            w.add_value_length(config.head_dim)
        w.add_file_type(FILE_TYPES[file_type])
        if file_type in ("q8_0", "q4_0", "q4_1"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        rs = config.rope_scaling
        if rs is not None and rs.rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rs.factor)
        for key, value in (extra_metadata or {}).items():
            vt, sub = _value_type(key, value, None)
            w.add_key_value(key, value, vt, sub)
        for key, value in (tok or {}).items():
            if key.startswith("tokenizer."):
                vt, sub = _value_type(key, value, value_types)
                w.add_key_value(key, value, vt, sub)

        if rs is not None and rs.rope_type in ("llama3", "factors"):
            w.add_tensor("rope_freqs.weight", llama3_freq_factors(config).numpy().astype(np.float32))
        for name, t in state_dict.items():
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue  # no output.weight in the file is how GGUF says "tied"
            try:
                gname = hf_to_gguf_name(name)
            except KeyError:
                raise ModelFormatError(path, f"cannot map tensor {name!r} to a GGUF name") from None
            if ".q_proj." in name or ".k_proj." in name:
                t = permute_qk(t, config.num_attention_heads if ".q_proj." in name
                               else config.num_key_value_heads)
            data, raw_dtype = _tensor_data(gname, t, file_type)
            if raw_dtype is None:
                w.add_tensor(gname, data)
            else:
                w.add_tensor(gname, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
