"""Fetch the third-party test assets that ship inside PyPI packages, into .cache/assets (idempotent).

- llama.cpp tokenizer test vectors from the llama-cpp-python 0.3.36 sdist (vendor/llama.cpp/models/ggml-vocab-*)
- Meta's Llama 3 tokenizer.model from the llama-models wheel
Nothing here is imported by the library; the tests read the files through tests/conftest.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = Path(os.environ.get("LLAMAFORGE_TEST_ASSETS", ROOT / ".cache" / "assets"))
VOCABS = ["llama-spm", "llama-bpe", "gpt-2", "phi-3", "starcoder", "deepseek-llm"]


def _download(spec: str, tmp: str, *, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, spec]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True)
    files = sorted(Path(tmp).iterdir())
    if not files:
        raise SystemExit(f"pip download of {spec} produced no file")
    return files[-1]


def fetch_vocabs() -> None:
    out = DEST / "vocab"
    if all((out / f"ggml-vocab-{v}.gguf").exists() for v in VOCABS):
        return
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download("llama-cpp-python==0.3.36", tmp, sdist=True)
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                name = m.name.rsplit("/", 1)[-1]
                if "/vendor/llama.cpp/models/ggml-vocab-" in m.name and m.isfile() and \
                        any(name.startswith(f"ggml-vocab-{v}.gguf") for v in VOCABS):
                    data = tf.extractfile(m).read()
                    tmpf = out / (name + ".part")
                    tmpf.write_bytes(data)
                    os.replace(tmpf, out / name)


def fetch_llama3_tokenizer() -> None:
    out = DEST / "llama3" / "tokenizer.model"
    if out.exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        whl = _download("llama-models==0.3.0", tmp, sdist=False)
        with zipfile.ZipFile(whl) as zf:
            data = zf.read("llama_models/llama3/tokenizer.model")
    tmpf = out.with_suffix(".part")
    tmpf.write_bytes(data)
    os.replace(tmpf, out)


if __name__ == "__main__":
    fetch_vocabs()
    fetch_llama3_tokenizer()
    print(f"test assets ready in {DEST}")
