"""Hugging Face model directories: config.json + model.safetensors (or shards with an index); read and write.

Each safetensors header is validated before `safe_open` maps the file: header size against the file and a cap,
JSON object, known dtypes, shapes matching byte ranges, and byte ranges that tile the data section exactly
(no gaps, overlaps or offsets past the end). Tensors are then read lazily, one at a time.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Mapping

import torch

from ..config import ModelConfig
from ..errors import LlamaforgeError, ModelFormatError
from .._fs import atomic_dir, chmod_as_created, read_bounded

MAX_HEADER_BYTES = 100 * 1024 * 1024   # the safetensors library's own limit
MAX_CONFIG_BYTES = 4 << 20   # config.json: a few KiB in practice
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def validate_safetensors(path) -> dict:
    """Check a .safetensors file's header; return {name: (dtype, shape)}. ModelFormatError if malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(path, f"truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise ModelFormatError(path, f"safetensors header of {n} bytes is larger than the "
                                             f"{MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise ModelFormatError(path, f"safetensors header claims {n} bytes but the file has {size - 8}")
            raw = f.read(n)
    except OSError as e:
        raise ModelFormatError(path, f"cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(path, f"safetensors header is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelFormatError(path, "safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ModelFormatError(path, "safetensors header is not a JSON object")
    data_len = size - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ModelFormatError(path, f"tensor {name!r}: header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_SIZES:
            raise ModelFormatError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise ModelFormatError(path, f"tensor {name!r}: invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)):
            raise ModelFormatError(path, f"tensor {name!r}: invalid data_offsets {offs!r}")
        begin, end = offs
        if begin > end or end > data_len:
            raise ModelFormatError(path, f"tensor {name!r}: data_offsets {offs} are outside the {data_len}-byte "
                                         f"data section")
        numel = 1
        for d in shape:
            numel *= d
        if numel * _DTYPE_SIZES[dtype] != end - begin:
            raise ModelFormatError(path, f"tensor {name!r}: shape {shape} of {dtype} needs "
                                         f"{numel * _DTYPE_SIZES[dtype]} bytes, offsets span {end - begin}")
        spans.append((begin, end, name))
        out[name] = (dtype, tuple(shape))
    # The byte ranges must tile the data section: any gap or overlap means a corrupt or crafted file.
    pos = 0
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise ModelFormatError(path, f"tensor {name!r} overlaps the previous tensor (offset {begin} < {pos})")
        if begin > pos:
            raise ModelFormatError(path, f"gap of {begin - pos} bytes before tensor {name!r}")
        pos = end
    if pos != data_len:
        raise ModelFormatError(path, f"{data_len - pos} bytes after the last tensor are not described by the header")
    return out


def _shard_files(dirpath: Path) -> dict[str, Path]:
    """{tensor name: shard file} from the index, or every tensor of model.safetensors."""
    index = dirpath / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(read_bounded(index, MAX_CONFIG_BYTES * 4, INDEX_NAME))
        except (LlamaforgeError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise ModelFormatError(index, f"unreadable shard index: {why}") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ModelFormatError(index, "shard index has no weight_map object")
        out = {}
        for name, fname in wm.items():
            # Shards live next to the index; a path component would let a crafted index read other files.
            if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
                raise ModelFormatError(index, f"invalid shard file name {fname!r} for tensor {name!r}")
            if not fname.endswith(".safetensors"):
                raise ModelFormatError(index, f"shard {fname!r} is not a .safetensors file")
            out[name] = dirpath / fname
        return out
    single = dirpath / SINGLE_NAME
    if not single.is_file():
        found = sorted(p.name for p in dirpath.glob("*.safetensors"))
        if len(found) == 1:
            single = dirpath / found[0]
        elif (dirpath / "pytorch_model.bin").exists():
            raise ModelFormatError(dirpath, "only pytorch_model.bin found; pickled .bin weights are not loaded, "
                                            "convert them to safetensors")
        else:
            raise ModelFormatError(dirpath, f"no {SINGLE_NAME} (or {INDEX_NAME}) in the directory")
    return {name: single for name in validate_safetensors(single)}


def load_hf_state_dict(dirpath, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (single file or shards), validated, cast to `dtype` (floats only)."""
    from safetensors import SafetensorError, safe_open
    dirpath = Path(dirpath)
    where = _shard_files(dirpath)
    by_file: dict[Path, list[str]] = {}
    for name, f in where.items():
        by_file.setdefault(f, []).append(name)
    sd = {}
    for f, names in by_file.items():
        if not f.is_file():
            raise ModelFormatError(f, "shard listed in the index is missing")
        header = validate_safetensors(f)
        missing = [n for n in names if n not in header]
        if missing:
            raise ModelFormatError(f, f"tensor {missing[0]!r} listed in the index is not in this shard")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for n in names:
                    if header[n][0] not in _FLOAT_DTYPES:
                        raise ModelFormatError(f, f"tensor {n!r} has non-float dtype {header[n][0]}")
                    sd[n] = sf.get_tensor(n).to(dtype)
        except SafetensorError as e:
            raise ModelFormatError(f, f"safetensors error: {e}") from None
    return sd


def hf_config(dirpath) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw dict) of a Hugging Face directory's config.json (read bounded; ConfigError naming the key)."""
    cfg_path = Path(dirpath) / "config.json"
    try:
        cfg = json.loads(read_bounded(cfg_path, MAX_CONFIG_BYTES, "config.json"))
    except (LlamaforgeError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ModelFormatError(cfg_path, f"unreadable config.json: {why}") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(cfg_path, "config.json is not a JSON object")
    return ModelConfig.from_hf_config(cfg, path=cfg_path), cfg


def hf_tensor_shapes(dirpath) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of an HF directory from the safetensors headers alone (no tensor data read)."""
    dirpath = Path(dirpath)
    where = _shard_files(dirpath)
    headers: dict[Path, dict] = {}
    out = {}
    for name, f in where.items():
        if f not in headers:
            if not f.is_file():
                raise ModelFormatError(f, "shard listed in the index is missing")
            headers[f] = validate_safetensors(f)
        if name not in headers[f]:
            raise ModelFormatError(f, f"tensor {name!r} listed in the index is not in this shard")
        out[name] = headers[f][name][1]
    return out


def load_hf(dirpath, dtype: torch.dtype = torch.float32):
    """(ModelConfig, state_dict, metadata) for a Hugging Face Llama directory."""
    dirpath = Path(dirpath)
    config, cfg = hf_config(dirpath)
    sd = load_hf_state_dict(dirpath, dtype)
    if "lm_head.weight" not in sd and not config.tie_word_embeddings:
        raise ModelFormatError(dirpath, "missing tensor 'lm_head.weight' and tie_word_embeddings is false")
    stored = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    file_type = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(str(stored), str(stored).upper())
    metadata = {"format": "hf", "file_type": file_type, "license": model_card_license(dirpath),
                "chat_template": dir_chat_template(dirpath)}
    return config, sd, metadata


MAX_TEMPLATE_FILE_BYTES = 1 << 20          # a chat template file; tokenizer_config.json can hold big token tables
MAX_TOKENIZER_CONFIG_BYTES = 64 << 20


def dir_chat_template(dirpath: Path) -> str | None:
    """The chat template of a Hugging Face directory: chat_template.jinja, else tokenizer_config.json's."""
    dirpath = Path(dirpath)
    jinja = dirpath / "chat_template.jinja"
    try:
        if jinja.is_file():
            return read_bounded(jinja, MAX_TEMPLATE_FILE_BYTES, "chat_template.jinja").decode("utf-8", "replace")
        tc = dirpath / "tokenizer_config.json"
        if tc.is_file():
            try:
                t = json.loads(read_bounded(tc, MAX_TOKENIZER_CONFIG_BYTES, "tokenizer_config.json"))
            except (ValueError, UnicodeDecodeError):
                return None
            t = t.get("chat_template") if isinstance(t, dict) else None
            return t if isinstance(t, str) else None
    except LlamaforgeError as e:   # unreadable or too large
        raise ModelFormatError(dirpath, str(e)) from None
    return None


def model_card_license(dirpath: Path) -> str | None:
    """The `license:` of a Hugging Face model card's YAML front matter (README.md), or None."""
    readme = Path(dirpath) / "README.md"
    if not readme.is_file():
        return None
    try:
        with open(readme, "rb") as f:   # the front matter is at the top: 4 KiB bound the read
            text = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return None
    if text.startswith("---"):
        for line in text.split("\n")[1:]:
            if line.startswith("---"):
                break
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip() or None
    return None


def save_hf(dirpath, config: ModelConfig, state_dict: Mapping[str, torch.Tensor], tokenizer_files=None,
            dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) as a new directory, atomically.

    The directory is assembled under a temporary name next to `dirpath` and renamed into place, so a crash
    leaves either nothing or a complete model. An existing `dirpath` is replaced. A tied `lm_head` is not
    written twice. `tokenizer_files`: paths to copy, or a mapping {file name: bytes | str | path}.
    """
    from safetensors.torch import save_file
    dirpath = Path(dirpath)
    tensors = {}
    for k, v in state_dict.items():
        if config.tie_word_embeddings and k == "lm_head.weight":
            continue
        t = v.detach().to("cpu")
        tensors[k] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    hf_cfg = config.to_hf_config()
    first = next(iter(tensors.values()), None)
    if first is not None:
        hf_cfg["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    with atomic_dir(dirpath) as tmp:
        save_file(tensors, str(tmp / SINGLE_NAME), metadata={"format": "pt"})
        chmod_as_created(tmp / SINGLE_NAME)   # safetensors writes 0600; outputs honour the umask
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
        for name, data in _tokenizer_items(tokenizer_files):
            if Path(name).name != name or name in ("", ".", ".."):
                raise ModelFormatError(name, "tokenizer file names must be plain file names")
            target = tmp / name
            if isinstance(data, str):
                target.write_text(data, encoding="utf-8")
            elif isinstance(data, bytes):
                target.write_bytes(data)
            else:
                shutil.copyfile(data, target)
    return dirpath


def _tokenizer_items(tokenizer_files):
    if not tokenizer_files:
        return []
    if isinstance(tokenizer_files, Mapping):
        return list(tokenizer_files.items())
    return [(Path(p).name, Path(p)) for p in tokenizer_files]
