"""`llamaforge generate MODEL PROMPT`: raw completion (no chat template), streamed or as one JSON object."""
from __future__ import annotations

import argparse
import json
import sys

from .._fs import read_stdin
from .flags import (add_constraint_flags, add_load_flags, add_sampling_flags, add_speculation_flags,
                    apply_speculation_flags, check_sampling, constraint_from_args, load_model, sampling_from_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaforge generate",
        description="Complete PROMPT with MODEL (no chat template). Prints the text as it is generated, "
                    "or with --json one object {text, token_ids, finish_reason, prompt_tokens, completion_tokens}.")
    p.add_argument("model", metavar="MODEL", help="store name (e.g. smollm2) or path to a GGUF file / model dir")
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue ('-' reads it from stdin)")
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_constraint_flags(p)
    add_load_flags(p)
    add_speculation_flags(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sampling = sampling_from_args(args)
    constraint, err = constraint_from_args(args)
    err = err or check_sampling(sampling)
    if err:
        print(err, file=sys.stderr)
        return 1
    sampling.update(constraint)
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    lm = load_model(args.model, dtype=args.dtype, quant=args.quant, threads=args.threads)
    apply_speculation_flags(lm, args)
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
