"""THE SEAM: `plan(lm, request)` turns a dialect-neutral `GenerationRequest` into a `Plan` - prompt ids, validated
`SamplingParams`, fresh logits processors and output post-processing per choice. Every front end goes through it,
so a feature added here acts on every request whichever door it came in by.

    request -> [stage.prepare ...] -> prompt ids + SamplingParams -> engine -> [stage filters ...] -> Result

A feature is a `Stage` (`generate.stage`) in the registry (`register`), never a branch in a route handler. Stages of
this floor (constraints, tools) register here; features above it (retrieval, guards) register when
`llamaforge.api` is imported, so every front end, all of which sit above `api`, runs them.
Validation happens here, once; errors name the caller's own spelling of the field (`GenerationRequest.fields`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ContextLengthError, InvalidRequestError, TemplateError, TokenizerError
from .chat_formats import chat_format
from .engine import context_length as model_context_length, model_options
from .request import CONSTRAINT_KINDS, TOOL_CHOICES, GenerationRequest
from .sampling import LogitsProcessor, SamplingParams, check_number, check_token_ids, params_from_options
from .stage import Output, PlanContext, Refusal, Stage

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Plan:
    """Everything needed to run one request: submit `prompt_ids` with `params_for(i)` and `processors()` for each
    of `request.n` choices, and pass each choice's text through its own `output()`. When `refusal` is set the
    model must not run: answer `refusal.text` with finish_reason `refusal.reason`."""

    request: GenerationRequest
    prompt_ids: list[int]
    params: SamplingParams
    messages: list[dict] | None = None
    citations: list[dict] = field(default_factory=list)
    refusal: Refusal | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    lm: Any = None

    def params_for(self, choice: int) -> SamplingParams:
        """Choice i of n samples with seed + i, so n seeded choices differ and each is reproducible."""
        if choice == 0 or self.params.seed is None or self.params.seed == -1:
            return self.params
        return self.params.replace(seed=self.params.seed + choice)

    def processors(self) -> list[LogitsProcessor]:
        out: list[LogitsProcessor] = []
        for s in self.stages:
            out += s.processors(self)
        return out

    def output(self) -> Output:
        filters = [f for f in (s.output(self) for s in self.stages) if f is not None]
        return Output(filters, self.citations)


# Registered features, in the order they run.
STAGES: list[Stage] = []


def register(stage: Stage, *, before: str | None = None) -> Stage:
    """Add a stage (at the end, or before the stage named `before`). Returns it."""
    names = [s.name for s in STAGES]
    if stage.name in names:
        STAGES[names.index(stage.name)] = stage
    elif before in names:
        STAGES.insert(names.index(before), stage)
    else:
        STAGES.append(stage)
    return stage


# --------------------------------------------------------------------------------------------- the seam
def plan(lm, request: GenerationRequest, *, context_length: int | None = None,
         stages: Sequence[Stage] | None = None) -> Plan:
    """Validate `request` and build its `Plan` for model `lm`.

    context_length: the window the request must fit (a server engine's rows); default the model's context.
    Raises InvalidRequestError (naming the caller's field), ContextLengthError (both counts), TemplateError /
    TokenizerError (the model cannot format or encode the request).
    """
    _check_shape(request)
    ctx_len = int(context_length or model_context_length(lm))
    active = [s for s in (STAGES if stages is None else stages) if s.applies(request)]
    _refuse_unclaimed(request, active)
    ctx = PlanContext(lm, request, _normalize_messages(request) if request.messages is not None else None,
                      extra={})
    _apply_default_system(ctx)
    for s in active:
        s.prepare(ctx)
    _refuse_oversized(ctx, ctx_len)
    if ctx.messages is not None:
        prompt_ids, format_stops = _encode_chat(ctx)
    else:
        prompt_ids, format_stops = _encode_prompt(ctx), ()
    if request.context:
        tok = lm.tokenizer
        if prompt_ids and getattr(tok, "add_bos", False) and prompt_ids[0] == tok.bos_id:
            prompt_ids = prompt_ids[1:]  # the earlier exchange already starts with the BOS the tokenizer adds
        prompt_ids = list(request.context) + prompt_ids
    params = _sampling(ctx, len(prompt_ids), ctx_len, format_stops)  # the context check comes first
    check_token_ids(prompt_ids, int(lm.config.vocab_size), request.spelling("context" if request.context
                                                                             else "prompt"))
    return Plan(request=request, prompt_ids=prompt_ids, params=params, messages=ctx.messages,
                citations=ctx.citations, refusal=ctx.refusal, extra=ctx.extra, stages=active, lm=lm)


def _check_shape(req: GenerationRequest) -> None:
    if (req.messages is None) == (req.prompt is None):
        raise InvalidRequestError("give either messages (chat) or a prompt", field=req.spelling("messages"))
    if not isinstance(req.n, int) or isinstance(req.n, bool) or req.n < 1:
        raise InvalidRequestError(f"n must be a positive integer, got {req.n!r}", field=req.spelling("n"))
    if req.constraint is not None and req.constraint.kind not in CONSTRAINT_KINDS:
        raise InvalidRequestError(f"unknown constraint {req.constraint.kind!r}", field=req.spelling("constraint"))
    choice = req.tool_choice
    if not (choice in TOOL_CHOICES or (isinstance(choice, dict) and isinstance(choice.get("name"), str))):
        raise InvalidRequestError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a function name, "
                                  f"got {choice!r}", field=req.spelling("tool_choice"))


# Request features and the stage name that implements each; a request using one that no registered stage
# implements is refused (400) rather than silently served without it.
_FEATURES: list[tuple[str, Callable[[GenerationRequest], bool], str]] = [
    ("constraint", lambda r: r.constraint is not None and r.constraint.kind == "json", "json"),
    ("constraint", lambda r: r.constraint is not None and r.constraint.kind == "json_schema", "json_schema"),
    ("constraint", lambda r: r.constraint is not None and r.constraint.kind == "regex", "regex"),
    ("constraint", lambda r: r.constraint is not None and r.constraint.kind == "grammar", "grammar"),
    ("tools", lambda r: bool(r.tools) or _has_tool_messages(r), "tools"),
    ("retrieval", lambda r: r.retrieval is not None, "retrieval"),
    ("guards", lambda r: r.guards is not None and r.guards.input, "guard_input"),
    ("guards", lambda r: r.guards is not None and r.guards.output, "guard_output"),
    ("guards", lambda r: r.guards is not None and r.guards.code, "code_shield"),
]


def _has_tool_messages(r: GenerationRequest) -> bool:
    return any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in r.messages or ())


def _refuse_unclaimed(req: GenerationRequest, active: Sequence[Stage]) -> None:
    provided = set()
    for s in active:
        provided |= set(getattr(s, "provides", ()) or ())
    for field_name, used, feature in _FEATURES:
        if used(req) and feature not in provided:
            what = f"{field_name} ({feature})" if feature != field_name else field_name
            raise InvalidRequestError(f"{what} is not supported by this server", field=req.spelling(field_name))


def _normalize_messages(req: GenerationRequest) -> list[dict]:
    msgs = req.messages
    if isinstance(msgs, (str, bytes)) or not isinstance(msgs, Sequence):
        raise InvalidRequestError("messages must be a list of {'role', 'content'} objects",
                                  field=req.spelling("messages"))
    if not msgs:
        raise InvalidRequestError("messages must not be empty", field=req.spelling("messages"))
    out = []
    for i, m in enumerate(msgs):
        where = req.spelling(f"messages[{i}]")
        if not isinstance(m, dict):
            raise InvalidRequestError(f"{where} must be an object with 'role' and 'content'", field=where)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise InvalidRequestError(f"unknown role {role!r} in {where}.role; expected one of "
                                      f"{', '.join(CHAT_ROLES)}", field=f"{where}.role")
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""  # an assistant turn that only called tools
        if not isinstance(content, str):
            raise InvalidRequestError(f"{where} needs a string 'content'", field=f"{where}.content")
        out.append(dict(m, role=role, content=content))
    return out


def _refuse_oversized(ctx: PlanContext, ctx_len: int) -> None:
    """Refuse text that cannot fit the window before spending seconds tokenizing it: every token covers at most
    the longest token's bytes, so len(text) / that is a lower bound on the token count."""
    tok = ctx.lm.tokenizer
    if tok is None:
        return
    texts = [m["content"] for m in ctx.messages] if ctx.messages is not None else \
        [ctx.request.prompt] if isinstance(ctx.request.prompt, str) else []
    chars = sum(len(t) for t in texts)
    if chars <= ctx_len:  # cannot be too long: no token is shorter than one byte
        return
    at_least = chars // max_token_bytes(tok)
    if at_least >= ctx_len:
        raise ContextLengthError(at_least, ctx_len, at_least=True,
                                 field=ctx.request.spelling("messages" if ctx.messages is not None else "prompt"))


def max_token_bytes(tok) -> int:
    """The longest token of the vocabulary in bytes (computed once per tokenizer)."""
    n = tok.__dict__.get("_max_token_bytes")
    if n is None:
        n = max((len(tok.token_bytes(i)) for i in range(int(tok.vocab_size))), default=1) or 1
        tok.__dict__["_max_token_bytes"] = n
    return n


def _apply_default_system(ctx: PlanContext) -> None:
    """The model's stored system prompt (`llamaforge create --system`, Modelfile SYSTEM) when the conversation has
    none, then its few-shot turns (Modelfile MESSAGE) after the leading system turns and before the caller's own
    (as Ollama prepends them); not when continuing an earlier exchange (`context`), which already holds them."""
    defaults = getattr(ctx.lm, "defaults", None) or {}
    if ctx.messages is None:
        return
    system = defaults.get("system")
    if system and not any(m["role"] == "system" for m in ctx.messages):
        ctx.messages.insert(0, {"role": "system", "content": system})
    shots = defaults.get("messages") or []
    if shots and not ctx.request.context:
        lead = next((i for i, m in enumerate(ctx.messages) if m["role"] != "system"), len(ctx.messages))
        ctx.messages[lead:lead] = [{"role": m["role"], "content": m["content"]} for m in shots]


def _encode_chat(ctx: PlanContext) -> tuple[list[int], tuple[int, ...]]:
    fmt = chat_format(ctx.lm)
    try:
        ids = fmt.encode(ctx.messages, add_generation_prompt=True, **ctx.format_kwargs)
    except TemplateError as e:
        raise InvalidRequestError(f"cannot format messages: {e}", field=ctx.request.spelling("messages")) from None
    return list(ids), tuple(sorted(getattr(fmt, "stop_ids", ()) or ()))


def encode_prompt(lm, prompt, field_name: str = "prompt") -> list[int]:
    """Token ids for a raw prompt: text through the tokenizer (BOS as the model expects; control-token text stays
    plain text), token ids passed through (checked against the vocabulary by the caller)."""
    if isinstance(prompt, str):
        if lm.tokenizer is None:
            raise TokenizerError("this model has no tokenizer; pass token ids")
        ids = list(lm.tokenizer.encode(prompt, add_special=True))
    elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise InvalidRequestError("the prompt must be a string or a list of token ids", field=field_name)
    else:
        ids = list(prompt)
    if not ids:
        raise InvalidRequestError("the prompt is empty", field=field_name)
    return ids


def _encode_prompt(ctx: PlanContext) -> list[int]:
    req = ctx.request
    if req.context and isinstance(req.prompt, str):
        # Continuing an earlier exchange: its ids already start with BOS (an empty prompt adds nothing).
        return list(ctx.lm.tokenizer.encode(req.prompt)) if ctx.lm.tokenizer is not None and req.prompt else []
    return encode_prompt(ctx.lm, req.prompt, req.spelling("prompt"))


def _sampling(ctx: PlanContext, prompt_len: int, ctx_len: int, format_stops: tuple[int, ...]) -> SamplingParams:
    """Layers, lowest first: SamplingParams defaults, the front end's defaults, the model's stored options, the
    request's own values. max_tokens left unset means "fill the context"."""
    req = ctx.request
    if prompt_len >= ctx_len:
        raise ContextLengthError(prompt_len, ctx_len)
    try:
        stored = params_from_options({k: v for k, v in (model_options(ctx.lm)).items() if k != "num_ctx"})
    except InvalidRequestError as e:
        raise InvalidRequestError(f"the model's stored parameter is invalid: {e}", field=e.field) from None
    known = SamplingParams.field_names()
    for k in req.options:
        if k not in known:
            raise InvalidRequestError(f"unknown sampling parameter {k!r}", field=req.spelling(k))
    values: dict[str, Any] = {}
    for layer in (req.defaults, stored, req.options):
        values.update({k: v for k, v in layer.items() if v is not None})
    room = ctx_len - prompt_len
    if values.get("max_tokens") is None:
        values["max_tokens"] = room
    stops = tuple(i for i in format_stops if i not in tuple(values.get("stop_ids") or ()))
    if stops and not values.get("ignore_eos"):
        values["stop_ids"] = tuple(values.get("stop_ids") or ()) + stops
    try:
        for name, (lo, hi) in req.limits.items():
            if req.options.get(name) is not None:
                check_number(req.options[name], name, lo, hi)
        return SamplingParams.from_kwargs(**values)
    except InvalidRequestError as e:
        name = req.spelling(e.field)
        msg = str(e)
        if e.field and name != e.field and msg.startswith(e.field):
            msg = name + msg[len(e.field):]
        raise InvalidRequestError(msg, field=name) from None


def _builtin_stages() -> None:
    from .constraints.stage import ConstraintStage
    from .tools.stage import ToolStage
    register(ToolStage())        # first: its output filter takes call text out before the constraint's check
    register(ConstraintStage())


_builtin_stages()
