"""A model's chat format, built once per model (its stored template override, else its own) and cached on it.
Its own module because the seam and the stages that need the format (tools) both read it."""
from __future__ import annotations

from ..errors import TemplateError, TokenizerError


def chat_format(lm):
    """The model's ChatFormat (its stored template override, else its own), built once per model."""
    from ..tokenizer.chat import chat_format_for
    template = (getattr(lm, "defaults", None) or {}).get("template") or None
    cached = lm.__dict__.get("_chat_format")
    if cached is not None and cached[0] == template and cached[1] is lm.tokenizer:
        return cached[2]
    if lm.tokenizer is None:
        raise TokenizerError("this model has no tokenizer")
    try:
        fmt = chat_format_for(lm.tokenizer, template=template)
    except TemplateError as e:
        raise TemplateError(f"the model's chat template cannot be used: {e}") from None
    lm.__dict__["_chat_format"] = (template, lm.tokenizer, fmt)
    return fmt
