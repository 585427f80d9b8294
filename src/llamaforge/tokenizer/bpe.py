"""Byte-level BPE backend (GPT-2 / Llama 3 / SmolLM style) on the `tokenizers` library."""
from __future__ import annotations

from typing import Mapping, Sequence

from ..errors import TokenizerError
from .bytelevel import piece_to_bytes
from .common import FragmentTokenizer


class ByteLevelBPETokenizer(FragmentTokenizer):
    """BPE over byte-level pieces, with a llama.cpp-named pre-tokenizer (see pretokenize.py).

    tokens: vocab strings in the byte-level alphabet; merges: "left right" strings in rank order.
    control: control-token text -> id (never from plain text); user_defined: always matched in text.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], *, pre: str | None,
                 control: Mapping[str, int], user_defined: Mapping[str, int] | None = None,
                 ignore_merges: bool | None = None, **setup):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models

        from .pretokenize import IGNORE_MERGES, build_pre_tokenizer, canonical_pre

        user_defined = dict(user_defined or {})
        pre_key = canonical_pre(pre)
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for n, m in enumerate(merges):
            parts = m.split(" ") if isinstance(m, str) else list(m)
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise TokenizerError(f"merge #{n} {m!r} is not two space-separated pieces")
            if parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
                raise TokenizerError(f"merge #{n} {m!r} uses a piece missing from the vocabulary")
            pairs.append((parts[0], parts[1]))
        if ignore_merges is None:
            ignore_merges = pre_key in IGNORE_MERGES
        try:
            model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"cannot build the BPE model: {e}") from None
        tk = HFTokenizer(model)
        tk.pre_tokenizer = build_pre_tokenizer(pre_key)
        self._tk = tk
        self.pre = pre_key
        special_ids = set(control.values())
        user_ids = set(user_defined.values())
        table = []
        for i, t in enumerate(tokens):
            if i in special_ids:
                table.append(b"")
            elif i in user_ids:
                table.append(t.encode("utf-8"))  # user-defined tokens are stored as plain text
            else:
                table.append(piece_to_bytes(t))
        self._setup(token_bytes=table, control=control, always=user_defined, **setup)

    def _encode_fragment(self, text: str, prefix: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids
