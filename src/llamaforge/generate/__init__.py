"""Generation: sampling, the continuous-batching engine, and the generate/stream/chat API."""
from __future__ import annotations

from .api import Completion, TokenStream, chat, generate, stream
from .engine import BatchEngine, Request, TokenEvent, context_length, prompt_logprobs
from .sampling import Sampler, SamplingParams, params_from_options

__all__ = ["BatchEngine", "Completion", "Request", "Sampler", "SamplingParams", "TokenEvent", "TokenStream",
           "chat", "context_length", "generate", "params_from_options", "prompt_logprobs", "stream"]
