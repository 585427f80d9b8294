"""`llamaforge convert MODEL --to hf|gguf --out PATH [--type f32|f16|bf16|q8_0|q4_0|q4_1] [--force]`.

The conversion itself is `llamaforge.formats.convert` (shared with `finetune merge`); this module resolves a store
name to its files and reports.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._fs import io_errors
from ..errors import InvalidRequestError, LlamaforgeError


def convert(model: str, to: str, out: str | Path, type_: str | None = None, force: bool = False) -> Path:
    """Convert a store model or path to an HF directory or a GGUF file. Returns the output path."""
    from ..formats import convert as conv
    from ..store import resolve
    conv.check_output(out, to, type_, force=force)   # bad options fail before the model is even looked up
    ref = resolve(model)
    return conv.convert(ref.path, to, out, type_, force=force)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `llamaforge convert`."""
    p = argparse.ArgumentParser(prog="llamaforge convert",
                                description="Convert a model (store name or path) to a Hugging Face directory "
                                            "or a GGUF file.")
    p.add_argument("model", help="store name, GGUF file, HF directory or Meta directory")
    p.add_argument("--to", required=True, choices=("hf", "gguf"), help="output format")
    p.add_argument("--out", required=True, help="output directory (hf) or file (gguf); its parent must exist")
    p.add_argument("--type", default=None, choices=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"),
                   help="weight type: f32 | f16 (default) | q8_0, q4_0, q4_1 (gguf only) | bf16 (hf only)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        with io_errors(f"cannot write {args.out}"):   # a full disk is one line; the old output stays intact
            out = convert(args.model, args.to, args.out, args.type, force=args.force)
    except ValueError as e:
        if isinstance(e, LlamaforgeError):
            raise
        raise InvalidRequestError(str(e)) from None
    print(f"wrote {out}")
    return 0
