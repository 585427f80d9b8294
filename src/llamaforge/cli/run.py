"""`llamaforge run [MODEL] [PROMPT]`: chat with a model, like `ollama run`.

On a terminal: a streaming multi-turn chat. Commands: /bye, /clear, /set system TEXT, /set parameter NAME
VALUE, /set verbose|quiet, /show info|system|parameters|template|license, /? (help). Text between lines
starting and ending with triple quotes is one multi-line message. Ctrl-C stops the current answer; Ctrl-C or
Ctrl-D at the prompt exits. With PROMPT, or when stdin is not a terminal, answer once and exit (the prompt comes
from stdin when PROMPT is absent; an empty stdin gets a built-in demo prompt).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from .._fs import read_stdin
from .flags import (add_constraint_flags, add_load_flags, add_sampling_flags, add_speculation_flags,
                    apply_speculation_flags, check_sampling, constraint_from_args, load_model, sampling_from_args)

DEFAULT_MODEL = "smollm2"
DEMO_PROMPT = "In two or three sentences, why is the sky blue?"
# Chat answers may run longer than a raw completion's default; the context window still bounds them.
# Interactive chat defaults, as `ollama run` has them: a mild repeat penalty keeps small models out of loops.
RUN_DEFAULTS = {"max_tokens": 1024, "repeat_penalty": 1.1}

HELP = """Available commands:
  /set system TEXT         set the system message (clears nothing else)
  /set parameter NAME VAL  set a sampling parameter (temperature, top_k, top_p, min_p, num_predict, seed,
                           repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, stop)
  /set verbose | quiet     show / hide token counts and speed after each answer
  /show info|system|parameters|template|license
  /clear                   forget the conversation
  /bye                     exit
  /?, /help                this help
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer; Ctrl-D exits."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge run", description=__doc__.split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"store name or path (default: {DEFAULT_MODEL})")
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="answer this once and exit")
    p.add_argument("--verbose", action="store_true", help="show token counts and speed after each answer")
    p.add_argument("--system", metavar="TEXT", help="system message (overrides the model's)")
    add_sampling_flags(p, defaults=RUN_DEFAULTS)
    add_constraint_flags(p)
    add_load_flags(p)
    add_speculation_flags(p)
    return p


class Repl:
    """The terminal side of a chat: streams answers, prints statistics, handles /commands. The conversation
    itself is a `generate.session.ChatSession`."""

    def __init__(self, lm, *, system: str | None, options: dict, verbose: bool = False, out=None):
        from ..generate.session import ChatSession
        self.session = ChatSession(lm, system=system, options=options, defaults=RUN_DEFAULTS)
        self.lm = lm
        self.verbose = verbose
        self.out = out or sys.stdout

    def answer(self, text: str, *, interruptible: bool) -> bool:
        """Stream an answer to `text`. Returns False when interrupted with Ctrl-C (the turn is forgotten)."""
        t0 = time.perf_counter()
        s = self.session.stream(text)
        interrupted = {"flag": False}
        old = None
        if interruptible:
            # A flag checked between tokens, rather than an exception inside a tensor op.
            def on_sigint(signum, frame):
                interrupted["flag"] = True
                s.stop_requested = True  # also ends a long prefill at the next chunk
            old = signal.signal(signal.SIGINT, on_sigint)
        try:
            for ev in s:
                if interrupted["flag"]:
                    break
                if ev.text:
                    self.out.write(ev.text)
                    self.out.flush()
        finally:
            s.close()
            if old is not None:
                signal.signal(signal.SIGINT, old)
        if interrupted["flag"] or s.completion is None:
            self.out.write("\n\n")
            self.out.flush()
            return False
        c = s.completion
        self.session.commit(text, c)
        self.out.write("\n\n" if interruptible else "\n")
        self.out.flush()
        if self.verbose:
            self._print_stats(c, time.perf_counter() - t0)
        return True

    def _print_stats(self, c, total: float) -> None:
        pt, ct = c.usage["prompt_tokens"], c.usage["completion_tokens"]
        ps, ds = c.timings.get("prompt_seconds", 0.0), c.timings.get("decode_seconds", 0.0)
        rate = (lambda n, s: f"{n / s:.2f} tokens/s" if s > 0 else "n/a")
        print(f"total duration:       {total:.3f}s\n"
              f"prompt eval count:    {pt} token(s), {c.cached_tokens} reused from the cache\n"
              f"prompt eval duration: {ps:.3f}s\n"
              f"prompt eval rate:     {rate(pt - c.cached_tokens, ps)}\n"
              f"eval count:           {ct} token(s)\n"
              f"eval duration:        {ds:.3f}s\n"
              f"eval rate:            {rate(max(ct - 1, 0), ds)}\n", file=sys.stderr, flush=True)

    # -- slash commands ---------------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Handle a /command; return False to exit."""
        from ..errors import InvalidRequestError
        from ..generate.sampling import params_from_options
        parts = line.strip().split(None, 2)
        cmd = parts[0].lower()
        if cmd in ("/bye", "/exit", "/quit"):
            return False
        if cmd in ("/?", "/help"):
            print(HELP)
        elif cmd == "/clear":
            self.session.clear()
            print("Cleared session context")
        elif cmd == "/set" and len(parts) >= 2:
            what = parts[1].lower()
            if what == "system":
                self.session.system = parts[2] if len(parts) > 2 else None
                print("Set system message." if self.session.system else "Cleared system message.")
            elif what == "parameter":
                name, _, value = (parts[2] if len(parts) > 2 else "").partition(" ")
                if not name or not value.strip():
                    print("Usage: /set parameter NAME VALUE")
                    return True
                try:
                    new = params_from_options({name: value.strip()})
                except InvalidRequestError as e:
                    print(f"Error: {e}")
                    return True
                options = self.session.options
                if "stop" in new:
                    new["stop"] = tuple(options.get("stop", ())) + new["stop"]
                options.update(new)
                print(f"Set parameter '{name}' to '{value.strip()}'")
            elif what in ("verbose", "quiet"):
                self.verbose = what == "verbose"
                print("Set 'verbose' mode." if self.verbose else "Set 'quiet' mode.")
            else:
                print(f"Unknown /set option {what!r}. Type /? for help")
        elif cmd == "/show":
            self._show(parts[1].lower() if len(parts) > 1 else "info")
        else:
            print(f"Unknown command {parts[0]!r}. Type /? for help")
        return True

    def _show(self, what: str) -> None:
        lm, md, session = self.lm, self.lm.metadata or {}, self.session
        if what == "info":
            n_params = parameter_count(lm.config)
            print(f"  model         {lm.name or lm.path}\n  architecture  {md.get('architecture', 'llama')}\n"
                  f"  parameters    {n_params / 1e6:.1f}M\n  quantization  {md.get('file_type', '?')}\n"
                  f"  context       {session.context}\n  path          {lm.path}")
        elif what == "system":
            print(session.system or "No system message was specified for this model.")
        elif what == "parameters":
            # The settings the next answer really uses: run's defaults, the model's stored ones, those set here.
            eff = session.effective_options()
            print("\n".join(f"{k:<20} {'none' if v is None else list(v) if isinstance(v, tuple) else v}"
                            for k, v in eff.items()))
        elif what == "template":
            print((lm.defaults or {}).get("template") or md.get("chat_template") or "No template.")
        elif what == "license":
            print(md.get("license") or "No license was specified for this model.")
        else:
            print("Usage: /show info|system|parameters|template|license")


