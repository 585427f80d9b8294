"""Model-management commands: `list`, `show`, `rm`, `pull`, `create`, `cp` (one module, see cli/main.py).

Errors are raised as `llamaforge.errors` exceptions; `cli/main.py` prints them as one `Error: ...` line, exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import StoreError
from ..store.inspect import inspect_model


# ------------------------------------------------------------------------------------------------------ formatting
def human_size(n: int) -> str:
    """Decimal units, as `ollama list` prints them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_age(t: float, now: float | None = None) -> str:
    d = max(0.0, (now or time.time()) - t)
    for unit, s in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                    ("hour", 3600), ("minute", 60)):
        if d >= s:
            k = int(d // s)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("    ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ------------------------------------------------------------------------------------------------------ commands
def cmd_list(args, store) -> int:
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    now = time.time()
    for e in store.list():
        rows.append([e.name, e.id, human_size(e.size), "built in" if e.builtin else human_age(e.modified, now)])
    print(_table(rows))
    return 0


def cmd_show(args, store) -> int:
    ref = store.resolve(args.model)
    info = inspect_model(ref.path)
    d = ref.defaults or {}
    out = {"name": ref.name, "path": str(ref.path), **info,
           "system": d.get("system"), "options": d.get("options") or {}, "adapter": d.get("adapter"),
           "messages": d.get("messages") or []}
    if d.get("template"):
        out["template"] = d["template"]   # the manifest's template replaces the model's own
    if d.get("license"):
        out["license"] = d["license"]     # and so does its license
    if args.modelfile:
        from ..store.modelfile import render_modelfile
        print(render_modelfile(ref.name or str(ref.path), d), end="")
        return 0
    if ref.manifest is not None:
        from ..store import manifest_id
        out["id"] = manifest_id(ref.manifest)
        out["source"] = ref.manifest.get("source")
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    if args.template or args.system or args.license:
        key = "template" if args.template else "system" if args.system else "license"
        print(out.get(key) or "")
        return 0
    if args.parameters:
        for k, v in out["options"].items():
            for item in (v if isinstance(v, list) else [v]):
                print(f"{k:<20}{json.dumps(item) if isinstance(item, str) else item}")
        return 0
    lines = ["  Model"]
    fields = [("name", out["name"]), ("architecture", out["architecture"]),
              ("parameters", human_count(out["parameters"]) if out.get("parameters") else None),
              ("quantization", out["quantization"]), ("context length", out["context_length"]),
              ("embedding length", out["embedding_length"]), ("layers", out.get("layers")),
              ("format", out["format"]), ("path", out["path"])]
    lines += [f"    {k:<20}{v}" for k, v in fields if v is not None]
    if out.get("options"):
        lines += ["", "  Parameters"]
        for k, v in out["options"].items():
            for item in (v if isinstance(v, list) else [v]):
                lines.append(f"    {k:<20}{json.dumps(item) if isinstance(item, str) else item}")
    if out.get("system"):
        lines += ["", "  System", *("    " + s for s in out["system"].splitlines())]
    if out.get("adapter"):
        lines += ["", "  Adapter", f"    {out['adapter']}"]
    tmpl = out.get("template")
    lines += ["", "  Template", f"    {_first_lines(tmpl, 3) if tmpl else '(none)'}"]
    lines += ["", "  License", f"    {_first_lines(out['license'], 2) if out.get('license') else '(unknown)'}"]
    print("\n".join(lines))
    return 0


def _first_lines(text: str, n: int) -> str:
    ls = str(text).splitlines() or [""]
    more = " ..." if len(ls) > n else ""
    return "\n    ".join(ls[:n]) + more


def cmd_rm(args, store) -> int:
    for m in args.models:
        name = store.remove(m)
        print(f"deleted '{name}'")
    return 0


def cmd_pull(args, store) -> int:
    name = store.pull(args.source, args.name, digest=args.digest, revision=args.revision)
    print(f"pulled '{name}'")
    return 0


def cmd_create(args, store) -> int:
    from ..store import params_to_options
    from ..store.modelfile import Modelfile, create_from_modelfile, read_modelfile
    template = None
    if args.template:
        p = Path(args.template).expanduser()
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise StoreError(f"cannot read template {p}: {e.strerror or e}") from None
        try:
            template = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"template {p} is not UTF-8 text") from None
    modelfile = args.file
    if modelfile is None and args.from_model is None:
        if not Path("Modelfile").is_file():
            raise StoreError("give the base model with --from MODEL, or a Modelfile with -f FILE "
                             "(default: ./Modelfile, which does not exist here)")
        modelfile = "Modelfile"
    if modelfile is not None:
        mf = read_modelfile(modelfile)
        base_dir = Path(modelfile).expanduser().resolve().parent
    else:
        mf, base_dir = Modelfile(from_=args.from_model), Path.cwd()
    # Flags given beside a Modelfile override what it says.
    if args.from_model is not None:
        mf.from_ = args.from_model
    if args.system is not None:
        mf.system = args.system
    if template is not None:
        mf.template = template
    if args.adapter is not None:
        mf.adapter = str(Path(args.adapter).expanduser().resolve())
    mf.parameters = {**mf.parameters, **params_to_options(args.param)}
    name = create_from_modelfile(store, args.name, mf, base_dir)
    print(f"created '{name}'")
    return 0


