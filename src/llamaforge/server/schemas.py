"""Request schemas for the OpenAI and Ollama dialects, and the checks shared by both.

Bodies are parsed by `parse_body` (strict UTF-8, strict JSON, then pydantic in strict mode) so every bad input
becomes an `ApiError` naming the problem: a 400 with `param` set to the offending field.
Sampling ranges are not checked here: the request seam (`generate.pipeline.plan`) validates them once. The
`check_*` helpers below cover the dialects' own fields (n, logprobs counts, max_tokens for scoring, keep_alive).
"""
from __future__ import annotations

import json
import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Bounds. "Absurd" max_tokens: more than any context window we could hold; longer-than-context requests are
# clipped to the context and end with finish_reason "length" instead.
MAX_TOKENS_LIMIT = 1_000_000
MAX_N = 8
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETIONS = 5
MAX_BATCH_PROMPTS = 64
MAX_KEEP_ALIVE_S = 10 * 365 * 86400   # longer than this is "forever"

# Roles a chat format understands; "developer" is OpenAI's newer name for "system".
KNOWN_ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    """An error answered as JSON in the route's dialect (OpenAI error object or Ollama {"error": ...})."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _default_type(status)
        self.headers = headers or {}


def _default_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


class _Strict(BaseModel):
    # strict: "12" is not an int and 1.5 is not an int. Unknown fields are refused (400 naming them): a field we
    # do not know is a field we would otherwise drop. Every field the official clients send is declared here
    # and either implemented or refused by name in the dialect module (tests/test_conformance.py).
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class _Loose(_Strict):
    # Objects inside a request whose extra keys are part of a JSON Schema or a tool definition, passed on whole.
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


# ----------------------------------------------------------------------------------------------- OpenAI
class ContentPart(_Loose):
    type: str
    text: Optional[str] = None


class ToolCallFunction(_Strict):
    name: str
    arguments: str = ""


class ToolCall(_Strict):
    id: str
    type: str = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None
    audio: Any = None
    function_call: Any = None


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: str = "text"
    json_schema: Optional[JsonSchemaFormat] = None


class FunctionDef(_Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolDef(_Strict):
    type: str = "function"
    function: Optional[FunctionDef] = None
    custom: Any = None


class Retrieval(_Strict):
    """llamaforge extension: ground the answer in a RAG collection."""
    collection: str
    k: int = 5


class Guards(_Strict):
    """llamaforge extension: safety checks for this request (the server's --guard-* flags set the default)."""
    input: Optional[bool] = None
    output: Optional[bool] = None
    code: Optional[bool] = None


class _OpenAISampling(_Strict):
    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Union[int, float]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # Extensions other OpenAI-compatible servers (llama.cpp, vLLM) accept too.
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None


class OpenAIChatRequest(_OpenAISampling):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[ToolDef]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    # Fields of the OpenAI API this server refuses unless they ask for nothing (see openai_routes.UNSUPPORTED).
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    metadata: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Optional[str] = None
    reasoning_effort: Optional[str] = None
    safety_identifier: Optional[str] = None
    service_tier: Optional[str] = None
    store: Optional[bool] = None
    verbosity: Optional[str] = None
    web_search_options: Any = None
    # llamaforge extensions
    retrieval: Optional[Retrieval] = None
    guards: Optional[Guards] = None


class OpenAICompletionRequest(_OpenAISampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's documented default for /v1/completions
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class OpenAIEmbeddingRequest(_Strict):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


# ----------------------------------------------------------------------------------------------- Ollama
class OllamaOptions(_Strict):
    # Implemented (mapped onto the request's sampling options / window).
    num_ctx: Optional[int] = None
    num_predict: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    repeat_last_n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    # Ollama options this server refuses by name (runtime and sampling knobs it does not have).
    numa: Any = None
    num_batch: Any = None
    num_gpu: Any = None
    main_gpu: Any = None
    low_vram: Any = None
    f16_kv: Any = None
    logits_all: Any = None
    vocab_only: Any = None
    use_mmap: Any = None
    use_mlock: Any = None
    embedding_only: Any = None
    num_thread: Any = None
    num_keep: Any = None
    tfs_z: Any = None
    typical_p: Any = None
    mirostat: Any = None
    mirostat_tau: Any = None
    mirostat_eta: Any = None
    penalize_newline: Any = None


class OllamaToolCallFunction(_Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: Optional[int] = None


class OllamaToolCall(_Strict):
    function: OllamaToolCallFunction
    id: Optional[str] = None
    type: Optional[str] = None


class OllamaMessage(_Strict):
    role: str
    content: Optional[str] = ""
    images: Optional[list[Any]] = None
    thinking: Optional[str] = None
    tool_name: Optional[str] = None
    tool_calls: Optional[list[OllamaToolCall]] = None


KeepAlive = Union[int, float, str, None]


class _OllamaBase(_Strict):
    model: str
    stream: bool = True  # Ollama streams unless told not to
    format: Union[str, dict, None] = None
    options: Optional[OllamaOptions] = None
    keep_alive: KeepAlive = None
    think: Union[bool, str, None] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    retrieval: Optional[Retrieval] = None   # llamaforge extension
    guards: Optional[Guards] = None         # llamaforge extension


class OllamaGenerateRequest(_OllamaBase):
    prompt: Optional[str] = None
    suffix: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[int]] = None
    raw: bool = False
    images: Optional[list[Any]] = None
    width: Any = None
    height: Any = None
    steps: Any = None


class OllamaChatRequest(_OllamaBase):
    messages: Optional[list[OllamaMessage]] = None
    tools: Optional[list[dict[str, Any]]] = None


class OllamaEmbedRequest(_Strict):
    model: str
    input: Union[str, list[str]]
    truncate: bool = True
    options: Optional[OllamaOptions] = None
    keep_alive: KeepAlive = None
    dimensions: Optional[int] = None


class OllamaLegacyEmbeddingsRequest(_Strict):
    model: str
    prompt: str = ""
    options: Optional[OllamaOptions] = None
    keep_alive: KeepAlive = None


class OllamaModelRequest(_Strict):
    model: str = ""
    name: Optional[str] = None  # older clients send "name"
    verbose: Optional[bool] = None  # /api/show

    def model_name(self) -> str:
        name = self.model or self.name or ""
        if not name:
            raise bad_request("missing field 'model'", "model")
        return name


class OllamaCreateRequest(_Strict):
    model: str = ""
    name: Optional[str] = None
    from_: Optional[str] = Field(default=None, alias="from")
    system: Optional[str] = None
    template: Optional[str] = None
    license: Union[str, list[str], None] = None
    parameters: Optional[dict[str, Any]] = None
    messages: Optional[list[dict[str, Any]]] = None
    adapters: Optional[dict[str, str]] = None
    files: Optional[dict[str, str]] = None
    quantize: Optional[str] = None
    stream: bool = True


class OllamaPullRequest(_Strict):
    model: str = ""
    name: Optional[str] = None       # older clients send "name"
    insecure: Optional[bool] = None  # TLS to a registry: nothing to do here (local paths, Hugging Face over https)
    stream: bool = True


class OllamaCopyRequest(_Strict):
    source: str
    destination: str


# ----------------------------------------------------------------------------------------------- parsing
def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """bytes -> validated model, or ApiError(400) naming the problem (UTF-8, JSON syntax, field, type)."""
    if not raw.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except _ConstantError as e:
        raise bad_request(str(e), code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          code="invalid_json") from None
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # e.g. an integer literal of thousands of digits (Python's int-size guard)
        raise bad_request(f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_to_api_error(e) from None


class _ConstantError(ValueError):
    pass


def _reject_constant(name: str):
    # Python's json accepts NaN/Infinity; JSON does not, and NaN sampling parameters make no sense.
    raise _ConstantError(f"malformed JSON: {name} is not a valid JSON value")


def _validation_to_api_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if isinstance(p, int) or not _is_union_branch(p)]
    field = _dotted(loc)
    kind = err.get("type", "")
    if kind == "missing":
        msg = f"missing required field '{field}'"
    elif kind == "extra_forbidden":
        msg = f"unknown field '{field}': this server does not implement it"
    else:
        msg = f"invalid value for '{field}': {err.get('msg', 'invalid')}"
    code = {"missing": "missing_field", "extra_forbidden": "unsupported_field"}.get(kind, "invalid_type")
    return bad_request(msg, field or None, code=code)


def _is_union_branch(part: str) -> bool:
    # pydantic names union branches in `loc` ("str", "list[int]", ...): they are not field names.
    return part in ("str", "int", "float", "bool", "dict", "list", "none") or "[" in part or part.startswith(
        "function-") or part[:1].isupper()


def _dotted(loc: list[str]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if p.isdigit() else (("." if out else "") + p)
    return out


# ----------------------------------------------------------------------------------------------- checks
def check_max_tokens(value: int | None, field: str, *, allow_zero: bool = False) -> int | None:
    """None (up to the context), or an int in [1, MAX_TOKENS_LIMIT] (0 allowed when only scoring a prompt)."""
    if value is None:
        return None
    low = 0 if allow_zero else 1
    if value < low:
        raise bad_request(f"'{field}' must be at least {low}, got {value}", field)
    if value > MAX_TOKENS_LIMIT:
        raise bad_request(f"'{field}' is absurdly large ({value}); the limit is {MAX_TOKENS_LIMIT}", field)
    return value


def check_int(value: int | None, field: str, low: int | None = None, high: int | None = None) -> int | None:
    if value is None:
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "" if low is None else f" >= {low}"
        hi = "" if high is None else f" <= {high}"
        raise bad_request(f"'{field}' must be{lo}{' and' if lo and hi else ''}{hi}, got {value}", field)
    return value


def check_n(value: int, field: str = "n") -> int:
    if not (1 <= value <= MAX_N):
        raise bad_request(f"'{field}' must be between 1 and {MAX_N}, got {value}", field)
    return value


def check_role(role: str, field: str) -> str:
    if role not in KNOWN_ROLES:
        raise bad_request(f"unknown role {role!r} in '{field}'; expected one of "
                          + ", ".join(KNOWN_ROLES), field, code="invalid_role")
    return "system" if role == "developer" else role


def parse_keep_alive(value: KeepAlive) -> float | None:
    """Ollama keep_alive -> seconds (negative = forever, 0 = unload now), None = server default.

    Accepts numbers (seconds) and Go-style durations: "5m", "1h30m", "10s", "0", "-1". NaN and infinities are
    refused; anything longer than MAX_KEEP_ALIVE_S means "forever" (-1), as it does in practice.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise bad_request("'keep_alive' must be a number of seconds or a duration such as \"5m\"", "keep_alive")
    try:
        seconds = float(value) if isinstance(value, (int, float)) else _duration(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise bad_request("'keep_alive' must be finite", "keep_alive")
    return -1.0 if seconds > MAX_KEEP_ALIVE_S else seconds


def _duration(value: str) -> float:
    s = value.strip()
    if len(s) > 64:
        raise bad_request("'keep_alive' is too long", "keep_alive")
    try:
        return float(s)
    except ValueError:
        pass
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, num, i, sign = 0.0, "", 0, 1.0
    if s.startswith("-"):
        sign, s = -1.0, s[1:]
    while i < len(s):
        c = s[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = "ms" if s.startswith("ms", i) else c
        if unit not in units or not num:
            raise bad_request(f"'keep_alive' has an invalid duration {value!r}", "keep_alive")
        try:
            total += float(num) * units[unit]
        except ValueError:
            raise bad_request(f"'keep_alive' has an invalid duration {value!r}", "keep_alive") from None
        num, i = "", i + len(unit)
    if num:
        raise bad_request(f"'keep_alive' has an invalid duration {value!r} (missing unit)", "keep_alive")
    return sign * total
