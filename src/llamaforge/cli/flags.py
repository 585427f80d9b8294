"""Flags shared by the commands that load a model and generate (run, generate, and the feature commands)."""
from __future__ import annotations

import argparse
import sys
from .._fs import loads_json

# SamplingParams field -> the flag a user typed, so errors name the flag.
FLAG_FOR_FIELD = {
    "max_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
    "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n",
    "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty", "seed": "--seed",
    "stop": "--stop",
}


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """--dtype / --quant: how the weights are held in memory (default: the fast packed format for the file);
    --threads."""
    p.add_argument("--dtype", metavar="DTYPE", help="float32, bfloat16 or float16 dense weights "
                                                   "(float32 gives reference-exact results)")
    p.add_argument("--quant", metavar="Q", help="in-memory weight format: auto (default), none, q4, int8, bf16")
    add_threads_flag(p)


THREADS_HELP = ("CPU threads (default: the model's num_thread parameter, else $LLAMAFORGE_NUM_THREADS or "
                "$OMP_NUM_THREADS, else one per core this process may use)")


def threads_value(text: str) -> int:
    """argparse type for --threads: a whole number in 1..1024, else a usage error naming the flag."""
    from ..errors import InvalidRequestError
    from ..threads import parse_threads
    try:
        return parse_threads(text, "--threads")
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--threads ", "", 1)) from None


def add_threads_flag(p: argparse.ArgumentParser, help_text: str = THREADS_HELP) -> None:
    """--threads N (llama.cpp's -t, Ollama's num_thread)."""
    p.add_argument("--threads", "-t", type=threads_value, metavar="N", help=help_text)


def apply_threads_flag(args: argparse.Namespace) -> int:
    """Set this process's thread count from --threads (or the default) before anything heavy runs."""
    from ..threads import apply_threads
    return apply_threads(getattr(args, "threads", None))