def cmd_cp(args, store) -> int:
    dst = store.copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{dst}'")
    return 0


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"llamaforge {command}")
    if command == "list":
        p.description = "List models in the local store (and the built-in ones)."
    elif command == "show":
        p.description = "Show a model's architecture, parameter count, quantization, context, template, license."
        p.add_argument("model", help="store name or path")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--json", action="store_true", help="print one JSON object")
        g.add_argument("--template", action="store_true", help="print only the chat template")
        g.add_argument("--system", action="store_true", help="print only the system prompt")
        g.add_argument("--license", action="store_true", help="print only the license")
        g.add_argument("--parameters", action="store_true", help="print only the generation defaults")
        g.add_argument("--modelfile", action="store_true", help="print a Modelfile that recreates the model")
    elif command == "rm":
        p.description = "Remove models from the store (blobs no other model uses are deleted)."
        p.add_argument("models", nargs="+", metavar="MODEL")
    elif command == "pull":
        p.description = ("Add a model: a local GGUF file, a Hugging Face / Meta directory, or a Hugging Face repo "
                         "id (owner/name).")
        p.add_argument("source")
        p.add_argument("--name", help="store name (default: from the file or repo name)")
        p.add_argument("--digest", help="expected sha256 of a single file (sha256:<hex>); checked after copying")
        p.add_argument("--revision", help="Hugging Face branch, tag or commit")
    elif command == "create":
        p.description = ("Create a model from another with its own system prompt, parameters, template, adapter, "
                         "few-shot messages and license: from an Ollama Modelfile (-f; FROM, PARAMETER, TEMPLATE "
                         "(Jinja), SYSTEM, ADAPTER, MESSAGE, LICENSE) and/or the options below, which override it.")
        p.add_argument("name")
        p.add_argument("-f", "--file", metavar="MODELFILE",
                       help="Modelfile to read (default: ./Modelfile when --from is not given)")
        p.add_argument("--from", dest="from_model", metavar="MODEL", help="store name or model path to build on")
        p.add_argument("--system", help="system prompt")
        p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="generation default, e.g. temperature=0.2 (repeat for several; stop may repeat)")
        p.add_argument("--template", metavar="FILE", help="Jinja chat template file")
        p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter directory")
    elif command == "cp":
        p.description = "Copy a model under a new name (no bytes copied)."
        p.add_argument("source")
        p.add_argument("destination")
    return p


_COMMANDS = {"list": cmd_list, "show": cmd_show, "rm": cmd_rm, "pull": cmd_pull, "create": cmd_create,
             "cp": cmd_cp}


def main(argv: list[str] | None = None, command: str = "list") -> int:
    """Run one store command; `command` is one of list, show, rm, pull, create, cp."""
    if command not in _COMMANDS:
        print(f"llamaforge: unknown store command {command!r}", file=sys.stderr)
        return 2
    args = _parser(command).parse_args(list(sys.argv[1:] if argv is None else argv))
    from ..store import Store
    return int(_COMMANDS[command](args, Store()) or 0)


main.multi_command = True
