"""Tokenizer endpoints in vLLM's shape: POST /tokenize, POST /detokenize, GET /tokenizer_info.

lm-evaluation-harness's `local-completions` model finds them on its own (tokenizer_backend "auto" probes
/tokenizer_info and /tokenize) and then scores with the served model's own token ids: no Hugging Face tokenizer
download, and token-aligned continuation logprobs. `llamaforge eval --server URL` uses them the same way.
Text is encoded as vLLM's Hugging Face tokenizers do: control-token text becomes the control token.
`model` may be omitted when exactly one model is loaded (or one was named at start).
"""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request

from ..errors import TokenizerError
from .common import json_response, read_json
from .schemas import ApiError, bad_request

router = APIRouter()
MAX_DETOKENIZE = 1_000_000


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TokenizeRequest(_Body):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]


async def _entry(request: Request, name: str | None):
    st = request.app.state.server
    if not name:
        loaded = list(st.models.entries)
        named = list(st.config.models)
        if len(loaded) == 1:
            name = loaded[0]
        elif not loaded and len(named) == 1:
            name = named[0]
        else:
            raise bad_request("'model' is required when the server has several models (or none loaded)", "model")
    return await st.models.get(name)


def _tokenizer(entry):
    tok = entry.lm.tokenizer
    if tok is None:
        raise ApiError(400, f"model {entry.name!r} has no tokenizer", param="model")
    return tok


@router.post("/tokenize")
async def tokenize(request: Request):
    req = await read_json(request, TokenizeRequest)
    entry = await _entry(request, req.model)
    tok = _tokenizer(entry)
    try:
        ids = list(tok.encode(req.prompt, add_special=req.add_special_tokens, allow_special=True))
    except TokenizerError as e:
        raise bad_request(str(e), "prompt") from None
    return json_response({"tokens": ids, "count": len(ids), "max_model_len": entry.scheduler.context_length})


@router.post("/detokenize")
async def detokenize(request: Request):
    req = await read_json(request, DetokenizeRequest)
    if len(req.tokens) > MAX_DETOKENIZE:
        raise bad_request(f"at most {MAX_DETOKENIZE} tokens", "tokens")
    entry = await _entry(request, req.model)
    tok = _tokenizer(entry)
    vocab = int(entry.lm.config.vocab_size)
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab})", "tokens")
    return json_response({"prompt": tok.decode(req.tokens, skip_special=False)})


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    entry = await _entry(request, request.query_params.get("model"))
    tok = _tokenizer(entry)

    def piece(i):
        return tok.id_to_piece(i) if i is not None else None
    template = (entry.lm.defaults or {}).get("template") or getattr(tok, "chat_template", None)
    return json_response({"tokenizer_class": type(tok).__name__, "eos_token": piece(tok.eos_id),
                          "bos_token": piece(tok.bos_id), "pad_token": None, "chat_template": template,
                          "add_bos_token": bool(getattr(tok, "add_bos", False)),
                          "model_max_length": entry.scheduler.context_length, "vocab_size": tok.vocab_size})
