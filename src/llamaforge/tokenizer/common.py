"""Shared machinery for the concrete backends: special-token splitting, BOS/EOS, per-id byte tables."""
from __future__ import annotations

from typing import Mapping, Sequence

from ..errors import TokenizerError
from .base import Tokenizer
from .text import SpecialSplitter, clean_text

# End-of-turn / end-of-generation token texts: llama.cpp's list (llama-vocab.cpp), which it stops on and
# always treats as control tokens.
EOT_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "</s>", "<|endoftext|>", "<|end_of_text|>",
             "<EOT>", "_<EOT>", "<end_of_utterance>", "<end_of_turn>")


MAX_TOKENIZER_FILE_BYTES = 64 << 20   # tokenizer.model files are a few MB (Llama 3's: 2.2 MB)


def read_tokenizer_file(path) -> bytes:
    """A tokenizer file's bytes, read bounded (TokenizerError for an unreadable or endless file)."""
    from .._fs import read_bounded
    from ..errors import LlamaforgeError
    try:
        return read_bounded(path, MAX_TOKENIZER_FILE_BYTES, "tokenizer file")
    except LlamaforgeError as e:
        raise TokenizerError(f"{path}: {e}") from None


class FragmentTokenizer(Tokenizer):
    """A backend that only has to encode plain text fragments (`_encode_fragment`).

    Subclasses call `_setup(...)` with the per-id byte table, control tokens and always-split tokens.
    """

    strip_leading_space: bool = False

    def _setup(self, *, token_bytes: Sequence[bytes], control: Mapping[str, int],
               always: Mapping[str, int] | None = None, bos_id=None, eos_id=None, add_bos=False,
               add_eos=False, chat_template=None, eot_ids=None) -> None:
        self._bytes = list(token_bytes)
        self.vocab_size = len(self._bytes)
        for name, i in list(control.items()) + list((always or {}).items()):
            if not (0 <= i < self.vocab_size):
                raise TokenizerError(f"special token {name!r} has id {i}, outside the vocabulary "
                                     f"(size {self.vocab_size})")
        for what, i in (("bos", bos_id), ("eos", eos_id)):
            if i is not None and not (0 <= int(i) < self.vocab_size):
                raise TokenizerError(f"{what} token id {i} is outside the vocabulary (size {self.vocab_size})")
        self.special_tokens = dict(control)
        self._splitter = SpecialSplitter(control, always)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_id = None if eos_id is None else int(eos_id)
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.add_eos = bool(add_eos) and self.eos_id is not None
        self.chat_template = chat_template or None
        if eot_ids is None:
            eot_ids = {control[n] for n in EOT_NAMES if n in control}
        self.eot_ids = frozenset(eot_ids)
        self._special_id_cache = None
        self._special_rev_cache = None

    def _encode_fragment(self, text: str, prefix: bool = True) -> list[int]:  # pragma: no cover - abstract
        """Encode plain text. prefix=False: the text continues earlier text (no SentencePiece dummy prefix)."""
        raise NotImplementedError

    def encode(self, text: str | bytes, *, add_special: bool = False, allow_special: bool = False) -> list[int]:
        """Encode text (str, or bytes decoded as UTF-8 with invalid sequences replaced by U+FFFD).

        Lone surrogates become U+FFFD. Control-token text becomes the control id only with allow_special=True.
        """
        ids = self.encode_pieces([(text, allow_special)])[0]
        if add_special and self.add_bos:
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_pieces(self, pieces) -> list[list[int]]:
        """Encode consecutive pieces of one text, each with its own allow_special flag; ids per piece.

        Chat formats use this to let a template's own structure contain control tokens while message content
        cannot. A piece continues the previous one (no new SentencePiece dummy prefix) unless it starts the
        text or follows a special token.
        """
        out: list[list[int]] = []
        fresh = True  # at the start of the text or right after a special token
        for text, allow_special in pieces:
            ids: list[int] = []
            for part in self._splitter.split(clean_text(text), allow_special):
                if isinstance(part, int):
                    ids.append(part)
                    fresh = True
                else:
                    ids.extend(self._encode_fragment(part, fresh))
                    fresh = False
            out.append(ids)
        return out

    def split_special(self, text: str) -> list[str | int]:
        """Text fragments and control-token ids of trusted text (a chat template's own structure)."""
        return list(self._splitter.split(clean_text(text), True))

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        if not (0 <= token_id < self.vocab_size):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._bytes[token_id]

    def first_token_bytes(self, data: bytes) -> bytes:
        if self.strip_leading_space and data[:1] == b" ":
            return data[1:]
        return data
