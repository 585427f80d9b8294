"""Text embeddings from a causal LM, for /v1/embeddings and /api/embed.

Definition (documented in the API reference): the text is tokenised as a raw prompt (BOS added when the model
expects one), run through the model once without a KV cache, and the final-norm hidden states
(`Llama.hidden_states`) of every token are mean-pooled and L2-normalised. `dimensions` keeps the first N
components and re-normalises (Matryoshka-style truncation, as OpenAI's `dimensions` does).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .schemas import bad_request


def tokenize_inputs(lm, inputs: Sequence[str | list[int]], *, max_tokens: int, truncate: bool,
                    field: str = "input") -> list[list[int]]:
    """Token ids for each input; over-long inputs are cut to `max_tokens` (truncate) or refused (400)."""
    tok = lm.tokenizer
    vocab = int(lm.config.vocab_size)
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids = tok.encode(item, add_special=True)
        else:
            ids = list(item)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"'{field}[{i}]' has token id {bad} outside the vocabulary (size {vocab})", field)
        if not ids:
            raise bad_request(f"'{field}[{i}]' is empty", field)
        if len(ids) > max_tokens:
            if not truncate:
                raise bad_request(f"'{field}[{i}]' has {len(ids)} tokens but the context window is {max_tokens} "
                                  "tokens", field, code="context_length_exceeded")
            ids = ids[:max_tokens]
        out.append(ids)
    return out


@torch.inference_mode()
def embed_ids(model, batch: list[list[int]], dimensions: int | None = None) -> list[list[float]]:
    """Mean-pooled, L2-normalised final hidden states for each id list. Runs one forward per input (no padding,
    so batching cannot change a result)."""
    device = next(model.parameters()).device
    out = []
    for ids in batch:
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
    if not 1 <= dimensions <= hidden:
        raise bad_request(f"'{field}' must be between 1 and {hidden} for this model, got {dimensions}", field)
    return dimensions
