"""Shared helpers for the safety tests (no tests here): a byte tokenizer with Llama 3's header tokens, so a tiny
random Llama reads real Llama Guard 3 prompts, and Meta's Llama Guard 3 chat template."""
from __future__ import annotations

from pathlib import Path

from llamaforge.tokenizer.base import Tokenizer

TEMPLATE = (Path(__file__).parent / "data" / "llama_guard_3_chat_template.jinja").read_text(encoding="utf-8")
BOT, SH, EH, EOT = 256, 257, 258, 259


class GuardBytes(Tokenizer):
    """One token per byte plus <|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>."""

    vocab_size = 260
    bos_id, eos_id = BOT, None
    add_bos = True
    eot_ids = frozenset({EOT})

    def __init__(self, template: str | None = TEMPLATE):
        self.special_tokens = {"<|begin_of_text|>": BOT, "<|start_header_id|>": SH, "<|end_header_id|>": EH,
                               "<|eot_id|>": EOT}
        self.chat_template = template

    def encode(self, text, *, add_special=False, allow_special=False):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return ([BOT] if add_special else []) + list(text.encode("utf-8", errors="replace"))

    def token_bytes(self, token_id):
        return bytes([token_id]) if token_id < 256 else b""


def tiny_guard_lm(seed: int = 0, template: str | None = TEMPLATE, name: str = "tiny-llama-guard"):
    from test_generate_support import tiny_lm
    lm = tiny_lm(seed=seed, tokenizer=GuardBytes(template), context=4096)
    lm.name = name
    return lm


def render_meta(messages, categories=None, excluded=()):
    """Meta's template rendered the way transformers renders chat templates (sandboxed Jinja, trim_blocks and
    lstrip_blocks, raise_exception)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    kw = {"excluded_category_keys": list(excluded)}
    if categories is not None:
        kw["categories"] = categories
    return env.from_string(TEMPLATE).render(messages=msgs, **kw)
