"""`load_model(path)`: sniff the format, build the model on the meta device, assign the real tensors.

Formats (told apart by `formats.sniff`): a GGUF file (magic bytes), a Hugging Face directory (`config.json` +
safetensors), a Meta directory (`params.json` + `consolidated.*.pth`). Building on `meta` and
`load_state_dict(assign=True)` means the only full copy of the weights in memory is the one the loader produced
(gpt-fast does the same).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..config import ModelConfig
from ..errors import InvalidRequestError, ModelFormatError
from .loaded import LoadedModel
from .sniff import detect_format

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tensors some checkpoints carry that hold no weights (old HF Llama exports saved the rotary table).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def resolve_dtype(dtype) -> torch.dtype:
    """None -> float32; a torch dtype or a name among float32 / bfloat16 / float16 (and short spellings)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _SUPPORTED_DTYPES:
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise InvalidRequestError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16", field="dtype")


def build_model(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], path, *,
                device="cpu", source: str = "hf") -> torch.nn.Module:
    """Llama(config) with `state_dict` assigned in place, after checking every name and shape."""
    from ..model import Llama
    from .architecture import check_tensor_shapes
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # a tied copy some exporters write; the embedding is the one used
    # Names and shapes checked against the config before a single module is built (a crafted layer count
    # must not build millions of layers first).
    check_tensor_shapes(config, {k: tuple(v.shape) for k, v in sd.items()}, path, source)
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict(sd, assign=True, strict=False)  # names checked above; tied lm_head absent
    model.tie_weights()
    model.eval()
    return model.to(device)


def load_model(path, *, dtype=None, device="cpu", quant=None, **kw) -> LoadedModel:
    """Load a GGUF file, HF directory or Meta directory as a `LoadedModel` (see module docstring).

    dtype: float32 (default), bfloat16 or float16 for the weights and activations.
    quant: optional in-memory weight format handed to `llamaforge.model.quant.quantize_model`.
    """
    if kw:
        raise TypeError(f"load_model() got unexpected keyword arguments: {', '.join(sorted(kw))}")
    dt = resolve_dtype(dtype)
    fmt, path = detect_format(path)
    gguf_file = None
    if fmt == "gguf":
        from .gguf import file_type_name, gguf_config, iter_gguf_state_dict, read_gguf
        gguf_file = read_gguf(path)
        config = gguf_config(gguf_file)
        if quant is not None:
            from ..model.quant import resolve_quant
            quant = resolve_quant(quant, dtype, device, file_type_name(gguf_file))
        # Packed formats are built straight from the file's blocks (model.quant): no float copy is made.
        sd = {} if quant in ("q4", "int8") else dict(iter_gguf_state_dict(gguf_file, config, dt))
        meta = gguf_file.metadata
        metadata = {
            "format": "gguf", "file_type": file_type_name(gguf_file), "license": meta.get("general.license"),
            "chat_template": meta.get("tokenizer.chat_template"), "gguf_version": gguf_file.version,
        }
        tokenizer = _gguf_tokenizer(meta, path)
    elif fmt == "hf":
        from .safetensors import load_hf
        config, sd, metadata = load_hf(path, dt)
        tokenizer = _dir_tokenizer(path)
    else:
        from .meta import load_meta
        config, sd, metadata = load_meta(path, dt)
        tokenizer = _dir_tokenizer(path)
    metadata.update(context_length=config.max_position_embeddings, architecture="llama", name=config.name)
    metadata.setdefault("license", None)
    metadata.setdefault("chat_template", None)
    if tokenizer is not None and metadata.get("chat_template") is None:
        metadata["chat_template"] = getattr(tokenizer, "chat_template", None)
    try:
        if fmt == "gguf" and quant in ("q4", "int8"):
            from .packed import load_gguf_quantized
            model = load_gguf_quantized(gguf_file, config, quant, device)
        else:
            model = build_model(config, sd, path, device=device, source=fmt)
            if quant is not None:
                from ..model.quant import quantize_model
                model = quantize_model(model, quant)
    except ModelFormatError as e:
        if e.path is None:  # raised below the file level: say which file it was
            raise ModelFormatError(path, e.reason) from None
        raise
    del sd
    if quant is not None:
        metadata["quant"] = getattr(model, "_quant", None) or ("none" if quant in ("auto", "none") else quant)
    return LoadedModel(config=config, model=model, tokenizer=tokenizer, path=path, metadata=metadata)


def _gguf_tokenizer(meta: dict, path: Path):
    if "tokenizer.ggml.model" not in meta:
        return None  # a weights-only GGUF (e.g. a test model) has no vocabulary
    from ..tokenizer.load import tokenizer_from_gguf_metadata
    return tokenizer_from_gguf_metadata(meta, path)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")


def _dir_tokenizer(path: Path):
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None  # weights-only directory (e.g. a test model): no tokenizer rather than an error
    from ..tokenizer.load import load_tokenizer
    return load_tokenizer(path)
