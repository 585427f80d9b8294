"""llamaforge: run, chat, serve, fine-tune, evaluate, ground and guard Llama-architecture models.

    import llamaforge
    m = llamaforge.load("smollm2")          # a store name, or a path to GGUF / HF dir / Meta checkpoint
    print(m.chat([{"role": "user", "content": "Hi!"}]).text)

Heavy modules (torch, the server) are imported lazily so `llamaforge --help` stays fast.
"""
from __future__ import annotations

from .errors import (ConfigError, ContextLengthError, InvalidRequestError, LlamaforgeError, ModelFormatError,
                     ModelNotFoundError, StoreError, TemplateError, TokenizerError)
from .threads import prepare_openmp as _prepare_openmp

_prepare_openmp()  # before anything imports torch: libgomp reads its wait policy once, when it loads

__version__ = "0.1.0"

__all__ = ["load", "LoadedModel", "ModelConfig", "LlamaforgeError", "ModelFormatError", "ConfigError",
           "TokenizerError", "TemplateError", "StoreError", "ModelNotFoundError", "InvalidRequestError",
           "ContextLengthError", "__version__"]


def load(path_or_name, **kwargs):
    """Load a model by store name or path. See `llamaforge.api.load`."""
    from .api import load as _load
    return _load(path_or_name, **kwargs)


def __getattr__(name):
    if name == "LoadedModel":
        from .api import LoadedModel
        return LoadedModel
    if name == "ModelConfig":
        from .config import ModelConfig
        return ModelConfig
    raise AttributeError(f"module 'llamaforge' has no attribute {name!r}")
