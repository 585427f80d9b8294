"""`llamaforge tokenize MODEL_OR_TOKENIZER_FILE TEXT [--special] [--json]`: print the token ids of a text."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from .._fs import read_stdin


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaforge tokenize",
        description="Print the token ids of TEXT. Only the tokenizer is loaded (GGUF: metadata only).")
    p.add_argument("model", metavar="MODEL_OR_TOKENIZER_FILE",
                   help="model name or path, tokenizer.json, tokenizer.model (SentencePiece or tiktoken), "
                        "or a (vocab-only) GGUF file")
    p.add_argument("text", metavar="TEXT", help="text to tokenize; '-' reads standard input")
    p.add_argument("--special", action="store_true",
                   help="recognise control-token text such as <|im_end|> (off: it is encoded as plain text)")
    p.add_argument("--bos", action="store_true", help="add BOS/EOS as the model does for a raw prompt")
    p.add_argument("--json", action="store_true", help="print a JSON list of ids")
    p.add_argument("--pieces", action="store_true", help="print one 'id<TAB>piece' line per token")
    return p


def load_tokenizer_for(target: str):
    """A tokenizer from a file/directory path, else from a model name in the store (weights untouched)."""
    from ..tokenizer.load import load_tokenizer

    p = Path(target).expanduser()
    if p.exists():
        return load_tokenizer(p)
    from ..store import resolve
    return load_tokenizer(resolve(target).path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.text == "-":
        # Bytes, so invalid UTF-8 on stdin is replaced (U+FFFD) rather than raising.
        text: str | bytes = read_stdin(text=False)
    else:
        text = args.text
    tok = load_tokenizer_for(args.model)
    ids = tok.encode(text, add_special=args.bos, allow_special=args.special)
    if args.json:
        print(json.dumps(ids))
    elif args.pieces:
        for i in ids:
            print(f"{i}\t{json.dumps(tok.id_to_piece(i), ensure_ascii=False)}")
    else:
        print(" ".join(map(str, ids)))
    return 0
