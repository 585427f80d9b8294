"""Render a model's own chat template safely: jinja2's ImmutableSandboxedEnvironment plus resource bounds.

The sandbox blocks attribute escapes (`__globals__`, `__class__`, ...); on top of it:
- any unsafe attribute access raises at once (plain jinja would render it as an empty Undefined),
- output, string concatenation (`~`, `+`), repetition (`*`), `%`-formatting and the widening filters are
  bounded by `max_output` characters,
- every `for` loop draws from one iteration budget and a wall-clock deadline, so nested loops cannot hang,
- calls (string methods such as `ljust`, filters such as `slice`) with size arguments over the bound are
  refused, `lipsum` is gone, `tojson` output is bounded,
- recursion errors become TemplateError,
- and the render itself runs in a worker process with a memory limit and a deadline after which it is killed
  (`template_worker.py`), which bounds whatever the checks above do not know about.
The options (trim_blocks, lstrip_blocks, loopcontrols, tojson, raise_exception, strftime_now) match
transformers' chat-template environment so templates render exactly as they do there.
"""
from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from ..errors import TemplateError

MAX_OUTPUT_CHARS = 1_000_000
MAX_LOOP_ITERATIONS = 1_000_000
MAX_SECONDS = 2.0   # cooperative deadline inside the worker (the worker is killed a little later)
MAX_TEMPLATE_CHARS = 200_000
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d+)")
# The budget of the render running on this thread (formats are shared by server threads).
_state = threading.local()


def _budget() -> "_Budget | None":
    return getattr(_state, "budget", None)


class _Budget:
    """Per-render limits, reset by ChatTemplate.render."""

    def __init__(self, max_output: int):
        self.max_output = max_output
        self.iterations = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def check_size(self, value: Any, what: str) -> Any:
        if hasattr(value, "__len__") and len(value) > self.max_output:
            raise TemplateError(f"chat template {what} exceeds {self.max_output} characters")
        return value

    def tick(self) -> None:
        self.iterations += 1
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise TemplateError(f"chat template runs more than {MAX_LOOP_ITERATIONS} loop iterations")
        if self.iterations % 1024 == 0:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template took longer than {MAX_SECONDS} s to render")


