"""`llamaforge ps` and `llamaforge stop`, as `ollama ps` / `ollama stop`: talk to a running local server.

`ps` lists the models a server has loaded (its /api/ps) and the background builds of compiled decode steps on
this machine (`generate.compiled.builds`), so a slow first run has a visible cause. `stop MODEL` unloads a model
(an empty /api/generate with keep_alive 0, exactly what `ollama stop` sends).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import LlamaforgeError

DEFAULT_HOST = "http://127.0.0.1:11435"


def _host(value: str | None) -> str:
    host = (value or os.environ.get("LLAMAFORGE_HOST") or DEFAULT_HOST).strip().rstrip("/")
    return host if "://" in host else f"http://{host}"


def _client(args):
    import httpx
    key = args.api_key or os.environ.get("LLAMAFORGE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=_host(args.host), headers=headers, timeout=args.timeout)


def _error_text(resp) -> str:
    try:
        err = resp.json().get("error")
        return err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return resp.text[:200] or f"HTTP {resp.status_code}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("    ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _until(expires_at: str) -> str:
    from datetime import datetime, timezone
    try:
        t = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return "?"
    left = (t - datetime.now(timezone.utc)).total_seconds()
    if left > 100 * 365 * 86400:
        return "Forever"
    if left <= 0:
        return "Stopping..."
    mins, secs = divmod(int(left), 60)
    return f"{mins} minutes from now" if mins >= 2 else f"{mins * 60 + secs} seconds from now"


def _age(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def cmd_ps(args) -> int:
    from .store_cmds import human_size
    import httpx
    models, reach_error = None, None
    try:
        with _client(args) as c:
            resp = c.get("/api/ps")
        if resp.status_code != 200:
            reach_error = f"the server at {_host(args.host)} answered {resp.status_code}: {_error_text(resp)}"
        else:
            models = resp.json().get("models") or []
    except httpx.HTTPError as e:
        reach_error = f"no llamaforge server at {_host(args.host)} ({type(e).__name__}); start one with " \
                      "`llamaforge serve`"
    from ..generate.compiled import builds
    found = builds()
    if args.json:
        import json
        print(json.dumps({"models": models, "builds": found, "error": reach_error}, indent=2))
        return 0 if reach_error is None else 1
    if models is not None:
        rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
        for m in models:
            rows.append([m.get("name") or m.get("model") or "?", (m.get("digest") or "")[:12],
                         human_size(int(m.get("size") or 0)), "100% CPU", str(m.get("context_length") or ""),
                         _until(m.get("expires_at"))])
        print(_table(rows))
    else:
        print(reach_error, file=sys.stderr)
    if found:
        print("\nCOMPILED-STEP BUILDS (background, low priority)")
        rows = [["STATE", "PID", "MODEL", "THREADS", "TIME", "NOTE"]]
        for b in found:
            rows.append([b["state"], str(b["pid"] or ""), os.path.basename(b["model"] or "") or "?",
                         str(b["threads"] or ""), _age(b["started"]),
                         b.get("reason") or ("decoding runs uncompiled until it lands" if b["state"] == "building"
                                             else "")])
        print(_table(rows))
    return 0 if models is not None else 1


def cmd_stop(args) -> int:
    import httpx
    failed = 0
    try:
        with _client(args) as c:
            for name in args.models:
                resp = c.post("/api/generate", json={"model": name, "keep_alive": 0})
                if resp.status_code == 200:
                    print(f"stopped '{name}'")
                else:
                    print(f"Error: {name}: {_error_text(resp)}", file=sys.stderr)
                    failed += 1
    except httpx.HTTPError as e:
        raise LlamaforgeError(f"no llamaforge server at {_host(args.host)} ({type(e).__name__}); nothing "
                              "to stop") from None
    return 1 if failed else 0


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"llamaforge {command}")
    if command == "ps":
        p.description = ("List the models a running server has loaded (as `ollama ps`) and background builds of "
                         "compiled decode steps on this machine.")
        p.add_argument("--json", action="store_true", help="print one JSON object {models, builds, error}")
    else:
        p.description = "Unload models from a running server (as `ollama stop`)."
        p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--host", default=None,
                   help=f"server URL (default: $LLAMAFORGE_HOST or {DEFAULT_HOST})")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $LLAMAFORGE_API_KEY)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    return p


def main(argv: list[str] | None = None, command: str = "ps") -> int:
    """Run `ps` or `stop`."""
    if command not in ("ps", "stop"):
        print(f"llamaforge: unknown command {command!r}", file=sys.stderr)
        return 2
    args = _parser(command).parse_args(list(sys.argv[1:] if argv is None else argv))
    return cmd_ps(args) if command == "ps" else cmd_stop(args)


main.multi_command = True
