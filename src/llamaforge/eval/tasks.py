"""Benchmark tasks: a small YAML file that says how to turn each record of a JSONL file into a prompt and what
counts as right.

    name: world_facts
    kind: multiple_choice          # or: generation
    data: world_facts.jsonl        # relative to the YAML file
    prompt: "Question: {question}\\nAnswer:"
    choices: choices               # multiple choice: the field with the list of choices (at least 2)
    answer: answer                 # ... and the field with the right one (its index, or its text)
    choice_prefix: " "             # put before each choice when scoring it (default one space)
    references: answers            # generation: the field with the reference answer (a string or a list)
    chat: false                    # generation: send the prompt as a user message through the chat template
    max_tokens: 32                 # generation: tokens to generate at most
    stop: ["\\n"]                  # generation: stop strings
    metrics: [exact_match, f1]     # default: acc, acc_norm / exact_match, f1, bleu, chrf, rouge_l
    perturb: [question]            # fields the robustness mode perturbs (default: every field of the prompt)
    description, license, source   # free text, shown in reports

`{field}` in `prompt` is replaced by the record's field (`{{` and `}}` are literal braces); nothing else in the
template is interpreted. Every error names the file, and for data the line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._fs import read_text_bounded, loads_json
from ..errors import LlamaforgeError
from .metrics import CHOICE_METRICS, GENERATION_METRICS

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MAX_YAML_BYTES = 1 << 20
MAX_DATA_BYTES = 256 << 20
KINDS = ("multiple_choice", "generation")
_KEYS = {"name", "kind", "data", "prompt", "choices", "answer", "choice_prefix", "references", "chat",
         "max_tokens", "stop", "metrics", "perturb", "description", "license", "source"}
_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


class TaskError(LlamaforgeError):
    """A task file or its data is missing or malformed. `path` and `line` (1-based, or None) say where."""

    def __init__(self, path, reason: str, line: int | None = None):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{self.path}{f':{line}' if line else ''}: {reason}")


@dataclass
class Item:
    """One example: its record, the line it came from, and what the task derived from it."""

    line: int
    record: dict
    choices: list[str] = field(default_factory=list)   # multiple choice
    answer: int = -1                                    # index of the right choice
    references: list[str] = field(default_factory=list)  # generation


@dataclass
class Task:
    name: str
    kind: str
    path: Path
    data_path: Path
    prompt: str
    items: list[Item]
    choices_field: str | None = None
    answer_field: str | None = None
    choice_prefix: str = " "
    references_field: str | None = None
    chat: bool = False
    max_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    metrics: list[str] = field(default_factory=list)
    perturb_fields: list[str] = field(default_factory=list)
    description: str = ""
    license: str = ""
    source: str = ""

    def render(self, record: dict) -> str:
        """The prompt for one record."""
        return render_template(self.prompt, record)

    def continuation(self, choice: str) -> str:
        return self.choice_prefix + choice


def template_fields(template: str) -> list[str]:
    return [m.group(1) for m in _FIELD.finditer(template) if m.group(1)]


def render_template(template: str, record: dict) -> str:
    def sub(m):
        tok = m.group(0)
        if tok in ("{{", "}}"):
            return tok[0]
        return str(record[m.group(1)])
    return _FIELD.sub(sub, template)


def shipped_tasks() -> list[str]:
    """Names of the tasks that ship with llamaforge."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def resolve_task(name_or_path: str) -> Path:
    """A task's YAML path from a path or the name of a shipped task."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name_or_path:
        if p.is_dir():
            raise TaskError(p, "is a directory; give the task's YAML file")
        if not p.is_file():
            raise TaskError(p, "task file does not exist")
        return p
    q = TASKS_DIR / f"{name_or_path}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name_or_path) or not q.is_file():
        raise TaskError(name_or_path, f"no such task file, and no shipped task of that name (shipped: "
                                      f"{', '.join(shipped_tasks())})")
    return q


def load_task(name_or_path: str | Path) -> Task:
    """Read and validate a task (YAML + its JSONL data). Raises TaskError naming file and line."""
    path = resolve_task(str(name_or_path))
    text = read_text_bounded(path, MAX_YAML_BYTES, f"task file {path}")
    if not text.strip():
        raise TaskError(path, "the task file is empty")
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise TaskError(path, f"not valid YAML: {getattr(e, 'problem', None) or e}",
                        mark.line + 1 if mark is not None else None) from None
    if not isinstance(spec, dict):
        raise TaskError(path, "the task file must be a YAML mapping (name, kind, data, prompt, ...)")
    unknown = sorted(set(map(str, spec)) - _KEYS)
    if unknown:
        raise TaskError(path, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    task = _task_from_spec(path, spec)
    task.items = _read_items(task)
    return task


def _get(path, spec, key, types, default=None, required=False):
    if key not in spec or spec[key] is None:
        if required:
            raise TaskError(path, f"missing required key '{key}'")
        return default
    v = spec[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
        raise TaskError(path, f"'{key}' has the wrong type ({type(v).__name__})")
    return v


def _str_list(path, spec, key, default):
    v = _get(path, spec, key, (list, str), default)
    v = [v] if isinstance(v, str) else v
    if not all(isinstance(x, str) for x in v):
        raise TaskError(path, f"'{key}' must be a list of strings")
    return list(v)


def _task_from_spec(path: Path, spec: dict) -> Task:
    kind = _get(path, spec, "kind", str, required=True)
    if kind not in KINDS:
        raise TaskError(path, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    data = _get(path, spec, "data", str, required=True)
    prompt = _get(path, spec, "prompt", str, required=True)
    if not prompt:
        raise TaskError(path, "'prompt' is empty")
    bad = [m.group(0) for m in _FIELD.finditer(prompt) if m.group(0) in ("{", "}")]
    if bad:
        raise TaskError(path, "'prompt' has a lone brace; write {{ or }} for a literal one, {field} for a field")
    data_path = (path.parent / data).resolve()
    t = Task(name=_get(path, spec, "name", str, path.stem), kind=kind, path=path, data_path=data_path,
             prompt=prompt, items=[], description=_get(path, spec, "description", str, ""),
             license=_get(path, spec, "license", str, ""), source=_get(path, spec, "source", str, ""))
    fields = template_fields(prompt)
    if kind == "multiple_choice":
        t.choices_field = _get(path, spec, "choices", str, "choices")
        t.answer_field = _get(path, spec, "answer", str, "answer")
        t.choice_prefix = _get(path, spec, "choice_prefix", str, " ")
        t.metrics = _str_list(path, spec, "metrics", list(CHOICE_METRICS))
        allowed = CHOICE_METRICS
        for k in ("references", "chat", "max_tokens", "stop"):
            if k in spec:
                raise TaskError(path, f"'{k}' is for generation tasks, not multiple choice")
    else:
        t.references_field = _get(path, spec, "references", str, "answer")
        t.chat = _get(path, spec, "chat", bool, False)
        t.max_tokens = _get(path, spec, "max_tokens", int, 32)
        if not 1 <= t.max_tokens <= 4096:
            raise TaskError(path, f"max_tokens must be between 1 and 4096, got {t.max_tokens}")
        t.stop = _str_list(path, spec, "stop", ["\n"])
        t.metrics = _str_list(path, spec, "metrics", list(GENERATION_METRICS))
        allowed = GENERATION_METRICS
        for k in ("choices", "answer", "choice_prefix"):
            if k in spec:
                raise TaskError(path, f"'{k}' is for multiple-choice tasks, not generation")
    wrong = [m for m in t.metrics if m not in allowed]
    if wrong or not t.metrics:
        raise TaskError(path, f"metric(s) {', '.join(wrong) or '(none)'} not available for {kind}; choose from "
                              f"{', '.join(allowed)}")
    t.perturb_fields = _str_list(path, spec, "perturb", fields)
    missing = [f for f in t.perturb_fields if f not in fields]
    if missing:
        raise TaskError(path, f"'perturb' names field(s) {', '.join(missing)} that the prompt does not use")
    return t


def _read_items(t: Task) -> list[Item]:
    if not t.data_path.is_file():
        raise TaskError(t.data_path, f"data file of task {t.name!r} does not exist")
    text = read_text_bounded(t.data_path, MAX_DATA_BYTES, f"task data {t.data_path}")
    fields = template_fields(t.prompt)
    items: list[Item] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = loads_json(line)
        except json.JSONDecodeError as e:
            raise TaskError(t.data_path, f"malformed JSON: {e.msg} (column {e.colno})", n) from None
        if not isinstance(rec, dict):
            raise TaskError(t.data_path, "each line must be a JSON object", n)
        for f in fields:
            if f not in rec:
                raise TaskError(t.data_path, f"missing field '{f}' used by the prompt", n)
            if not isinstance(rec[f], (str, int, float)) or isinstance(rec[f], bool):
                raise TaskError(t.data_path, f"field '{f}' must be a string or a number", n)
        items.append(_choice_item(t, rec, n) if t.kind == "multiple_choice" else _generation_item(t, rec, n))
    if not items:
        raise TaskError(t.data_path, f"data file of task {t.name!r} has no examples")
    return items


def _choice_item(t: Task, rec: dict, n: int) -> Item:
    choices = rec.get(t.choices_field)
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TaskError(t.data_path, f"'{t.choices_field}' must be a list of strings", n)
    if len(choices) < 2:
        raise TaskError(t.data_path, f"'{t.choices_field}' has {len(choices)} choice(s); a multiple-choice item "
                                     "needs at least 2", n)
    if any(not c for c in choices):
        raise TaskError(t.data_path, f"'{t.choices_field}' has an empty choice", n)
    ans: Any = rec.get(t.answer_field)
    if isinstance(ans, str) and not ans.lstrip("-").isdigit():
        if ans not in choices:
            raise TaskError(t.data_path, f"answer {ans!r} is not one of the choices", n)
        ans = choices.index(ans)
    elif isinstance(ans, str):
        ans = int(ans)
    if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(choices):
        raise TaskError(t.data_path, f"'{t.answer_field}' must be the index (0..{len(choices) - 1}) or the text "
                                     f"of the right choice, got {rec.get(t.answer_field)!r}", n)
    return Item(n, rec, choices=list(choices), answer=ans)


def _generation_item(t: Task, rec: dict, n: int) -> Item:
    refs = rec.get(t.references_field)
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise TaskError(t.data_path, f"'{t.references_field}' must be a reference string or a non-empty list of "
                                     "them", n)
    return Item(n, rec, references=list(refs))
