"""Tokenizers from GGUF `tokenizer.ggml.*` metadata: "llama" (SentencePiece) and "gpt2" (byte-level BPE).

Defaults follow llama.cpp (llama-vocab.cpp): SentencePiece vocabularies add BOS and a space prefix unless the
file says otherwise; BPE vocabularies add BOS only for the llama3 pre-tokenizer unless the file says otherwise.
"""
from __future__ import annotations

import re
import struct
from typing import Any, Mapping

from ..errors import TokenizerError
from .common import EOT_NAMES
from .spm_proto import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED

P = "tokenizer.ggml."
EOG_TEXTS = frozenset(EOT_NAMES)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _list(meta: Mapping[str, Any], key: str, required: bool = True):
    v = meta.get(P + key)
    if v is None:
        if required:
            raise TokenizerError(f"GGUF metadata has no {P + key}")
        return None
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
        raise TokenizerError(f"{P + key} must be an array")
    return list(v)


def _opt_id(meta, key, n):
    v = meta.get(P + key)
    if v is None:
        return None
    v = int(v)
    if v == -1 or v == 0xFFFFFFFF:
        return None
    if not (0 <= v < n):
        raise TokenizerError(f"{P + key} = {v} is outside the vocabulary (size {n})")
    return v


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], path=None):
    """Build the Tokenizer a GGUF file describes. `metadata`: its decoded key/value dict.

    Anything malformed (wrong types, lengths, ids, merges, byte tokens) raises TokenizerError.
    """
    if not isinstance(metadata, Mapping):
        raise TokenizerError("GGUF metadata must be a mapping of key to value")
    try:
        return _build(metadata, path)
    except (TypeError, ValueError, OverflowError, struct.error) as e:
        # Untrusted metadata of the wrong type (a number where a list belongs, a string score, ...).
        raise TokenizerError(f"{path or 'GGUF'}: malformed tokenizer metadata ({type(e).__name__}: {e})") from None


def _build(metadata: Mapping[str, Any], path):
    kind = metadata.get(P + "model")
    if kind is None:
        raise TokenizerError(f"{path or 'GGUF'}: no tokenizer.ggml.model key (no vocabulary in this file)")
    tokens = _list(metadata, "tokens")
    n = len(tokens)
    if n == 0:
        raise TokenizerError("tokenizer.ggml.tokens is empty")
    if not all(isinstance(t, str) for t in tokens):
        raise TokenizerError("tokenizer.ggml.tokens must hold strings")
    for i, t in enumerate(tokens):
        if _SURROGATE.search(t):  # a reader's surrogateescape marks bytes that were not UTF-8
            raise TokenizerError(f"token {i} is not valid UTF-8")
    types = _list(metadata, "token_type", required=False) or [NORMAL] * n
    if len(types) != n:
        raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries but there are {n} tokens")
    types = [NORMAL if t == 0 else int(t) for t in types]
    for i, t in enumerate(tokens):
        # llama.cpp treats these end-of-generation texts as control tokens whatever the file says.
        if t in EOG_TEXTS and types[i] != CONTROL:
            types[i] = CONTROL
    arch = metadata.get("general.architecture")
    declared = metadata.get(f"{arch}.vocab_size") if arch else None
    if declared is not None and int(declared) != n:
        raise TokenizerError(f"the vocabulary has {n} tokens but {arch}.vocab_size is {declared}")
    common = dict(
        bos_id=_opt_id(metadata, "bos_token_id", n), eos_id=_opt_id(metadata, "eos_token_id", n),
        chat_template=metadata.get("tokenizer.chat_template"),
    )
    eot = {_opt_id(metadata, k, n) for k in ("eot_token_id", "eom_token_id")} - {None}
    if kind == "llama":
        return _spm(metadata, tokens, types, common, eot)
    if kind == "gpt2":
        return _bpe(metadata, tokens, types, common, eot)
    raise TokenizerError(f"unsupported tokenizer.ggml.model {kind!r} (supported: 'llama', 'gpt2')")


def _flag(meta, key, default: bool) -> bool:
    v = meta.get(P + key)
    return default if v is None else bool(v)


def _with_eot(tok, eot):
    if eot:
        tok.eot_ids = frozenset(tok.eot_ids | eot)
    return tok


def _spm(meta, tokens, types, common, eot):
    from .sentencepiece import SentencePieceTokenizer, _byte_value
    from .spm_proto import model_proto

    n = len(tokens)
    scores = _list(meta, "scores", required=False) or [0.0] * n
    if len(scores) != n:
        raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries but there are {n} tokens")
    types = list(types)
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == BYTE:
            _byte_value(t)  # raises TokenizerError on "<0xZZ>"
        elif ty not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED):
            raise TokenizerError(f"token {i} {t!r} has unknown token type {ty}")
        if not t:
            raise TokenizerError(f"token {i} is empty")
    # SentencePiece wants exactly one unknown piece: the declared one (llama.cpp's default: id 0). Files in
    # the wild also mark padding as "unknown" or <unk> as control; those become control pieces here, which
    # like llama.cpp never come out of plain text.
    unk = _opt_id(meta, "unknown_token_id", n)
    marked = [i for i, ty in enumerate(types) if ty == UNKNOWN]
    if unk is None:
        unk = marked[0] if marked else 0
    for i in marked:
        types[i] = CONTROL
    types[unk] = UNKNOWN
    if len(set(tokens)) != n:
        seen, dup = set(), None
        for t in tokens:
            if t in seen:
                dup = t
                break
            seen.add(t)
        raise TokenizerError(f"token {dup!r} appears twice in the vocabulary")
    # llama.cpp's defaults for SentencePiece vocabularies without the keys: <s> = 1, </s> = 2.
    if meta.get(P + "bos_token_id") is None and n > 2:
        common = dict(common, bos_id=1)
    if meta.get(P + "eos_token_id") is None and n > 2:
        common = dict(common, eos_id=2)
    proto = model_proto(tokens, scores, types, byte_fallback=BYTE in types,
                        add_dummy_prefix=_flag(meta, "add_space_prefix", True),
                        remove_extra_whitespaces=_flag(meta, "remove_extra_whitespaces", False),
                        unk_id=unk)
    tok = SentencePieceTokenizer.from_proto(
        proto, add_bos=_flag(meta, "add_bos_token", True), add_eos=_flag(meta, "add_eos_token", False),
        source="gguf", **common)
    return _with_eot(tok, eot)


def _bpe(meta, tokens, types, common, eot):
    from .bpe import ByteLevelBPETokenizer
    from .pretokenize import canonical_pre

    merges = _list(meta, "merges", required=False)
    if not merges:
        raise TokenizerError("a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges, which is missing or empty")
    pre = meta.get(P + "pre") or "default"
    control = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, UNKNOWN)}
    user = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == USER_DEFINED}
    # add_space_prefix is ignored for BPE vocabularies, as llama.cpp does.
    tok = ByteLevelBPETokenizer(
        tokens, merges, pre=pre, control=control, user_defined=user,
        add_bos=_flag(meta, "add_bos_token", canonical_pre(pre) == "llama3"),
        add_eos=_flag(meta, "add_eos_token", False), **common)
    tok.source = "gguf"
    return _with_eot(tok, eot)
