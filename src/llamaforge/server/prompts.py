"""Turning requests into prompt token ids: chat messages through the model's chat format, raw prompts through
the tokenizer, the model's default system prompt, and the JSON-mode instruction."""
from __future__ import annotations

from typing import Any

from ..errors import TemplateError
from .schemas import bad_request

JSON_INSTRUCTION = ("Respond only with a single valid JSON object. Do not write anything before or after it.")


def chat_format(entry):
    """The entry's ChatFormat, built once (the model's own template, or the store manifest's override)."""
    fmt = getattr(entry, "_chat_format", None)
    if fmt is None:
        from ..tokenizer.chat import chat_format_for
        template = (entry.lm.defaults or {}).get("template") or None
        try:
            fmt = chat_format_for(entry.lm.tokenizer, template=template)
        except TemplateError as e:
            raise bad_request(f"the model's chat template cannot be used: {e}", "model") from None
        entry._chat_format = fmt
    return fmt


def with_default_system(entry, messages: list[dict[str, str]], json_mode: bool = False) -> list[dict[str, str]]:
    """Prepend the model's default system prompt when the request has none; add the JSON-mode instruction."""
    msgs = list(messages)
    system = (entry.lm.defaults or {}).get("system")
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    if json_mode:
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": msgs[0]["content"].rstrip() + "\n\n" + JSON_INSTRUCTION}
        else:
            msgs.insert(0, {"role": "system", "content": JSON_INSTRUCTION})
    return msgs


def encode_chat(entry, messages: list[dict[str, str]]) -> tuple[list[int], tuple[int, ...]]:
    """(prompt ids ending with the assistant header, extra stop ids of the chat format)."""
    fmt = chat_format(entry)
    try:
        ids = fmt.encode(messages, add_generation_prompt=True)
    except TemplateError as e:
        raise bad_request(f"cannot format messages: {e}", "messages") from None
    return list(ids), tuple(sorted(getattr(fmt, "stop_ids", ()) or ()))


def encode_raw(entry, prompt: str) -> list[int]:
    """A raw completion prompt: BOS as the model expects; control-token text stays plain text."""
    return list(entry.lm.tokenizer.encode(prompt, add_special=True))


def token_text(tokenizer, token_id: int) -> str:
    """Display text of one token (control tokens by name)."""
    if tokenizer.is_special(token_id):
        return tokenizer.id_to_piece(token_id)
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def defaults_options(entry) -> dict[str, Any]:
    """Sampling options from the model's store manifest (Ollama-style names)."""
    return dict((entry.lm.defaults or {}).get("options") or {})
