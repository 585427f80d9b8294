"""`llamaforge serve [MODEL]...`: the OpenAI + Ollama compatible HTTP server."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import LlamaforgeError
from .flags import add_speculation_flags, add_threads_flag, apply_threads_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaforge serve",
        description="Serve models over HTTP with the OpenAI (/v1/...) and Ollama (/api/...) APIs. "
                    "Models named here load at start (/health answers 503 until they are in); other store "
                    "models load on first request.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="store names or model paths (default: smollm2)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; anything else exposes the server to the network)")
    p.add_argument("--port", type=int, default=11435, help="port (default 11435)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health; repeat for several users, "
                        "each with its own web UI conversations (visible in `ps`: prefer --api-key-file or the "
                        "environment variable LLAMAFORGE_API_KEY)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="read the API key from the first line of FILE")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections at once (default: from the file-descriptor limit, at most 1024)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot before answering 503 (default 64)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context window per request in tokens (default: the model's, at most 4096)")
    p.add_argument("--max-body", type=int, default=8 * 1024 * 1024, help="request body limit in bytes (413)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser Origin allowed to call the API (repeatable); loopback origins always are")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="an extra Host name accepted on a loopback bind (repeatable)")
    p.add_argument("--allow-pull-from", action="append", default=[], metavar="DIR",
                   help="a directory whose model files /api/pull may add to the store (repeatable); without it "
                        "pulls over HTTP take only Hugging Face repo ids and models already in the store")
    p.add_argument("--no-load-on-demand", action="store_true",
                   help="serve only the models named here (404 for others)")
    p.add_argument("--max-loaded", type=int, default=2, help="models kept in memory at once (default 2)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default float32)")
    p.add_argument("--quant", default=None,
                   help="in-memory weight format (default: the fast packed format for the file; 'none' keeps "
                        "dense weights, whose batched results match single-request results exactly)")
    add_threads_flag(p, "CPU threads for every model (default: a model's num_thread parameter, else "
                        "$LLAMAFORGE_NUM_THREADS or $OMP_NUM_THREADS, else one per core this process may use)")
    add_speculation_flags(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    # Safety shields for every request (issue 15); a request's own `guards` field overrides them.
    p.add_argument("--guard-input", action="store_true", help="classify each prompt first; unsafe ones are "
                   "refused (finish_reason content_filter) and the model does not run")
    p.add_argument("--guard-output", action="store_true", help="check answers while they stream (held back in "
                   "windows); an unsafe answer ends with finish_reason content_filter")
    p.add_argument("--code-shield", action="store_true", help="scan code blocks in answers: insecure ones are "
                   "withheld (or annotated for warnings)")
    p.add_argument("--guard-model", metavar="M", default=None, help="a Llama Guard 3/4 model for the guards "
                   "(default: llamaforge's built-in guard)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-loaded", args.max_loaded, 1), ("--max-body", args.max_body, 1024)):
        if value < low:
            print(f"llamaforge serve: {flag} must be at least {low}", file=sys.stderr)
            return 2
    if args.ctx is not None and args.ctx < 2:
        print("llamaforge serve: --ctx must be at least 2", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print("llamaforge serve: --port must be between 1 and 65535", file=sys.stderr)
        return 2
    if args.quant is not None:
        from ..model.quant import resolve_quant
        resolve_quant(args.quant, args.dtype)  # InvalidRequestError -> "Error: unknown quant ..."
    if args.speculate is not None or args.draft is not None or args.draft_tokens is not None:
        from ..generate.speculative import check_options
        check_options(args.speculate, args.draft_tokens, has_draft=args.draft is not None)  # fail before loading
    models = args.models or ["smollm2"]
    # Fail fast on a name that does not exist; the weights themselves load in the background.
    from ..store import resolve
    for m in models:
        resolve(m)  # ModelNotFoundError -> "Error: ..." via cli.main

    from ..server.app import ServerConfig, create_app, make_server
    from ..server.security import is_loopback_host
    api_key = _api_key(args)
    if args.max_connections is not None and args.max_connections < 1:
        print("llamaforge serve: --max-connections must be at least 1", file=sys.stderr)
        return 2
    for d in args.allow_pull_from:
        if not os.path.isdir(os.path.expanduser(d)):
            print(f"llamaforge serve: --allow-pull-from {d}: not a directory", file=sys.stderr)
            return 2
    allow_pull = [os.path.abspath(os.path.expanduser(d)) for d in args.allow_pull_from]
    config = ServerConfig(models=models, host=args.host, port=args.port, api_key=api_key,
                          max_batch=args.max_batch, max_queue=args.max_queue, ctx=args.ctx, max_body=args.max_body,
                          allowed_origins=args.allow_origin, allowed_hosts=args.allow_host,
                          load_on_demand=not args.no_load_on_demand, max_loaded=args.max_loaded, dtype=args.dtype,
                          quant=args.quant, threads=args.threads, max_connections=args.max_connections,
                          exit_on_load_failure=True, guards=_guards(args), allow_pull_from=allow_pull,
                          speculate=args.speculate, draft=args.draft, draft_tokens=args.draft_tokens)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("llamaforge.server")
    if not is_loopback_host(args.host):
        log.warning("binding %s exposes the server beyond this machine%s", args.host,
                    "" if api_key else "; set --api-key (or LLAMAFORGE_API_KEY) to require a key")
    log.info("CPU threads: %d", apply_threads_flag(args))
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    log.info("web chat page: http://%s:%d/ui", f"[{shown}]" if ":" in shown else shown, args.port)
    try:
        server = make_server(create_app(config), args.host, args.port, log_level=args.log_level)
        server.run()
    except OSError as e:  # port in use, permission denied
        raise LlamaforgeError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    if server.fatal_error:
        raise LlamaforgeError(server.fatal_error)
    return 0 if getattr(server, "started", True) else 1


def _api_key(args) -> str | list[str] | None:
    """--api-key (repeatable: several keys, several web UI users), else the first line of --api-key-file, else
    LLAMAFORGE_API_KEY (None: no key). One key comes back as a string, several as a list."""
    if args.api_key and args.api_key_file:
        raise LlamaforgeError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        from .._fs import read_text_bounded
        lines = read_text_bounded(args.api_key_file, 4096, "the API key file").splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise LlamaforgeError(f"the API key file {args.api_key_file} is empty")
        return key
    keys = [k for k in (args.api_key or []) if k]
    if len(keys) > 1:
        return keys
    return (keys[0] if keys else None) or os.environ.get("LLAMAFORGE_API_KEY") or None
def _guards(args):
    """The default Guards of every request from --guard-input / --guard-output / --code-shield / --guard-model
    (None when no shield is on); the guard model loads (and is validated) now, not on the first request."""
    if not (args.guard_input or args.guard_output or args.code_shield):
        if args.guard_model:
            raise LlamaforgeError("--guard-model needs --guard-input or --guard-output")
        return None
    from ..generate.request import Guards
    if args.guard_input or args.guard_output:
        from ..safety import load_guard
        load_guard(args.guard_model)  # GuardError ("not in Llama Guard format", ...) -> "Error: ..." exit 1
    return Guards(input=args.guard_input, output=args.guard_output, code=args.code_shield, model=args.guard_model)


