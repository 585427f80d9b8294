"""Facts about a model read from its headers, never its weights: architecture numbers, parameter count,
quantization, template, license. `inspect_model` serves `llamaforge show`; `model_details` serves Ollama's
/api/tags, /api/ps and /api/show `details` for every model, loaded or not (cached by path, size and mtime)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from .._fs import read_bounded
from ..errors import LlamaforgeError, ModelFormatError

_CACHE: dict[tuple, dict] = {}
_CACHE_MAX = 256
_CACHE_LOCK = threading.Lock()


def inspect_model(path: Path) -> dict:
    """Architecture facts of a model file/directory without loading (GGUF: header only, no dequantization)."""
    from ..formats.sniff import detect_format
    fmt, path = detect_format(path)
    if fmt == "gguf":
        from ..formats.gguf import file_type_name, read_gguf
        gf = read_gguf(path)
        try:
            meta = gf.metadata
            arch = meta.get("general.architecture")
            params = sum(t.numel for n, t in gf.tensors.items() if n != "rope_freqs.weight")
            return {"format": "gguf", "architecture": arch, "parameters": params,
                    "quantization": file_type_name(gf),
                    "context_length": meta.get(f"{arch}.context_length"),
                    "embedding_length": meta.get(f"{arch}.embedding_length"),
                    "layers": meta.get(f"{arch}.block_count"),
                    "vocab_size": gf.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in gf.tensors
                    else None,
                    "template": meta.get("tokenizer.chat_template"), "license": meta.get("general.license"),
                    "model_name": meta.get("general.name")}
        finally:
            gf.close()
    return _inspect_hf(path) if fmt == "hf" else _inspect_meta(path)


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(read_bounded(p, 16 << 20, p.name))   # a config file, not weights
    except (LlamaforgeError, UnicodeDecodeError, ValueError) as e:
        raise ModelFormatError(p, f"unreadable JSON: {e}") from None
    if not isinstance(d, dict):
        raise ModelFormatError(p, "not a JSON object")
    return d


def _inspect_hf(path: Path) -> dict:
    from ..config import ModelConfig
    from ..formats import safetensors as st
    cfg = _read_json(path / "config.json")
    config = ModelConfig.from_hf_config(cfg, path=path / "config.json")
    params, dtypes = 0, {}
    for f in sorted(path.glob("*.safetensors")):
        for _, (dtype, shape) in st.validate_safetensors(f).items():
            n = 1
            for d in shape:
                n *= d
            params += n
            dtypes[dtype] = dtypes.get(dtype, 0) + n
    quant = max(dtypes, key=dtypes.get) if dtypes else str(cfg.get("torch_dtype") or "unknown").upper()
    return {"format": "hf", "architecture": "llama", "parameters": params or config.num_parameters,
            "quantization": {"F32": "F32", "F16": "F16", "BF16": "BF16"}.get(quant, quant),
            "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
            "layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "template": st.dir_chat_template(path), "license": st.model_card_license(path),
            "model_name": cfg.get("_name_or_path")}


def _inspect_meta(path: Path) -> dict:
    params = _read_json(path / "params.json")
    return {"format": "meta", "architecture": "llama", "parameters": None, "quantization": "BF16",
            "context_length": params.get("max_seq_len"), "embedding_length": params.get("dim"),
            "layers": params.get("n_layers"), "vocab_size": params.get("vocab_size"), "template": None,
            "license": None, "model_name": None}


def human_parameters(n: int | None) -> str:
    """A parameter count as Ollama prints it: 134.52M, 1.2B, 8B, 500K."""
    if not n:
        return ""
    if n >= 1_000_000_000:
        v = n / 1e9
        return f"{v:.0f}B" if v == int(v) else f"{v:.1f}B"
    if n >= 1_000_000:
        v = n / 1e6
        return f"{v:.0f}M" if v == int(v) else f"{v:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}K"
    return str(n)


def inspect_cached(path: Path) -> dict:
    """`inspect_model(path)`, remembered while the file's size and mtime stay the same."""
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    info = inspect_model(path)
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = info
    return info


def model_details(path: Path | None, fmt: str | None = None) -> dict:
    """Ollama's `details` object for the model at `path` (header facts; blanks when it cannot be read)."""
    d = {"parent_model": "", "format": fmt or "", "family": "llama", "families": ["llama"],
         "parameter_size": "", "quantization_level": ""}
    if path is None:
        return d
    try:
        info = inspect_cached(Path(path))
    except (LlamaforgeError, OSError):
        return d   # a damaged model is still listed (and can be removed); its details stay blank
    d.update(format=info.get("format") or d["format"], parameter_size=human_parameters(info.get("parameters")),
             quantization_level=str(info.get("quantization") or ""))
    if info.get("architecture"):
        d.update(family=str(info["architecture"]), families=[str(info["architecture"])])
    return d


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 (hex) of a model file, or for a directory of its files' digests with their relative paths; for
    models served from a path, which have no manifest. Remembered while size and mtime stay the same."""
    import hashlib

    from .blobs import CHUNK
    from .sources import model_dir_files
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        hit = _DIGESTS.get(key)
    if hit is not None:
        return hit

    def one(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    if path.is_dir():
        listing = "".join(f"{rel}\0{one(p)}\n" for rel, p in model_dir_files(path))
        digest = hashlib.sha256(listing.encode()).hexdigest()
    else:
        digest = one(path)
    with _CACHE_LOCK:
        if len(_DIGESTS) >= _CACHE_MAX:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest
