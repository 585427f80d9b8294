"""Ollama Modelfiles: parse one into what `Store.create` takes, and write one for `show` / /api/show.

A Modelfile is a list of `INSTRUCTION arguments` lines (instructions in any case; `#` starts a comment line).
An argument is the rest of the line, a "quoted string" or a \"\"\"triple-quoted block\"\"\" that may span lines.

    FROM smollm2                 base model: a store name, or a model file/directory (relative to the Modelfile)
    PARAMETER temperature 0.2    generation default, Ollama's names (num_ctx, num_predict, stop may repeat, ...)
    TEMPLATE \"\"\"...\"\"\"           chat template: Jinja (Ollama's Go templates are refused by name)
    SYSTEM \"\"\"...\"\"\"             system prompt
    ADAPTER ./lora               PEFT LoRA adapter directory (relative to the Modelfile)
    MESSAGE user Hi              few-shot turns (system / user / assistant), placed before the conversation
    LICENSE \"\"\"...\"\"\"            license text (may repeat)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import read_bounded
from ..errors import LlamaforgeError, StoreError
from .options import ollama_options, params_to_options

MAX_MODELFILE_BYTES = 4 << 20
INSTRUCTIONS = ("from", "parameter", "template", "system", "adapter", "message", "license")
_NOT_HERE = {"requires": "REQUIRES (a minimum Ollama version) has no meaning for llamaforge",
             "parser": "PARSER (Ollama's built-in output parsers) is not supported",
             "renderer": "RENDERER (Ollama's built-in prompt renderers) is not supported; use TEMPLATE (Jinja)"}


@dataclass
class Modelfile:
    """What a Modelfile says. `from_` is the FROM text as written (a name or a path)."""

    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    adapter: str | None = None
    messages: list[dict] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)


def _arguments(text: str, pos: int, line: int) -> tuple[str, int, int]:
    """The argument starting at `pos` (after the instruction): (value, position after it, lines consumed)."""
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise StoreError(f"Modelfile line {line}: a \"\"\" block is never closed")
        value = text[pos + 3:end]
        after = end + 3
        rest_end = text.find("\n", after)
        rest_end = len(text) if rest_end < 0 else rest_end
        if text[after:rest_end].strip():
            raise StoreError(f"Modelfile line {line + value.count(chr(10))}: unexpected text after \"\"\"")
        return value, rest_end, value.count("\n")
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    return _unquote(text[pos:end].strip()), end, 0


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            out = json.loads(value)   # "a \"b\"" with escapes, as Ollama reads quoted values
        except ValueError:
            out = value[1:-1]
        return out if isinstance(out, str) else value[1:-1]
    return value


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text. Raises StoreError naming the line of anything it does not understand."""
    if not isinstance(text, str):
        raise StoreError("a Modelfile must be text")
    text = text.replace("\r\n", "\n")
    pos, line = 0, 1
    from_, params, mf = None, [], Modelfile(from_="")
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        raw = text[pos:end]
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            pos, line = end + 1, line + 1
            continue
        word = stripped.split(None, 1)[0]
        inst = word.lower()
        start = pos + raw.index(word) + len(word)
        if inst in _NOT_HERE:
            raise StoreError(f"Modelfile line {line}: {_NOT_HERE[inst]}")
        if inst not in INSTRUCTIONS:
            raise StoreError(f"Modelfile line {line}: unknown instruction {word!r} (known: "
                             f"{', '.join(i.upper() for i in INSTRUCTIONS)})")
        if inst in ("parameter", "message"):   # two arguments: a key, then a value that may be quoted
            rest = text[start:end].strip()
            key, _, _ = rest.partition(" ")
            key = key.split("\t", 1)[0]
            if not key:
                raise StoreError(f"Modelfile line {line}: {word.upper()} needs a name and a value")
            value_pos = start + text[start:end].index(key) + len(key)
            value, pos, used = _arguments(text, value_pos, line)
            if inst == "parameter":
                params.append(f"{key.lower()}={value}")
            else:
                mf.messages.append({"role": key.lower(), "content": value})
        else:
            value, pos, used = _arguments(text, start, line)
            if not value and inst in ("from", "adapter"):
                raise StoreError(f"Modelfile line {line}: {word.upper()} needs a value")
            if inst == "from":
                if from_ is not None:
                    raise StoreError(f"Modelfile line {line}: more than one FROM")
                from_ = value
            elif inst == "adapter":
                if mf.adapter is not None:
                    raise StoreError(f"Modelfile line {line}: more than one ADAPTER (one LoRA adapter per model)")
                mf.adapter = value
            elif inst == "license":
                mf.licenses.append(value)
            else:
                setattr(mf, inst, value)
        pos, line = pos + 1, line + 1 + used
    if from_ is None:
        raise StoreError("the Modelfile has no FROM line (the base model)")
    mf.from_ = from_
    try:
        mf.parameters = params_to_options(params)
    except LlamaforgeError as e:
        raise StoreError(f"Modelfile PARAMETER: {e}") from None
    return mf


def read_modelfile(path: str | Path) -> Modelfile:
    """Parse the Modelfile at `path` (bounded read, UTF-8)."""
    p = Path(path).expanduser()
    raw = read_bounded(p, MAX_MODELFILE_BYTES, "Modelfile")
    try:
        return parse_modelfile(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise StoreError(f"{p} is not UTF-8 text") from None


def create_from_modelfile(store, name: str, mf: Modelfile, base_dir: Path) -> str:
    """`Store.create` with what `mf` says; FROM and ADAPTER paths are relative to `base_dir` (the Modelfile's
    folder), as in Ollama. FROM that is neither an existing path there nor anything else is a store name."""
    base = mf.from_
    candidate = base_dir / Path(base).expanduser()
    if candidate.exists():
        base = str(candidate)
    elif not _is_name(base):
        raise StoreError(f"FROM {mf.from_}: no such model file or directory ({candidate}) and not a model name")
    adapter = None
    if mf.adapter is not None:
        adapter = base_dir / Path(mf.adapter).expanduser()
    return store.create(name, base, system=mf.system, options=mf.parameters, template=mf.template,
                        adapter=adapter, messages=mf.messages or None,
                        license=mf.licenses if mf.licenses else None)


def _is_name(s: str) -> bool:
    from .names import parse_name
    try:
        parse_name(s)
        return not s.lower().endswith(".gguf")
    except StoreError:
        return False


def _block(text: str) -> str:
    """A value as a Modelfile argument that reads back the same: a triple-quoted block, else a JSON string."""
    if '"""' in text or text.endswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return f'"""{text}"""'


def render_modelfile(name: str, defaults: dict, *, adapter_note: bool = True) -> str:
    """A Modelfile that recreates the model `name` from itself (what `ollama show --modelfile` prints)."""
    d = defaults or {}
    out = ["# Modelfile generated by llamaforge", f"FROM {name}"]
    if d.get("template"):
        out.append(f"TEMPLATE {_block(d['template'])}")
    if d.get("system"):
        out.append(f"SYSTEM {_block(d['system'])}")
    out += [f"PARAMETER {line}" for line in render_parameters(d.get("options") or {}).splitlines()]
    if d.get("adapter") and adapter_note:
        out.append(f"ADAPTER {d['adapter']}")
    out += [f"MESSAGE {m['role']} {_block(m['content'])}" for m in d.get("messages") or []]
    if d.get("license"):
        out.append(f"LICENSE {_block(d['license'])}")
    return "\n".join(out) + "\n"


def render_parameters(options: dict) -> str:
    """Stored options as Ollama's `parameters` text: one `name value` line each, Ollama's names, strings quoted."""
    lines = []
    for k, vs in ollama_options(options).items():
        for v in (vs if isinstance(vs, list) else [vs]):
            shown = json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v
            lines.append(f"{k:<30} {shown}")
    return "\n".join(lines)
