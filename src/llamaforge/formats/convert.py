"""Model conversion: any loadable model (GGUF, HF directory, Meta directory) to an HF directory or a GGUF file.

Shared by `llamaforge convert` and `llamaforge finetune merge`. Weights go through float32 (a quantized GGUF is
dequantized once) and are written by the formats writers (`write_gguf`, `save_hf`), which create the output
atomically. The tokenizer travels too:
  GGUF -> GGUF   `tokenizer.*` metadata copied with its exact value types;
  HF   -> HF     tokenizer files copied;
  HF   -> GGUF   `tokenizer.*` keys built from tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece);
  GGUF -> HF     tokenizer.json etc. made by transformers' GGUF tokenizer converter when transformers is installed.

Outputs: the parent directory of the output must exist (nothing is created above it), an existing output is
replaced only when asked, and files get the permissions the umask gives (`_fs` writers).
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequestError, LlamaforgeError, ModelFormatError
from .sniff import detect_format
from .._fs import loads_json, read_bounded

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json", "chat_template.jinja", "added_tokens.json")
TYPES = {"hf": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "q8_0", "q4_0", "q4_1")}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------ sources
@dataclass
class Source:
    """What a conversion carries over from the model it starts from, besides the weights.

    tokenizer_metadata / value_types: a GGUF's `tokenizer.*` keys with their exact types; path: the GGUF file or
    the model directory (HF/Meta tokenizer files are read from it)."""

    format: str
    path: Path
    license: str | None = None
    tokenizer_metadata: dict | None = None
    value_types: dict = field(default_factory=dict)


def source_info(path) -> Source:
    """The non-weight facts of a model file or directory (a GGUF's header only: no tensor is read)."""
    fmt, path = detect_format(path)
    if fmt == "gguf":
        from ..gguf_header import read_header
        h = read_header(path, tensors=False)
        tok = {k: v for k, v in h.metadata.items() if k.startswith("tokenizer.")} or None
        return Source(fmt, path, h.metadata.get("general.license"), tok,
                      {k: v for k, v in h.value_types.items() if tok and k in tok})
    if fmt == "hf":
        from .safetensors import model_card_license
        return Source(fmt, path, model_card_license(path))
    return Source(fmt, path)   # Meta checkpoints carry no license field


def read_source(path):
    """(Source, config, float32 state_dict) of a GGUF file, HF directory or Meta directory."""
    import torch
    src = source_info(path)
    if src.format == "gguf":
        from .gguf import gguf_config, iter_gguf_state_dict, read_gguf
        gf = read_gguf(src.path)
        config = gguf_config(gf)
        sd = dict(iter_gguf_state_dict(gf, config, torch.float32))
        gf.close()
    elif src.format == "hf":
        from .safetensors import load_hf
        config, sd, _ = load_hf(src.path, torch.float32)
    else:
        from .meta import load_meta
        config, sd, _ = load_meta(src.path, torch.float32)
    return src, config, sd


# ------------------------------------------------------------------------------------------------------ tokenizers
def hf_tokenizer_files(src: Path) -> dict:
    return {name: src / name for name in HF_TOKENIZER_FILES if (src / name).is_file()}


def gguf_tokenizer_to_hf(gguf_path: Path) -> dict:
    """{file name: bytes} of an HF tokenizer rebuilt from a GGUF's vocabulary (transformers' converter)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        _warn("transformers is not installed: the HF directory gets no tokenizer files")
        return {}
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        # transformers wants a *.gguf file name; a store blob has none, so link it under one.
        link = Path(tmp) / "model.gguf"
        link.symlink_to(Path(gguf_path).resolve())
        try:
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file="model.gguf")
        except Exception as e:   # an unsupported vocabulary type: the weights are still worth converting
            _warn(f"could not convert the GGUF tokenizer ({type(e).__name__}: {str(e)[:120]}); "
                  "the HF directory gets no tokenizer files")
            return {}
        out_dir = Path(tmp) / "tok"
        tok.save_pretrained(out_dir)
        return {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}


# GGUF token types (llama.cpp `llama_token_type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def hf_tokenizer_to_gguf(src: Path, vocab_size: int | None = None) -> tuple[dict | None, dict | None]:
    """(`tokenizer.*` metadata, value types) for an HF directory's tokenizer; (None, None) if it has none.

    tokenizer.json with byte-level BPE -> GGUF "gpt2" (tokens, types, merges); tokenizer.json with byte-fallback
    BPE (SentencePiece converted by HF) -> GGUF "llama" with scores = -(merge rank), which keeps SentencePiece's
    merge order; a tokenizer.model -> GGUF "llama" with its own scores. The token list is cut or padded to
    `vocab_size` (the embedding rows): GGUF readers expect exactly one token per row.
    """
    from gguf.vocab import SpecialVocab
    tj = src / "tokenizer.json"
    if tj.is_file():
        data = loads_json(read_bounded(tj, 256 << 20, "tokenizer.json"))
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            if (src / "tokenizer.model").is_file():
                return _spm_model_tokenizer(src, vocab_size)
            _warn(f"tokenizer.json model type {model.get('type')!r} has no GGUF equivalent here; "
                  "the GGUF gets no vocabulary")
            return None, None
        spm_like = bool(model.get("byte_fallback"))
        vocab = {str(k): int(v) for k, v in (model.get("vocab") or {}).items()}
        added = {int(t["id"]): t for t in data.get("added_tokens") or []}
        for i, t in added.items():
            vocab.setdefault(t["content"], i)
        n = max(vocab.values()) + 1 if vocab else 0
        if vocab_size is not None and n > vocab_size:
            dropped = sorted(i for i in vocab.values() if i >= vocab_size)
            _warn(f"dropping {len(dropped)} tokenizer entries beyond the model's {vocab_size} embedding rows")
        n = vocab_size if vocab_size is not None else n
        tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
        for text, i in vocab.items():
            if i < n:
                tokens[i], types[i] = text, NORMAL
        unk = model.get("unk_token")
        for i, t in added.items():
            if i < n:
                types[i] = CONTROL if t.get("special") else USER_DEFINED
        merges = _merges(model)
        meta: dict = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
        if spm_like:
            # Score = -(rank of the merge that makes the token): SentencePiece merges highest score first.
            scores = [0.0] * n
            for rank, (a, b) in enumerate(merges):
                i = vocab.get(a + b)
                if i is not None and i < n and scores[i] == 0.0:
                    scores[i] = -float(rank + 1)
            for i in range(n):
                if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tokens[i]) and types[i] == NORMAL:
                    types[i] = BYTE
                if types[i] in (CONTROL, USER_DEFINED, UNUSED):
                    scores[i] = -1000.0
            unk_id = vocab.get(unk or _special_name(src, "unk_token") or "")
            if unk_id is not None and unk_id < n:
                types[unk_id] = UNKNOWN
            meta.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                         "tokenizer.ggml.scores": scores})
        else:
            meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(data),
                         "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges]})
        _special_keys(meta, SpecialVocab(src, load_merges=False, n_vocab=n))
        return meta, None
    if (src / "tokenizer.model").is_file():
        return _spm_model_tokenizer(src, vocab_size)
    return None, None


def _special_name(src: Path, key: str) -> str | None:
    """Text of a special token named in tokenizer_config.json (e.g. unk_token), if any."""
    try:
        name = loads_json(read_bounded(src / "tokenizer_config.json", 64 << 20, "tokenizer_config.json")).get(key)
    except (LlamaforgeError, ValueError, AttributeError):
        return None
    name = name.get("content") if isinstance(name, dict) else name
    return name if isinstance(name, str) else None


def _merges(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json merges, either "a b" strings (older files) or [a, b] pairs (newer files)."""
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            a, _, b = m.partition(" ")
        else:
            a, b = m
        out.append((a, b))
    return out


def _spm_model_tokenizer(src: Path, vocab_size: int | None = None):
    from gguf.vocab import SentencePieceVocab, SpecialVocab
    try:
        v = SentencePieceVocab(src)
    except Exception as e:   # e.g. a Llama 3 tiktoken file named tokenizer.model
        _warn(f"tokenizer.model is not a SentencePiece model ({type(e).__name__}); the GGUF gets no vocabulary")
        return None, None
    tokens, scores, types = [], [], []
    for text, score, ttype in v.all_tokens():
        tokens.append(text.decode("utf-8", errors="replace"))
        scores.append(float(score))
        types.append(int(ttype))
    n = vocab_size if vocab_size is not None else len(tokens)
    if len(tokens) > n:
        _warn(f"dropping {len(tokens) - n} tokenizer entries beyond the model's {n} embedding rows")
    tokens, scores, types = tokens[:n], scores[:n], types[:n]
    for i in range(len(tokens), n):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}
    _special_keys(meta, SpecialVocab(src, load_merges=False, n_vocab=n))
    return meta, None


