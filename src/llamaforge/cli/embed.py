"""`llamaforge embed MODEL TEXT...`: embedding vectors, computed as /api/embed and /v1/embeddings compute them
(`generate.embed`: mean-pooled, L2-normalised final hidden states). One JSON array per input on its own line, or
with --json one object shaped like Ollama's /api/embed answer."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import InvalidRequestError

MAX_STDIN_BYTES = 16 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaforge embed",
        description="Embed each TEXT with MODEL (no TEXT, or '-': one input per line of stdin). Prints one JSON "
                    "array per input, or with --json {model, embeddings, prompt_eval_count}.")
    p.add_argument("model", metavar="MODEL", help="store name (e.g. smollm2) or path to a GGUF file / model dir")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--dimensions", type=int, default=None,
                   help="keep the first N components and re-normalise (as the APIs' `dimensions`)")
    p.add_argument("--no-truncate", action="store_true",
                   help="refuse inputs longer than the context window instead of cutting them")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of one array per line")
    p.add_argument("--dtype", metavar="DTYPE", help="float32, bfloat16 or float16 dense weights")
    p.add_argument("--quant", metavar="Q", help="in-memory weight format: auto (default), none, q4, int8, bf16")
    return p


def _inputs(texts: list[str]) -> list[str]:
    if texts and texts != ["-"]:
        return texts
    raw = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)
    if len(raw) > MAX_STDIN_BYTES:
        raise InvalidRequestError(f"stdin holds more than {MAX_STDIN_BYTES >> 20} MiB of text", field="TEXT")
    lines = [ln for ln in raw.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise InvalidRequestError("nothing to embed: give TEXT arguments or lines on stdin", field="TEXT")
    return lines


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    items = _inputs(args.texts)
    import llamaforge
    from ..generate.embed import check_dimensions, embed_ids, tokenize_inputs
    from ..generate.engine import context_length
    lm = llamaforge.load(args.model, dtype=args.dtype, quant=args.quant, compile=False)  # no decode step needed
    dims = check_dimensions(lm, args.dimensions, field="--dimensions")
    batch = tokenize_inputs(lm, items, max_tokens=context_length(lm), truncate=not args.no_truncate, field="TEXT")
    vectors = embed_ids(lm.model, batch, dims)
    if args.json:
        print(json.dumps({"model": lm.name or args.model, "embeddings": vectors,
                          "prompt_eval_count": sum(len(b) for b in batch)}))
    else:
        for v in vectors:
            print(json.dumps(v))
    return 0
