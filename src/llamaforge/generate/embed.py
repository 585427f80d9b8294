"""Text embeddings from a causal LM (OpenAI /v1/embeddings, Ollama /api/embed, the Python API, RAG).

Definition (documented in the API reference): the text is tokenised as a raw prompt (BOS added when the model
expects one), run through the model once without a KV cache, and the final-norm hidden states
(`Llama.hidden_states`) of every token are mean-pooled and L2-normalised. `dimensions` keeps the first N
components and re-normalises (Matryoshka-style truncation, as OpenAI's `dimensions` does).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import ContextLengthError, InvalidRequestError
from .sampling import check_token_ids


def tokenize_inputs(lm, inputs: Sequence[str | list[int]], *, max_tokens: int, truncate: bool,
                    field: str = "input") -> list[list[int]]:
    """Token ids for each input; over-long inputs are cut to `max_tokens` (truncate) or refused (400)."""
    tok = lm.tokenizer
    vocab = int(lm.config.vocab_size)
    out = []
    for i, item in enumerate(inputs):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(f"'{where}' is an empty string", field=field)
            ids = tok.encode(item, add_special=True)
        else:
            try:
                ids = check_token_ids(item, vocab, field)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"'{where}': {e}", field=field) from None
        if not ids:
            raise InvalidRequestError(f"'{where}' is empty", field=field)
        if len(ids) > max_tokens:
            if not truncate:
                raise ContextLengthError(len(ids), max_tokens, field=field)
            ids = ids[:max_tokens]
        out.append(ids)
    return out


class EmbeddingCancelled(Exception):
    """`should_stop()` said to stop between two inputs (the client went away)."""


@torch.inference_mode()
def embed_ids(model, batch: list[list[int]], dimensions: int | None = None,
              should_stop: Callable[[], bool] | None = None) -> list[list[float]]:
    """Mean-pooled, L2-normalised final hidden states for each id list. Runs one forward per input (no padding,
    so batching cannot change a result); `should_stop` is asked before each input (EmbeddingCancelled)."""
    device = next(model.parameters()).device
    out = []
    for ids in batch:
        if should_stop is not None and should_stop():
            raise EmbeddingCancelled()
        h = model.hidden_states(torch.tensor([ids], dtype=torch.long, device=device))[0].float()  # [T, C]
        v = h.mean(dim=0)
        if dimensions is not None:
            v = v[:dimensions]
        v = v / v.norm().clamp_min(1e-12)
        out.append(v.tolist())
    return out


def check_dimensions(lm, dimensions: int | None, field: str = "dimensions") -> int | None:
    if dimensions is None:
        return None
    hidden = int(lm.config.hidden_size)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= hidden:
        raise InvalidRequestError(f"'{field}' must be between 1 and {hidden} for this model, got {dimensions}",
                                  field=field)
    return dimensions
