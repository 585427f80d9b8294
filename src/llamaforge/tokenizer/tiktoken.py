"""Meta Llama 3 tokenizer: a tiktoken BPE file (`tokenizer.model`, "base64 rank" lines) + 256 special tokens.

Facts from Meta's llama-models `llama3/tokenizer.py`: the splitting pattern, the special-token names and order,
and the long-input guards (encode in 400,000-character chunks; cut runs of more than 25,000 consecutive
whitespace or non-whitespace characters, which tiktoken's regex would otherwise handle very slowly).
"""
from __future__ import annotations

import base64
import binascii
from typing import Iterator

from ..errors import TokenizerError
from .common import FragmentTokenizer
from .common import read_tokenizer_file

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL = 256
NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def special_token_names() -> list[str]:
    """The 256 special tokens in id order (ids start right after the BPE ranks)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL - len(NAMED_SPECIALS))]
    return NAMED_SPECIALS + reserved


def read_ranks(data: bytes, source="tokenizer.model") -> dict[bytes, int]:
    """Parse "base64 rank" lines; ranks must be exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{source}:{lineno}: expected 'base64 rank'")
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{source}:{lineno}: bad base64 token or rank") from None
        if token in ranks:
            raise TokenizerError(f"{source}:{lineno}: token listed twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{source}: ranks are not exactly 0..{len(ranks) - 1}")
    if not ranks:
        raise TokenizerError(f"{source}: no tokens")
    return ranks


def split_long_runs(s: str, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Cut `s` so no piece has more than `max_run` consecutive whitespace or non-whitespace characters."""
    start = 0
    run = 0
    in_space = s[0].isspace() if s else False
    for i, ch in enumerate(s):
        space = ch.isspace()
        if space != in_space:
            in_space, run = space, 1
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class TiktokenTokenizer(FragmentTokenizer):
    """Llama 3 tokenizer on `tiktoken` with Meta's pattern; <|begin_of_text|> = first id after the ranks."""

    def __init__(self, ranks: dict[bytes, int], *, name: str = "llama3", chat_template=None):
        import tiktoken

        n = len(ranks)
        specials = {t: n + i for i, t in enumerate(special_token_names())}
        self._enc = tiktoken.Encoding(name=name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        table = [b""] * (n + len(specials))
        for token, rank in ranks.items():
            table[rank] = token
        self.source = "tiktoken"
        self._setup(token_bytes=table, control=specials, bos_id=specials["<|begin_of_text|>"],
                    eos_id=specials["<|end_of_text|>"], add_bos=True, add_eos=False, chat_template=chat_template,
                    eot_ids={specials["<|eot_id|>"], specials["<|eom_id|>"]})

    @classmethod
    def from_file(cls, path, **kw) -> "TiktokenTokenizer":
        return cls(read_ranks(read_tokenizer_file(path), str(path)), **kw)

    def _encode_fragment(self, text: str, prefix: bool = True) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i:i + MAX_ENCODE_CHARS]):
                ids.extend(self._enc.encode_ordinary(piece))
        return ids