def parameter_count(cfg) -> int:
    """Parameters of the architecture (the in-memory format may pack them, so count from the config)."""
    C, D, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    attn = C * cfg.num_attention_heads * D * 2 + C * cfg.num_key_value_heads * D * 2
    mlp = 3 * C * cfg.intermediate_size
    emb = cfg.vocab_size * C * (1 if cfg.tie_word_embeddings else 2)
    return emb + L * (attn + mlp + 2 * C) + C


def read_message(prompt: str = ">>> ") -> str:
    """One user message; lines between triple quotes form one multi-line message."""
    line = input(prompt)
    if not line.lstrip().startswith('"""'):
        return line
    rest = line.lstrip()[3:]
    if rest.endswith('"""') and rest.strip() != "":
        return rest[:-3]
    lines = [rest] if rest else []
    while True:
        more = input("... ")
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(lines)
        lines.append(more)


def _history_path():
    try:
        from ..store import home
        return home() / "history"
    except Exception:
        return None


def _setup_readline():
    try:
        import readline
    except ImportError:
        return None
    path = _history_path()
    readline.set_history_length(1000)
    if path is not None and path.is_file():
        try:
            readline.read_history_file(str(path))
        except OSError:
            pass
    return readline


def _save_readline(readline) -> None:
    path = _history_path()
    if readline is None or path is None:
        return
    from .._fs import atomic_file
    try:
        with atomic_file(path) as tmp:
            readline.write_history_file(str(tmp))
    except OSError:
        pass


def repl(session: Repl) -> int:
    readline = _setup_readline()
    print("Type /? for help, /bye to exit.", file=sys.stderr)
    try:
        while True:
            # Ctrl-C at the prompt must raise KeyboardInterrupt, whatever this process inherited (a parent that
            # ignores SIGINT passes SIG_IGN on, and Python then installs no handler) or an answer left behind.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                text = read_message()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                if not (readline is not None and readline.get_line_buffer()):
                    print("Use Ctrl + d or /bye to exit.")  # as ollama run: Ctrl-C never ends the chat by surprise
                continue  # Ctrl-C over half-typed text discards it, like a shell
            if not text.strip():
                continue
            if text.lstrip().startswith("/") and not text.lstrip().startswith("//"):
                if not session.command(text):
                    return 0
                continue
            try:
                session.answer(text, interruptible=True)
            except KeyboardInterrupt:
                # Ctrl-C before the answer started streaming (while preparing the prompt): back to the prompt.
                print("\n")
            except Exception as e:
                from ..errors import LlamaforgeError
                if not isinstance(e, LlamaforgeError):
                    raise
                print(f"Error: {e}")
    finally:
        _save_readline(readline)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sampling = sampling_from_args(args)
    constraint, err = constraint_from_args(args)
    err = err or check_sampling(sampling)
    if err:
        print(err, file=sys.stderr)
        return 1
    sampling.update(constraint)  # every answer of the session follows it
    interactive = args.prompt is None and sys.stdin.isatty()
    text = args.prompt
    demo = False
    if not interactive and text is None:
        text = read_stdin().strip()
        demo = not text
        text = text or DEMO_PROMPT
    lm = load_model(args.model, dtype=args.dtype, quant=args.quant, threads=args.threads)
    apply_speculation_flags(lm, args)
    if demo and "temperature" not in sampling and "temperature" not in ((lm.defaults or {}).get("options") or {}):
        sampling["temperature"] = 0.0  # the demo answer is reproducible
    system = args.system if args.system is not None else (lm.defaults or {}).get("system")
    session = Repl(lm, system=system, options=sampling, verbose=args.verbose)
    if interactive:
        return repl(session)
    session.answer(text, interruptible=False)
    return 0
