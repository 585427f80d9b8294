"""The base model of a training job and its chat format, as training reads them (dense float32 weights; the chat
format resolved only when a text record needs it). Shared by the trainer, rejection sampling and reward models."""
from __future__ import annotations

from pathlib import Path

from ..errors import InvalidRequestError


def load_base_model(spec: str):
    """A LoadedModel with dense float32 weights from a path (GGUF / HF dir / Meta dir) or a store name.

    Dense weights: no packed/fused inference fast path. A store model created with an adapter gets it applied
    (folded in), as `llamaforge.load` would.
    """
    from ..formats.load import load_model
    if Path(spec).exists():
        return load_model(spec)
    from ..store import resolve
    ref = resolve(spec)
    lm = load_model(ref.path, dtype="float32")
    lm.name, lm.defaults = ref.name, dict(ref.defaults or {})
    if lm.defaults.get("adapter"):
        from .lora import apply_adapter
        apply_adapter(lm, lm.defaults["adapter"])
    return lm


class LazyChatFormat:
    """The model's chat format, resolved on the first text record (pre-tokenized data needs none)."""

    def __init__(self, lm):
        self.lm, self._fmt = lm, None

    def _format(self):
        if self._fmt is None:
            tok = getattr(self.lm, "tokenizer", None)
            if tok is None:
                raise InvalidRequestError("the model has no tokenizer, so text data cannot be encoded for it; "
                                          "use pre-tokenized records ({\"input_ids\": [...], \"mask\": [...]})")
            from ..tokenizer.chat import chat_format_for
            self._fmt = chat_format_for(tok)
        return self._fmt

    def encode_with_mask(self, messages):
        return self._format().encode_with_mask(messages)

    def encode(self, messages, add_generation_prompt: bool = True):
        return self._format().encode(messages, add_generation_prompt)

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(getattr(self._format(), "stop_ids", ()) or ())
