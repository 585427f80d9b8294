"""The package's floors, read from the code: every module's imports (absolute and relative, at module level or
inside functions, `importlib.import_module` with a literal name too) are collected with `ast`, and the build fails
on an import of a higher floor, an import circle between modules, a module without a floor, or a module over 600
lines. A failure names the module, the line and what it imports.

Floors (docs/DESIGN.md): a module imports only from its own floor or below. A new top-level module or package must
be given a floor here; the feature packages of floor 4 (eval/, rag/, safety/) are listed before they exist, so they
are covered the day they land.

Imports under `if TYPE_CHECKING:` never run, so they do not make circles; they do count for floors (a lower floor
must not even name a higher floor's types).
"""
from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

import llamaforge

PACKAGE = "llamaforge"
FLOORS = {
    "config": 0, "errors": 0, "_fs": 0, "gguf_header": 0, "threads": 0,
    "model": 1, "tokenizer": 1,
    "formats": 2,
    "generate": 3, "train": 3, "store": 3,
    "": 4, "api": 4, "eval": 4, "rag": 4, "safety": 4,     # "": the root llamaforge/__init__.py
    "server": 5,
    "cli": 6, "__main__": 6,
}
MAX_LINES = 600


@dataclass(frozen=True)
class Import:
    source: str        # importing module, dotted
    target: str        # imported module (or the package, when the imported name is not a module)
    file: str          # path of the importing file, relative to the package's parent
    line: int
    type_only: bool    # under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def discover(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root`."""
    mods = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, type_only: bool = False):
    """(node, type_only) for every import statement and literal `import_module(...)` call, at any depth."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_only
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name == "import_module" and node.args:
                yield node, type_only
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), type_only)
        else:
            yield from _import_nodes(node, type_only)


def _literal_module(arg: ast.expr) -> str | None:
    """The module a literal `import_module` argument names; for an f-string, the package its constant prefix
    names (`f"llamaforge.cli.{name}"` -> llamaforge.cli)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        return prefix.rsplit(".", 1)[0] if "." in prefix else None
    return None


def collect_imports(root: Path) -> tuple[dict[str, Path], list[Import]]:
    """Every module of the package at `root` and every import among them."""
    mods = discover(root)
    name = root.name
    out = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        rel = str(path.relative_to(root.parent))
        for node, type_only in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg itself.
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in mods else base_name
                           for a in node.names]
            else:
                lit = _literal_module(node.args[0])
                targets = [lit] if lit else []
            for t in targets:
                if t == name or t.startswith(name + "."):
                    # `import llamaforge.x.y` or a name inside a module: the deepest module that exists.
                    while t not in mods and "." in t:
                        t = t.rpartition(".")[0]
                    out.append(Import(mod, t, rel, node.lineno, type_only))
    return mods, out


def floor_of(module: str, floors: dict[str, int] = FLOORS) -> int | None:
    parts = module.split(".")[1:]
    return floors.get(parts[0] if parts else "")


def upward_imports(imports: list[Import], floors: dict[str, int] = FLOORS) -> list[str]:
    bad = []
    for imp in imports:
        src, dst = floor_of(imp.source, floors), floor_of(imp.target, floors)
        if src is not None and dst is not None and dst > src:
            bad.append(f"{imp.where()}: {imp.source} (floor {src}) imports {imp.target} (floor {dst})")
    return bad


def import_circles(imports: list[Import]) -> list[str]:
    """One line per circle (strongly connected group of modules): a shortest loop through it, each step with
    the file and line of its import."""
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in imports:
        if not imp.type_only and imp.source != imp.target:
            edges[imp.source].setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on_stack, groups = [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        start = min(group)
        prev = {start: None}
        queue = deque([start])
        loop_end = None
        while queue and loop_end is None:  # breadth first: the shortest way back to `start`
            v = queue.popleft()
            for w in sorted(edges[v]):
                if w == start:
                    loop_end = v
                    break
                if w in group and w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = [loop_end]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        path.reverse()
        steps = [edges[a][b] for a, b in zip(path, path[1:] + [start])]
        out.append(f"circle of {len(group)} modules ({', '.join(sorted(group))}): "
                   + " -> ".join(f"{s.source} [{s.where()}]" for s in steps) + f" -> {start}")
    return out


def long_modules(mods: dict[str, Path], limit: int = MAX_LINES) -> list[str]:
    top = mods[min(mods, key=len)].parent.parent   # the folder holding the package
    out = []
    for path in mods.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{path.relative_to(top)}: {n} lines, more than {limit}")
    return out


# --------------------------------------------------------------------------------------------- the package
ROOT = Path(llamaforge.__file__).resolve().parent


@pytest.fixture(scope="module")
def package():
    return collect_imports(ROOT)


def test_every_module_has_a_floor(package):
    mods, _ = package
    missing = sorted(m for m in mods if floor_of(m) is None)
    assert not missing, "modules without a floor (add their package to FLOORS and docs/DESIGN.md):\n" + \
        "\n".join(missing)


def test_no_module_imports_a_higher_floor(package):
    _, imports = package
    bad = upward_imports(imports)
    assert not bad, "imports of a higher floor:\n" + "\n".join(bad)


def test_no_import_circles(package):
    _, imports = package
    bad = import_circles(imports)
    assert not bad, "import circles:\n" + "\n".join(bad)


def test_no_module_is_over_600_lines(package):
    mods, _ = package
    bad = long_modules(mods)
    assert not bad, "modules over the size limit:\n" + "\n".join(bad)


# --------------------------------------------------------------------------------------------- the checker
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_the_checker_finds_what_it_should(tmp_path):
    """The checks above can fail: a synthetic package with an upward import (relative, inside a function), a
    circle through `from pkg import module`, a type-only import, a literal import_module and a long module."""
    root = _write(tmp_path / "llamaforge", {
        "__init__.py": "",
        "errors.py": "X = 1\n",
        "model/__init__.py": "",
        "model/llama.py": "def f():\n    from ..store import home\n    return home\n",
        "store/__init__.py": "from .names import parse\n",
        "store/names.py": "import llamaforge.store.blobs\nparse = 1\n",
        "store/blobs.py": "from llamaforge.store import names\n",
        "generate/__init__.py": "",
        "generate/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
                         "    from ..api import Model\n",
        "generate/b.py": "from . import a\nimport importlib\nimportlib.import_module('llamaforge.cli.x')\n",
        "api.py": "from .errors import X\n" + "\n" * 700,
        "cli/__init__.py": "",
        "cli/x.py": "",
        "odd.py": "",
    })
    mods, imports = collect_imports(root)
    assert set(mods) >= {"llamaforge", "llamaforge.store", "llamaforge.store.names", "llamaforge.odd"}
    up = upward_imports(imports)
    assert any("model/llama.py:2" in u and "imports llamaforge.store (floor 3)" in u for u in up), up
    assert any("generate/a.py:4" in u and "llamaforge.api (floor 4)" in u for u in up), up    # type-only counts
    assert any("generate/b.py:3" in u and "llamaforge.cli.x (floor 6)" in u for u in up), up
    assert len(up) == 3, up
    circles = import_circles(imports)
    # store/__init__ -> names -> blobs -> store/__init__ is a circle; generate a <-> b is not (a's side is
    # type-only).
    assert len(circles) == 1 and "llamaforge.store.blobs" in circles[0] and "store/names.py:1" in circles[0], circles
    assert [m for m in mods if floor_of(m) is None] == ["llamaforge.odd"]
    assert long_modules(mods) == ["llamaforge/api.py: 701 lines, more than 600"]
