"""Fetch the third-party test assets that ship inside PyPI packages, into .cache/assets (idempotent).

- llama.cpp tokenizer test vectors from the llama-cpp-python 0.3.36 sdist (vendor/llama.cpp/models/ggml-vocab-*)
- Meta's Llama 3 tokenizer.model and Llama 3.1 prompt-format document from the llama-models wheel
- tool-aware chat templates from the same llama-cpp-python sdist (vendor/llama.cpp/models/templates/*.jinja: the
  templates the models' own repositories publish), for the tool-prompt tests against transformers
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
TEMPLATES = ["Qwen-Qwen2.5-7B-Instruct.jinja", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
             "meta-llama-Llama-3.1-8B-Instruct.jinja"]


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
    out, templates = DEST / "vocab", DEST / "templates"
    if all((out / f"ggml-vocab-{v}.gguf").exists() for v in VOCABS) and \
            all((templates / t).exists() for t in TEMPLATES):
        return
    out.mkdir(parents=True, exist_ok=True)
    templates.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download("llama-cpp-python==0.3.36", tmp, sdist=True)
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                name = m.name.rsplit("/", 1)[-1]
                target = None
                if "/vendor/llama.cpp/models/ggml-vocab-" in m.name and m.isfile() and \
                        any(name.startswith(f"ggml-vocab-{v}.gguf") for v in VOCABS):
                    target = out / name
                elif "/vendor/llama.cpp/models/templates/" in m.name and m.isfile() and name in TEMPLATES:
                    target = templates / name
                if target is not None:
                    tmpf = target.with_name(name + ".part")
                    tmpf.write_bytes(tf.extractfile(m).read())
                    os.replace(tmpf, target)


def fetch_llama3_tokenizer() -> None:
    files = {"llama_models/llama3/tokenizer.model": DEST / "llama3" / "tokenizer.model",
             "llama_models/llama3_1/prompt_format.md": DEST / "llama3" / "llama3_1_prompt_format.md"}
    if all(out.exists() for out in files.values()):
        return
    (DEST / "llama3").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        whl = _download("llama-models==0.3.0", tmp, sdist=False)
        with zipfile.ZipFile(whl) as zf:
            for member, out in files.items():
                tmpf = out.with_name(out.name + ".part")
                tmpf.write_bytes(zf.read(member))
                os.replace(tmpf, out)


if __name__ == "__main__":
    fetch_vocabs()
    fetch_llama3_tokenizer()
    print(f"test assets ready in {DEST}")
