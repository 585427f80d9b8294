"""What a manifest may set besides weights: generation options (`create --param KEY=VALUE`, Modelfile
PARAMETER) and a chat template, each validated before it is stored."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

from ..errors import LlamaforgeError, StoreError

MAX_TEMPLATE_BYTES = 256 * 1024


# Go text/template actions as Ollama's TEMPLATE uses them: {{ .Prompt }}, {{- if .System }}, {{ range .Messages }},
# {{ $x := ... }}, {{ end }}. None of these is valid Jinja, so the test never refuses a template Jinja accepts
# except one printing a variable literally called `end` / `else` on its own.
_GO_ACTION_RE = re.compile(r"\{\{-?\s*(?:[.$]|(?:if|range|with|define|template|block)\s|(?:end|else)\s*-?\}\})")


def validate_template(text: str) -> None:
    """A chat template must be UTF-8 Jinja that parses (parsing executes nothing), at most 256 KiB. Ollama's Go
    templates are refused by name: rendering them as Jinja would silently produce a wrong prompt."""
    if not isinstance(text, str):
        raise StoreError("template must be text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise StoreError(f"template is larger than {MAX_TEMPLATE_BYTES // 1024} KiB")
    go = _GO_ACTION_RE.search(text)
    if go:
        line = text.count("\n", 0, go.start()) + 1
        raise StoreError(f"template is a Go template (line {line}: {go.group(0)!r}...), Ollama's format, which "
                         "llamaforge does not render; write it in Jinja as Hugging Face chat templates are, "
                         "e.g. {% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
                         "{% endfor %}")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        raise StoreError(f"template is not valid Jinja (line {e.lineno}: {e.message})") from None


MAX_MESSAGES = 256
MAX_TEXT_BYTES = 1 << 20   # all few-shot turns together, or all license texts together
_ROLES = ("system", "user", "assistant")


def check_messages(messages) -> list[dict]:
    """Few-shot turns a model carries (Modelfile MESSAGE, /api/create `messages`): [{role, content}], roles
    system / user / assistant, bounded in count and size."""
    if not isinstance(messages, list):
        raise StoreError("messages must be a list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise StoreError(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out, size = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise StoreError(f"messages[{i}] must be an object with role and content")
        extra = set(m) - {"role", "content"}
        if extra:
            raise StoreError(f"messages[{i}].{sorted(extra)[0]} is not supported (a model's messages are text "
                             "turns: role and content)")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise StoreError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise StoreError(f"messages[{i}].content must be text")
        size += len(content.encode("utf-8", "surrogatepass"))
        out.append({"role": role, "content": content})
    if size > MAX_TEXT_BYTES:
        raise StoreError(f"messages are larger than {MAX_TEXT_BYTES >> 20} MiB together")
    return out


def check_license(license) -> str:
    """License text(s) a model carries (Modelfile LICENSE may repeat; /api/create takes a string or a list)."""
    texts = [license] if isinstance(license, str) else license
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise StoreError("license must be text or a list of texts")
    text = "\n\n".join(t.strip("\n") for t in texts)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise StoreError(f"license is larger than {MAX_TEXT_BYTES >> 20} MiB")
    return text


# Generation parameters a manifest may set: the SamplingParams fields, plus Ollama spellings.
OPTION_ALIASES = {"num_predict": "max_tokens", "repeat_last_n": "repeat_last_n"}
_OPTION_TYPES = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
                 "repeat_penalty": float, "presence_penalty": float, "frequency_penalty": float,
                 "repeat_last_n": int, "seed": int, "stop": list, "logprobs": int, "ignore_eos": bool,
                 "num_ctx": int}
MAX_NUM_CTX = 1 << 20


def parse_param(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value) with the value read as int, float, bool or string. The key keeps the caller's
    spelling (`num_predict`); `validate_options` maps it, so its errors can name what was typed."""
    key, sep, value = str(text).partition("=")
    key = key.strip().lower()
    if not sep or not key:
        raise StoreError(f"parameter {text!r} must look like KEY=VALUE")
    v: Any = value
    low = value.strip().lower()
    if low in ("true", "false"):
        v = low == "true"
    else:
        for conv in (int, float):
            try:
                v = conv(value)
                break
            except ValueError:
                continue
    return key, v


def params_to_options(params: Iterable[str]) -> dict:
    """Repeated `KEY=VALUE` strings -> an options dict; `stop` may repeat and collects a list."""
    opts: dict[str, Any] = {}
    for p in params:
        k, v = parse_param(p)
        if k == "stop":
            opts.setdefault("stop", []).append(str(p.partition("=")[2]))
        else:
            opts[k] = v
    return opts


def validate_options(opts: dict) -> dict:
    """Check generation options: known names, right types, valid values (via the engine's SamplingParams).
    `num_ctx` (the model's context window, Ollama's PARAMETER num_ctx) is kept beside the sampling options.
    Errors name the option as the caller spelled it (`num_predict`, not `max_tokens`)."""
    if not isinstance(opts, dict):
        raise StoreError("options must be an object")
    out, spelled = {}, {}
    for k, v in opts.items():
        given = str(k).lower()
        k = OPTION_ALIASES.get(given, given)
        spelled[k] = given
        if k not in _OPTION_TYPES:
            known = sorted({*_OPTION_TYPES, *OPTION_ALIASES})
            raise StoreError(f"unknown parameter {given!r} (known: {', '.join(known)})")
        typ = _OPTION_TYPES[k]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if typ is list and isinstance(v, str):
            v = [v]
        if typ is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        ok = isinstance(v, typ) and not (typ in (int, float) and isinstance(v, bool))
        if typ is list:
            ok = isinstance(v, list) and all(isinstance(s, str) for s in v)
        if not ok:
            raise StoreError(f"parameter {given!r} must be {typ.__name__}, got {v!r}")
        if k == "max_tokens" and v in (-1, -2):
            continue  # Ollama: -1 = no limit, -2 = fill the context; the window bounds generation anyway
        out[k] = v
    if "num_ctx" in out and not (1 <= out["num_ctx"] <= MAX_NUM_CTX):
        raise StoreError(f"parameter {spelled['num_ctx']!r} must be between 1 and {MAX_NUM_CTX}, "
                         f"got {out['num_ctx']}")
    from ..generate.sampling import SamplingParams  # the one set of rules for values (ranges, finiteness)
    try:
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        SamplingParams(**{k: v for k, v in out.items() if k in names}).validate()
    except LlamaforgeError as e:
        field = getattr(e, "field", None)
        msg = str(e)
        if field and field in spelled and msg.startswith(field):
            msg = spelled[field] + msg[len(field):]
        raise StoreError(f"invalid parameter: {msg}") from None
    except (TypeError, ValueError) as e:
        raise StoreError(f"invalid parameter: {e}") from None
    return out


def ollama_options(opts: dict) -> dict:
    """Stored options under Ollama's names (`max_tokens` -> `num_predict`), for Modelfiles and /api/show."""
    back = {v: k for k, v in OPTION_ALIASES.items() if k != v}
    return {back.get(k, k): v for k, v in (opts or {}).items()}
