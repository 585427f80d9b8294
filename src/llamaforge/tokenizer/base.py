"""The one tokenizer interface every backend implements (GGUF vocab, tokenizer.json, SentencePiece, tiktoken)."""
from __future__ import annotations

import abc
import codecs
from typing import Iterable


class Tokenizer(abc.ABC):
    """Text <-> token ids.

    Backends set: vocab_size, bos_id, eos_id (None when absent), add_bos/add_eos (what the model expects at the
    start/end of a raw prompt), special_tokens {text: id} (control tokens; never produced from plain text),
    eot_ids (extra end-of-turn ids such as <|eot_id|>, <|im_end|>), chat_template (Jinja source or None).
    """

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    special_tokens: dict[str, int]
    eot_ids: frozenset[int] = frozenset()
    chat_template: str | None = None

    @abc.abstractmethod
    def encode(self, text: str, *, add_special: bool = False, allow_special: bool = False) -> list[int]:
        """Encode `text`.

        add_special: prepend BOS / append EOS as the model's add_bos/add_eos flags say (for a raw prompt).
        allow_special: recognise control-token text such as "<|eot_id|>" as the control token. Off by default,
        so user text can never inject control tokens. Lone surrogates are replaced by U+FFFD; backends also
        accept bytes, decoded as UTF-8 with invalid sequences replaced by U+FFFD (never an exception).
        """

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes this token contributes to the output text (b"" for control tokens)."""

    def decode(self, ids: Iterable[int], *, skip_special: bool = True, continuation: bool = False) -> str:
        """Decode ids; invalid UTF-8 sequences become U+FFFD.

        skip_special=False renders control tokens as their text (e.g. "<|im_end|>"). The first non-control
        token that produces text goes through `first_token_bytes` (SentencePiece drops its dummy-prefix space
        there), the same rule the stream decoder applies, so streamed deltas always join to this result.
        continuation=True: the ids continue earlier text (a raw completion), so no leading space is dropped.
        """
        out = []
        first = not continuation
        for i in ids:
            data = self.output_bytes(i, skip_special=skip_special)
            if first and data and not self.is_special(i):
                data = self.first_token_bytes(data)
                first = False
            out.append(data)
        return b"".join(out).decode("utf-8", errors="replace")

    def output_bytes(self, token_id: int, *, skip_special: bool = True) -> bytes:
        """Bytes a token adds to decoded text: control tokens give b"" when skipped, else their own text."""
        if self.is_special(token_id):
            return b"" if skip_special else self.id_to_piece(token_id).encode("utf-8")
        return self.token_bytes(token_id)

    def first_token_bytes(self, data: bytes) -> bytes:
        """Hook for the first text-producing token of a decode (identity here; SentencePiece strips a space)."""
        return data

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def _special_ids(self) -> frozenset[int]:
        s = getattr(self, "_special_id_cache", None)
        if s is None:
            s = frozenset(self.special_tokens.values())
            self._special_id_cache = s
        return s

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus end-of-turn tokens."""
        ids = set(self.eot_ids)
        if self.eos_id is not None:
            ids.add(self.eos_id)
        return frozenset(ids)

    def id_to_piece(self, token_id: int) -> str:
        """Human-readable token text (for logprobs / debugging)."""
        rev = getattr(self, "_special_rev_cache", None)
        if rev is None:
            rev = {i: t for t, i in self.special_tokens.items()}
            self._special_rev_cache = rev
        if token_id in rev:
            return rev[token_id]
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special: bool = True, continuation: bool = False) -> "StreamDecoder":
        """Incremental decoder; same `skip_special` / `continuation` meaning as `decode`."""
        return StreamDecoder(self, skip_special=skip_special, continuation=continuation)


class StreamDecoder:
    """Feed ids one at a time; get text deltas that never split a UTF-8 character.

    The concatenation of all deltas plus `flush()` equals `tokenizer.decode(all_ids)`.
    Backends whose decode is not a plain byte concatenation (SentencePiece's leading-space strip) override
    `token_bytes`/`decode` consistently so this stays true.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True, continuation: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = not continuation

    def feed(self, token_id: int) -> str:
        data = self.tokenizer.output_bytes(token_id, skip_special=self.skip_special)
        if self._first and data and not self.tokenizer.is_special(token_id):
            data = self.tokenizer.first_token_bytes(data)
            self._first = False
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