def _special_keys(meta: dict, sv) -> None:
    """Special token ids, add-BOS/EOS flags and the chat template found by gguf's SpecialVocab."""
    from gguf import Keys
    k = Keys.Tokenizer
    id_keys = {"bos": k.BOS_ID, "eos": k.EOS_ID, "unk": k.UNK_ID, "sep": k.SEP_ID, "pad": k.PAD_ID,
               "mask": k.MASK_ID}
    for typ, tid in sv.special_token_ids.items():
        if typ in id_keys:
            meta[id_keys[typ]] = int(tid)
    for typ, on in sv.add_special_token.items():
        if typ in ("bos", "eos"):
            meta[k.ADD_BOS if typ == "bos" else k.ADD_EOS] = bool(on)
    if isinstance(sv.chat_template, str):
        meta["tokenizer.chat_template"] = sv.chat_template


# Pre-tokenizer regexes llama.cpp knows by name (facts from llama.cpp's `llama-vocab.cpp`).
_LLAMA3_RE = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _pre_tokenizer_name(data: dict) -> str:
    text = json.dumps(data.get("pre_tokenizer") or {})
    if json.dumps(_LLAMA3_RE)[1:-1] in text:
        return "llama-bpe"
    if '"individual_digits": true' in text and "ByteLevel" in text:
        return "smollm"
    return "default"


# ------------------------------------------------------------------------------------------------------ rope
def hf_rope_config(config):
    """The config with GGUF `rope_freqs` factors turned back into an HF `rope_scaling` (llama3 or linear).

    GGUF stores only the per-frequency divisors; HF needs the parameters that produced them. They are found by
    trying the values Llama 3.x checkpoints use; factors that match none raise rather than write a model whose
    positions would silently differ.
    """
    import torch
    from ..config import RopeScaling
    from ..model.rope import llama3_freq_factors
    rs = config.rope_scaling
    if rs is None or rs.rope_type != "factors":
        return config
    f = torch.tensor(rs.freq_factors, dtype=torch.float32)
    if torch.allclose(f, torch.ones_like(f)):
        return config.replace(rope_scaling=None)
    if torch.allclose(f, f[0].expand_as(f)):
        return config.replace(rope_scaling=RopeScaling("linear", factor=float(f[0])))
    factor = float(f.max())
    for orig in sorted({2 ** k for k in range(4, 22)} | {config.max_position_embeddings // max(1, round(factor))}):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 2.0, 8.0, 1.0):
                if high <= low or orig <= 0:
                    continue
                cand = RopeScaling("llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                                   original_max_position_embeddings=orig)
                if torch.allclose(llama3_freq_factors(config.replace(rope_scaling=cand)), f, rtol=1e-4, atol=1e-5):
                    return config.replace(rope_scaling=cand)
    raise ModelFormatError(None, "the GGUF's rope_freqs factors match no Hugging Face rope_scaling; "
                                 "convert it to GGUF instead")


# ------------------------------------------------------------------------------------------------------ writing
def check_output(out, to: str, type_: str | None, *, force: bool = False) -> tuple[Path, str]:
    """Validate the output before any slow work: (out path, weight type). The parent directory must exist
    (a typo in --out must not create directories), an existing output is replaced only with force."""
    to = str(to).lower()
    if to not in TYPES:
        raise InvalidRequestError(f"--to must be hf or gguf, got {to!r}", field="to")
    type_ = (type_ or "f16").lower()
    if type_ not in TYPES[to]:
        raise InvalidRequestError(f"--type {type_} is not available for --to {to} (choose from "
                                  f"{', '.join(TYPES[to])})", field="type")
    out = Path(out).expanduser()
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ModelFormatError(out, f"the directory {parent} does not exist (create it first)")
    if out.exists() and not force:
        raise ModelFormatError(out, "already exists (pass --force to replace it)")
    if to == "gguf" and out.is_dir():
        raise ModelFormatError(out, "is a directory; --to gguf writes a file")
    return out, type_


def write_model(out, to: str, config, state_dict, source: Source | None, type_: str | None = None, *,
                force: bool = False) -> Path:
    """Write `state_dict` (HF names, float) as an HF directory or a GGUF file, with the tokenizer, chat template
    and license of `source` (None: weights only). Returns the output path."""
    import torch
    out, type_ = check_output(out, to, type_, force=force)
    license_ = source.license if source else None
    if to == "gguf":
        from .gguf_write import write_gguf
        tok_meta, value_types = (source.tokenizer_metadata, source.value_types) if source else (None, None)
        if tok_meta is None and source is not None and source.format in ("hf", "meta"):
            tok_meta, value_types = hf_tokenizer_to_gguf(source.path, config.vocab_size)
        if tok_meta is None:
            _warn("the source has no tokenizer: the GGUF carries weights only")
        extra = {"general.license": license_} if license_ else None
        write_gguf(out, config, state_dict, tokenizer_metadata=tok_meta, file_type=type_,
                   value_types=value_types or None, extra_metadata=extra)
    else:
        from .safetensors import save_hf
        tok_files: dict = {}
        if source is not None and source.format == "gguf":
            tok_files = gguf_tokenizer_to_hf(source.path) if source.tokenizer_metadata else {}
        elif source is not None:
            tok_files = hf_tokenizer_files(source.path)
        config = hf_rope_config(config)
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[type_]
        save_hf(out, config, state_dict, tokenizer_files=tok_files or None, dtype=dtype)
    return out


def convert(path, to: str, out, type_: str | None = None, *, force: bool = False) -> Path:
    """Convert the model at `path` (GGUF file, HF or Meta directory) to `to` ("hf" | "gguf") at `out`."""
    check_output(out, to, type_, force=force)   # fail before reading gigabytes
    src, config, sd = read_source(path)
    return write_model(out, to, config, sd, src, type_, force=force)
