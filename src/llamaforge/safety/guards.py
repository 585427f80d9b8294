"""Loading guards: `load_guard(model=None, ...)`.

- model None or "builtin": llamaforge's built-in guard (`builtin_guard.HeadGuard`), a classifier head over the
  default model SmolLM2-135M-Instruct, which every install already has.
- any other store name or path: a Llama Guard 3 / 4 model. Its vocabulary must carry the format's control tokens
  and, when the model ships a chat template, that template must be Meta's guard prompt; otherwise the load fails
  with a `GuardError` that says why (a chat model is not a guard).
- a `LoadedModel` works the same way (the caller loaded it); a ready guard object is returned as it is.

Guards are cached per (model, settings) so every request of a server shares one.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import LlamaforgeError
from .categories import LLAMA_GUARD_3, MLCOMMONS, custom_categories
from .classifier import DEFAULT_WINDOW, Guard, GuardError
from .guard_format import LLAMA_GUARD_3 as LG3_FORMAT
from .guard_format import LLAMA_GUARD_4 as LG4_FORMAT

BUILTIN = "builtin"
_GUARD_MARKERS = ("UNSAFE CONTENT CATEGORIES", "unsafe content in")

_cache: dict[tuple, Guard] = {}
_lock = threading.Lock()


def load_guard(model=None, *, categories=None, excluded: Sequence[str] = (), threshold: float = 0.5,
               thresholds: Mapping[str, float] | None = None, window: int = DEFAULT_WINDOW) -> Guard:
    """A ready `Guard` (cached). See the module docstring for `model` (a `Guard` is returned as it is);
    `categories` (a mapping or list, Llama Guard models only), `excluded` codes, `threshold` and per-code
    `thresholds` as in `Guard`."""
    if isinstance(model, Guard) or callable(getattr(model, "check", None)):
        return model  # a ready guard (anything with check(content, role=...) -> Verdict)
    key = (id(model) if not isinstance(model, (str, type(None), Path)) else str(model or BUILTIN),
           repr(categories), tuple(excluded), float(threshold), tuple(sorted((thresholds or {}).items())), window)
    with _lock:
        g = _cache.get(key)
        if g is not None:
            return g
    g = _build(model, categories, excluded, threshold, thresholds, window)
    with _lock:
        _cache.setdefault(key, g)
        return _cache[key]


def _build(model, categories, excluded, threshold, thresholds, window) -> Guard:
    if model is None or model == BUILTIN:
        if categories is not None:
            raise GuardError("the built-in guard knows the fixed S1-S14 taxonomy; custom categories need a "
                             "Llama Guard model (--guard-model)")
        from .builtin_guard import HeadGuard
        return HeadGuard(builtin_model(), excluded=excluded, threshold=threshold, thresholds=thresholds)
    lm = model
    if isinstance(model, (str, Path)):
        lm = load_model_for_guard(str(model))
    fmt = detect_format(lm)
    cats = custom_categories(categories) if categories is not None else \
        (LLAMA_GUARD_3 if fmt is LG3_FORMAT else MLCOMMONS)
    return Guard(lm, fmt, cats, name=getattr(lm, "name", None) or str(model), excluded=excluded,
                 threshold=threshold, thresholds=thresholds, window=window)


def detect_format(lm):
    """The Llama Guard format a loaded model speaks, or GuardError saying why it is not a guard model."""
    tok = getattr(lm, "tokenizer", None)
    name = getattr(lm, "name", None) or str(getattr(lm, "path", "") or "the model")
    if tok is None:
        raise GuardError(f"{name} has no tokenizer, so it cannot be a Llama Guard model")
    specials = tok.special_tokens
    if all(t in specials for t in LG3_FORMAT.required_tokens):
        fmt = LG3_FORMAT
    elif all(t in specials for t in LG4_FORMAT.required_tokens):
        fmt = LG4_FORMAT
    else:
        raise GuardError(f"{name} is not in Llama Guard format: its vocabulary has neither the Llama 3 "
                         f"(<|start_header_id|>, <|eot_id|>) nor the Llama 4 (<|header_start|>, <|eot|>) "
                         f"header tokens that Llama Guard prompts need")
    template = getattr(tok, "chat_template", None) or (getattr(lm, "metadata", None) or {}).get("chat_template")
    if template and not any(m in template for m in _GUARD_MARKERS):
        raise GuardError(f"{name} is not a Llama Guard model: its chat template is an ordinary chat format, not "
                         f"Meta's guard prompt (no 'UNSAFE CONTENT CATEGORIES'); pass a Llama Guard 3 or 4 model")
    if not template and "guard" not in name.lower():
        raise GuardError(f"{name} carries no chat template and its name does not say it is a Llama Guard model; "
                         f"pass a Llama Guard 3 or 4 model (GGUF or HF directory with its chat template)")
    return fmt


_builtin_lock = threading.Lock()
_builtin: dict[str, object] = {}


def builtin_model():
    """SmolLM2 as the built-in guard reads it (loaded once per process, quantized fast path, no compiled step)."""
    with _builtin_lock:
        lm = _builtin.get("lm")
        if lm is None:
            try:
                lm = load_model_for_guard("smollm2")
            except LlamaforgeError as e:
                raise GuardError(f"the built-in guard needs the default model smollm2: {e}") from None
            _builtin["lm"] = lm
        return lm


def load_model_for_guard(name: str):
    """A model by store name or path, as `llamaforge.load` gives it (fast in-memory format, a stored adapter
    applied) minus the compiled decode step, which a guard does not need. (Loaded here, from the floors below,
    because `llamaforge.api` imports the guard stages.)"""
    from ..formats.load import load_model
    from ..store import resolve
    ref = resolve(name)
    adapter = (ref.defaults or {}).get("adapter")
    lm = load_model(ref.path, quant=None if adapter else "auto")
    lm.name = ref.name or Path(ref.path).name
    lm.defaults = dict(ref.defaults or {})
    if adapter:
        from ..train.lora import apply_adapter
        apply_adapter(lm, adapter)
    return lm
