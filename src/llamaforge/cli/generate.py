"""`llamaforge generate MODEL PROMPT`: raw completion (no chat template), streamed or as one JSON object."""
from __future__ import annotations

import argparse
import json
import sys

# SamplingParams field -> the flag a user typed, so errors name the flag.
FLAG_FOR_FIELD = {
    "max_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
    "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n",
    "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty", "seed": "--seed",
    "stop": "--stop",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaforge generate",
        description="Complete PROMPT with MODEL (no chat template). Prints the text as it is generated, "
                    "or with --json one object {text, token_ids, finish_reason, prompt_tokens, completion_tokens}.")
    p.add_argument("model", metavar="MODEL", help="store name (e.g. smollm2) or path to a GGUF file / model dir")
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue ('-' reads it from stdin)")
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_load_flags(p)
    return p


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """--dtype / --quant: how the weights are held in memory (default: the fast packed format for the file)."""
    p.add_argument("--dtype", metavar="DTYPE", help="float32, bfloat16 or float16 dense weights "
                                                   "(float32 gives reference-exact results)")
    p.add_argument("--quant", metavar="Q", help="in-memory weight format: auto (default), none, q4, int8, bf16")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags shared by `generate` (and usable by other commands). Defaults come from the model."""
    p.add_argument("--max-tokens", type=int, metavar="N", help="generate at most N tokens (default 256)")
    p.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling in (0, 1] (default 0.95)")
    p.add_argument("--min-p", type=float, metavar="P", help="drop tokens below P x the best one (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, metavar="R", help="penalise recent tokens, 1 = off (default)")
    p.add_argument("--repeat-last-n", type=int, metavar="N", help="tokens the penalties look back (default 64)")
    p.add_argument("--presence-penalty", type=float, metavar="X", help="OpenAI-style presence penalty")
    p.add_argument("--frequency-penalty", type=float, metavar="X", help="OpenAI-style frequency penalty")
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sampling = sampling_from_args(args)
    err = check_sampling(sampling)
    if err:
        print(err, file=sys.stderr)
        return 1
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    from .run import load_model
    lm = load_model(args.model, dtype=args.dtype, quant=args.quant)
    from ..generate.api import generate, stream
    if args.json:
        c = generate(lm, prompt, **sampling)
        print(json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                          "prompt_tokens": c.usage["prompt_tokens"],
                          "completion_tokens": c.usage["completion_tokens"]}, ensure_ascii=False))
        return 0
    s = stream(lm, prompt, **sampling)
    try:
        for ev in s:
            if ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    finally:
        s.close()
    sys.stdout.write("\n")
    return 0
