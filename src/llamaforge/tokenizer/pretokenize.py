"""Pre-tokenizer regexes named by GGUF's `tokenizer.ggml.pre`, as llama.cpp applies them (llama-vocab.cpp).

llama.cpp applies the regexes of a type one after another; each splits every current piece into its matches
and the text between them. `tokenizers`' Split(..., "isolated") does exactly that, so a type becomes a
Sequence of Splits followed by a ByteLevel mapping without its own regex.
"""
from __future__ import annotations

from ..errors import TokenizerError

# GPT-2's pattern (also the second stage of several types).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Meta Llama 3's pattern (llama.cpp spells the case-insensitive contractions out).
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback for BPE vocabularies without a known type.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (LLAMA3,),
    "gpt2": (GPT2,),
    # SmolLM, StarCoder, Refact: every digit is its own piece, then GPT-2's pattern.
    "smollm": (r"\p{N}", GPT2),
    "starcoder": (r"\p{N}", GPT2),
}
ALIASES = {
    "llama-bpe": "llama3", "llama-v3": "llama3", "gpt-2": "gpt2", "phi-2": "gpt2", "jina-es": "gpt2",
    "jina-de": "gpt2", "refact": "starcoder", "command-r": "starcoder",
}
# Types whose whole-word vocabulary hits skip the merges (llama.cpp's `ignore_merges`).
IGNORE_MERGES = {"llama3"}


def canonical_pre(name: str | None) -> str:
    """Map a `tokenizer.ggml.pre` value to one of PRE_TOKENIZERS; unknown names raise TokenizerError."""
    key = (name or "default").strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRE_TOKENIZERS:
        known = sorted(set(PRE_TOKENIZERS) | set(ALIASES))
        raise TokenizerError(f"unsupported pre-tokenizer {name!r} (tokenizer.ggml.pre); known: {', '.join(known)}")
    return key


def build_pre_tokenizer(name: str | None):
    """A `tokenizers` pre-tokenizer equivalent to llama.cpp's splitting for this type."""
    from tokenizers import Regex, pre_tokenizers

    stages = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False)
              for p in PRE_TOKENIZERS[canonical_pre(name)]]
    stages.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(stages)
