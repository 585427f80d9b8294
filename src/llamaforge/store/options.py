"""What a manifest may set besides weights: generation options (`create --param KEY=VALUE`, Modelfile
PARAMETER) and a chat template, each validated before it is stored."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from ..errors import LlamaforgeError, StoreError

MAX_TEMPLATE_BYTES = 256 * 1024


def validate_template(text: str) -> None:
    """A chat template must be UTF-8 Jinja that parses (parsing executes nothing), at most 256 KiB."""
    if not isinstance(text, str):
        raise StoreError("template must be text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise StoreError(f"template is larger than {MAX_TEMPLATE_BYTES // 1024} KiB")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        raise StoreError(f"template is not valid Jinja (line {e.lineno}: {e.message})") from None


# Generation parameters a manifest may set: the SamplingParams fields, plus Ollama spellings.
OPTION_ALIASES = {"num_predict": "max_tokens", "repeat_last_n": "repeat_last_n"}
_OPTION_TYPES = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
                 "repeat_penalty": float, "presence_penalty": float, "frequency_penalty": float,
                 "repeat_last_n": int, "seed": int, "stop": list, "logprobs": int, "ignore_eos": bool,
                 "num_thread": int}


def parse_param(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value) with the value read as int, float, bool or string."""
    key, sep, value = str(text).partition("=")
    key = key.strip().lower()
    if not sep or not key:
        raise StoreError(f"parameter {text!r} must look like KEY=VALUE")
    key = OPTION_ALIASES.get(key, key)
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
    """Check generation options: known names, right types, valid values (via the engine's SamplingParams)."""
    if not isinstance(opts, dict):
        raise StoreError("options must be an object")
    out = {}
    for k, v in opts.items():
        k = OPTION_ALIASES.get(str(k).lower(), str(k).lower())
        if k not in _OPTION_TYPES:
            raise StoreError(f"unknown parameter {k!r} (known: {', '.join(sorted(_OPTION_TYPES))})")
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
            raise StoreError(f"parameter {k!r} must be {typ.__name__}, got {v!r}")
        if k == "num_thread":
            from ..threads import parse_threads
            try:
                parse_threads(v, "num_thread")
            except LlamaforgeError as e:
                raise StoreError(f"invalid parameter: {e}") from None
        out[k] = v
    from ..generate.sampling import SamplingParams  # the one set of rules for values (ranges, finiteness)
    try:
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        SamplingParams(**{k: v for k, v in out.items() if k in names}).validate()
    except LlamaforgeError as e:
        raise StoreError(f"invalid parameter: {e}") from None
    except (TypeError, ValueError) as e:
        raise StoreError(f"invalid parameter: {e}") from None
    return out
