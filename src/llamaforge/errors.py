"""Named exceptions. Every user-facing failure is one of these, never a bare traceback."""
from __future__ import annotations


class LlamaforgeError(Exception):
    """Base class for every error llamaforge raises on purpose."""


class ModelFormatError(LlamaforgeError):
    """A weight/config file is malformed, truncated, unsupported or unsafe.

    Carries the offending path so the CLI can print one clear line.
    """

    def __init__(self, path, reason: str):
        self.path = str(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class ConfigError(ModelFormatError):
    """A model configuration is missing required keys or has invalid values."""


class TokenizerError(LlamaforgeError):
    """A tokenizer file or vocabulary is malformed or inconsistent."""


class TemplateError(LlamaforgeError):
    """A chat template is unsafe, broken, or renders too much output."""


class StoreError(LlamaforgeError):
    """The local model store refused an operation (bad name, digest mismatch, I/O)."""


class ModelNotFoundError(StoreError):
    """No model of that name in the store and no such path on disk."""

    def __init__(self, name: str, suggestions: list[str] | None = None):
        self.name = name
        self.suggestions = suggestions or []
        msg = f"model {name!r} not found"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        msg += " (see `llamaforge list`)"
        super().__init__(msg)


class InvalidRequestError(LlamaforgeError, ValueError):
    """A generation/sampling request is invalid. `field` names the offending parameter."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, context_length: int, field: str = "prompt", *, at_least: bool = False):
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        n = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
        super().__init__(f"prompt has {n} tokens but the context window is {context_length} tokens", field=field)


class CompileError(LlamaforgeError):
    """The compiled decode step could not be built (the eager path keeps working)."""