def add_sampling_flags(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The sampling flags. `defaults`: the command's own defaults where they differ from SamplingParams' (the
    help text states the value really used); a model's stored options override both."""
    from ..generate.sampling import SamplingParams
    d = {f: getattr(SamplingParams, f) for f in FLAG_FOR_FIELD if f != "stop"}
    d.update(defaults or {})
    p.add_argument("--max-tokens", type=int, metavar="N", help=f"generate at most N tokens (default {d['max_tokens']})")
    p.add_argument("--temperature", type=float, metavar="T", help=f"0 = greedy (default {d['temperature']})")
    p.add_argument("--top-k", type=int, metavar="K", help=f"keep the K most likely tokens, 0 = off (default {d['top_k']})")
    p.add_argument("--top-p", type=float, metavar="P", help=f"nucleus sampling in (0, 1] (default {d['top_p']})")
    p.add_argument("--min-p", type=float, metavar="P", help=f"drop tokens below P x the best one (default {d['min_p']})")
    p.add_argument("--repeat-penalty", type=float, metavar="R",
                   help=f"penalise recent tokens, 1 = off (default {d['repeat_penalty']})")
    p.add_argument("--repeat-last-n", type=int, metavar="N",
                   help=f"tokens the penalties look back (default {d['repeat_last_n']})")
    p.add_argument("--presence-penalty", type=float, metavar="X", help="OpenAI-style presence penalty (default 0)")
    p.add_argument("--frequency-penalty", type=float, metavar="X", help="OpenAI-style frequency penalty (default 0)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed: the same seed gives the same output")
    p.add_argument("--stop", action="append", metavar="STR", default=None,
                   help="stop at this string (repeatable); the string itself is not printed")


def sampling_from_args(args: argparse.Namespace) -> dict:
    """Keyword arguments for SamplingParams from the flags the user actually gave."""
    out = {}
    for field in FLAG_FOR_FIELD:
        v = getattr(args, field, None)
        if v is not None:
            out[field] = tuple(v) if field == "stop" else v
    return out


def check_sampling(sampling: dict) -> str | None:
    """Validate the flags before loading the model; return an error line naming the flag, or None."""
    from ..errors import InvalidRequestError
    from ..generate.sampling import SamplingParams
    try:
        SamplingParams.from_kwargs(**sampling)
    except InvalidRequestError as e:
        flag = FLAG_FOR_FIELD.get(e.field or "", e.field)
        msg = str(e)
        if e.field and msg.startswith(e.field):
            msg = msg[len(e.field):].lstrip()
        return f"Error: {flag}: {msg}"
    return None


MAX_CONSTRAINT_FILE = 1 << 20  # a JSON Schema or grammar file (the engine's own limit on grammar text)


def add_constraint_flags(p: argparse.ArgumentParser) -> None:
    """--json-schema FILE / --grammar FILE / --regex RE: the output must match (constrained decoding)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid under the JSON Schema in FILE")
    g.add_argument("--grammar", metavar="FILE", help="answer in the Lark (or GBNF: *.gbnf) grammar in FILE")
    g.add_argument("--regex", metavar="RE", help="the answer must match the regular expression RE")
    p.add_argument("--grammar-syntax", choices=("lark", "gbnf"), help="the syntax of --grammar (default: from "
                                                                     "the file name, .gbnf = GBNF, else Lark)")


def constraint_from_args(args: argparse.Namespace) -> tuple[dict, str | None]:
    """(keyword arguments for the seam, or an error line naming the flag). Files are read with a size bound."""
    from .._fs import read_text_bounded
    from ..errors import LlamaforgeError
    if getattr(args, "regex", None) is not None:
        return {"regex": args.regex}, None
    for flag, name in (("--json-schema", "json_schema"), ("--grammar", "grammar")):
        path = getattr(args, name, None)
        if path is None:
            continue
        try:
            text = read_text_bounded(path, MAX_CONSTRAINT_FILE, f"{flag} file")
        except LlamaforgeError as e:
            return {}, f"Error: {flag}: {e}"
        if name == "grammar":
            syntax = args.grammar_syntax or ("gbnf" if str(path).lower().endswith(".gbnf") else "lark")
            return {"grammar": text, "grammar_syntax": syntax}, None
        try:
            return {"json_schema": loads_json(text)}, None
        except (ValueError, RecursionError) as e:
            return {}, f"Error: {flag}: {path} is not JSON ({e})"
    if getattr(args, "grammar_syntax", None) is not None:
        return {}, "Error: --grammar-syntax: needs --grammar"
    return {}, None


def load_model(name: str, *, dtype: str | None = None, quant: str | None = None, threads: int | None = None):
    """Load by store name or path, with a status line on stderr only when stderr is a terminal. Threads: --threads,
    else the model's num_thread parameter, else the default (`llamaforge.threads.default_threads`)."""
    import llamaforge
    from ..threads import apply_threads
    apply_threads(threads)
    tty = sys.stderr.isatty()
    if tty:
        sys.stderr.write(f"loading {name} ...")
        sys.stderr.flush()
    try:
        return llamaforge.load(name, dtype=dtype, quant=quant, threads=threads)
    finally:
        if tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def add_speculation_flags(p: argparse.ArgumentParser) -> None:
    """--speculate / --draft / --draft-tokens (speculative decoding; the output stays the same token for token)."""
    p.add_argument("--speculate", choices=("off", "ngram", "draft"), default=None,
                   help="speculative decoding: ngram = draft from earlier text (prompt lookup: fast on edits, "
                        "quotes, summaries), draft = from --draft's model; output unchanged (default off)")
    p.add_argument("--draft", metavar="MODEL", default=None,
                   help="a smaller model with the same tokenizer that drafts tokens for the main one")
    p.add_argument("--draft-tokens", type=int, metavar="K", default=None,
                   help="tokens drafted per step (1-16, default 4)")


def apply_speculation_flags(lm, args: argparse.Namespace, *, draft_lm=None):
    """Turn on the speculation --speculate/--draft ask for on `lm` (loading the draft model unless given);
    returns the draft model or None. Bad values raise InvalidRequestError (a clear "Error: ..." line)."""
    mode, draft, k = getattr(args, "speculate", None), getattr(args, "draft", None), getattr(args, "draft_tokens", None)
    if mode is None and draft is None and k is None:
        return None
    from ..generate.speculative import check_options, configure
    check_options(mode, k, has_draft=draft is not None or draft_lm is not None)
    if draft is not None and draft_lm is None and mode in (None, "draft"):
        import llamaforge
        draft_lm = llamaforge.load(draft, dtype=getattr(args, "dtype", None), quant=getattr(args, "quant", None),
                                   compile=False)
    configure(lm, mode or ("draft" if draft_lm is not None else "off"), k, draft_lm)
    return draft_lm
