"""`llamaforge serve`: an HTTP server speaking the OpenAI and Ollama APIs over continuous batching.

    from llamaforge.server import ServerConfig, create_app, make_server
    app = create_app(ServerConfig(models=["smollm2"]))
    make_server(app, "127.0.0.1", 11435).run()

Heavy imports (FastAPI, torch) happen when these names are first used.
"""
from __future__ import annotations

__all__ = ["ServerConfig", "create_app", "make_server"]


def __getattr__(name):
    if name in __all__:
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module 'llamaforge.server' has no attribute {name!r}")