class _CodeGenerator(CodeGenerator):
    def visit_Concat(self, node, frame):  # `a ~ b`: bound the joined string
        self.write("environment.lf_checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Namespace(Namespace):
    """namespace() whose attributes cannot hold oversized values (blocks `ns.s = ns.s ~ ns.s` doubling)."""

    def __setitem__(self, name, value):
        budget = _budget()
        if budget is not None:
            budget.check_size(value, "namespace value")
        super().__setitem__(name, value)


class SandboxEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%", "//"])

    def __init__(self, max_output: int = MAX_OUTPUT_CHARS):
        from jinja2.ext import loopcontrols

        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.max_output = max_output
        self.filters["tojson"] = _tojson
        for name in ("center", "indent", "format", "replace", "join", "wordwrap", "slice", "batch", "truncate",
                     "tojson", "list", "string"):
            self.filters[name] = self._bounded_filter(self.filters[name], name)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.globals["lf_loop_guard"] = self._loop_guard
        self.globals["namespace"] = _Namespace
        self.globals.pop("lipsum", None)  # no chat template needs it; it can generate text for seconds

    def _limit(self) -> int:
        budget = _budget()
        return budget.max_output if budget is not None else self.max_output

    # -- sandbox hooks --
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        # Every call a template makes (string methods like 'a'.ljust(n) included): no size argument past the bound.
        limit = __self._limit()
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and a > limit:
                raise TemplateError(f"chat template call with an argument larger than {limit}")
        return __self.lf_checked(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        if operator == "**" and isinstance(right, (int, float)) and isinstance(left, (int, float)):
            bits = max(1, abs(int(left)).bit_length())
            if abs(right) > 4096 or bits * abs(right) > 65536:
                raise TemplateError("chat template exponent too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self._limit():
                    raise TemplateError(f"chat template repetition exceeds {self._limit()} items")
        if operator == "%" and isinstance(left, str):
            widths = [int(w) for w in _FORMAT_WIDTH.findall(left)]
            if widths and max(widths) > self._limit():
                raise TemplateError("chat template format width too large")
        result = super().call_binop(context, operator, left, right)
        if budget is not None and isinstance(result, (str, list, tuple)):
            budget.check_size(result, "value")
        return result

    def lf_checked(self, value):
        budget = _budget()
        if budget is not None:
            if isinstance(value, (str, list, tuple, dict)):
                budget.check_size(value, "value")
            budget.check_time()
        return value

    def _loop_guard(self, iterable):
        budget = _budget()
        for item in iterable:
            if budget is not None:
                budget.tick()
            yield item

    def _bounded_filter(self, fn, name):
        def bounded(*args, **kwargs):
            for a in list(args[1:]) + list(kwargs.values()):
                if isinstance(a, int) and a > self._limit():
                    raise TemplateError(f"chat template filter {name!r} argument too large")
            out = fn(*args, **kwargs)
            return self.lf_checked(out)
        # keep jinja's pass_eval_context / pass_environment markers
        for attr in ("jinja_pass_arg",):
            if hasattr(fn, attr):
                setattr(bounded, attr, getattr(fn, attr))
        return bounded

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        # Route every for-loop through the iteration budget.
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name("lf_loop_guard", "load"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        return tree


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, unicode kept.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateError(f"chat template error: {message}")


MAX_BLOCK_DEPTH = 64   # real chat templates nest for/if/macro blocks a handful of levels deep
_BLOCK_TAG = re.compile(r"\{%[-+]?\s*(end)?(for|if|macro|call|filter|block|with|raw)\b")


def _check_block_depth(source: str) -> None:
    """Refuse deeply nested blocks before compiling (Jinja's compiler would recurse, then Python's would fail
    with an IndentationError after seconds of work)."""
    depth = 0
    for m in _BLOCK_TAG.finditer(source):
        depth += -1 if m.group(1) else 1
        if depth > MAX_BLOCK_DEPTH:
            raise TemplateError(f"chat template nests blocks more than {MAX_BLOCK_DEPTH} levels deep")


class ChatTemplate:
    """A compiled, sandboxed chat template. `render(**context)` returns text or raises TemplateError."""

    def __init__(self, source: str, max_output: int = MAX_OUTPUT_CHARS):
        if not isinstance(source, str) or not source.strip():
            raise TemplateError("chat template is empty")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateError(f"chat template is longer than {MAX_TEMPLATE_CHARS} characters")
        self.source = source
        _check_block_depth(source)
        self.env = SandboxEnvironment(max_output)
        try:
            self.template = self.env.from_string(source)
        except JinjaTemplateError as e:
            raise TemplateError(f"chat template does not compile: {e}") from None
        except (RecursionError, MemoryError, SyntaxError):
            # Python's own compiler limits (nested parentheses, indentation levels) on the generated code.
            raise TemplateError("chat template is nested too deeply") from None

    def render(self, *, extra_output: int = 0, **context) -> str:
        """Render with `context` (JSON-like values) in a worker process; the output bound is the environment's
        plus `extra_output` (the caller's input size, so long legitimate conversations fit while a template
        cannot amplify its input)."""
        from .template_worker import render_in_worker
        return render_in_worker(self.source, self.env.max_output, max(0, int(extra_output)), context)

    def render_in_process(self, *, extra_output: int = 0, **context) -> str:
        """The render itself, with the in-process bounds (what a worker runs)."""
        env = self.env
        limit = env.max_output + max(0, int(extra_output))
        outer = _budget()  # renders do not nest today, but restore whatever was there
        _state.budget = _Budget(limit)
        out: list[str] = []
        total = 0
        try:
            for chunk in self.template.generate(**context):
                total += len(chunk)
                if total > limit:
                    raise TemplateError(f"chat template output exceeds {limit} characters")
                out.append(chunk)
        except TemplateError:
            raise
        except SecurityError as e:
            raise TemplateError(f"chat template refused by the sandbox: {e}") from None
        except JinjaTemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from None
        except RecursionError:
            raise TemplateError("chat template recursion too deep") from None
        except MemoryError:
            raise TemplateError("chat template exhausted memory") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
                OverflowError) as e:
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            _state.budget = outer
        return "".join(out)


def render_here(cache: dict, source: str, max_output: int, extra_output: int, context: dict) -> str:
    """The render a worker runs: compile (cached per source) and render with every in-process bound."""
    key = (source, max_output)
    tmpl = cache.get(key)
    if tmpl is None:
        if len(cache) >= 32:
            cache.pop(next(iter(cache)))
        tmpl = cache[key] = ChatTemplate(source, max_output)
    return tmpl.render_in_process(extra_output=extra_output, **context)
