"""Models from the Hugging Face Hub: a repo id (`owner/name`, `hf://owner/name`, a huggingface.co URL) is
downloaded with `huggingface_hub` (safetensors, configs, tokenizer, license; never pickles) into a temporary
directory of the store, then imported like a local directory."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import StoreError
from .blobs import io_errors
from .manifests import empty_defaults, now
from .names import default_name_for, parse_name
from .sources import import_source

HF_REPO_RE = re.compile(r"(?:hf://|hf\.co/|https://huggingface\.co/)?([A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "LICENSE*", "README.md", "*.txt"]


def hf_repo_id(source: str) -> str | None:
    """The repo id a pull source names, or None when it does not look like one (paths never do)."""
    m = HF_REPO_RE.fullmatch(str(source))
    return m.group(1) if m and not str(source).startswith((".", "/", "~")) else None


def ollama_library_message(source: str) -> str | None:
    """The answer for a name from Ollama's library (`llama3.2`, `llama3.2:1b`, `registry.ollama.ai/library/x`),
    which this machine cannot download; None for anything else."""
    s = str(source).strip()
    for prefix in ("https://", "http://"):
        s = s[len(prefix):] if s.startswith(prefix) else s
    registry = s.startswith(("registry.ollama.ai/", "ollama.com/"))
    if not registry and ("/" in s or s.startswith((".", "~")) or s.lower().endswith(".gguf")):
        return None
    if not registry:
        from .names import parse_name
        try:
            parse_name(s)
        except StoreError:
            return None
    return (f"{source!r} is a name from Ollama's library, which is not available offline: llamaforge does not "
            "download from the Ollama registry. Pull a GGUF file or a model directory instead (llamaforge pull "
            "./model.gguf), or a Hugging Face repo id (llamaforge pull owner/name)")


def pull_hf(store, repo_id: str, name: str | None = None, *, revision: str | None = None, progress=None) -> str:
    """Download a Hugging Face repo and add it to `store` under `name` (default: from the repo name)."""
    n = parse_name(name) if name is not None else parse_name(default_name_for(repo_id))
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise StoreError("pulling from Hugging Face needs the huggingface_hub package") from None
    with io_errors("cannot create a download directory"):
        store.root.mkdir(parents=True, exist_ok=True)
        # `.download.<pid>.*`: a store opened after this process died removes it (BlobStore.cleanup).
        tmpdir = Path(tempfile.mkdtemp(prefix=f".download.{os.getpid()}.", dir=store.root))
    try:
        try:
            local = snapshot_download(repo_id, revision=revision, local_dir=tmpdir, allow_patterns=ALLOW_PATTERNS)
        except Exception as e:  # network, auth, missing repo: all become one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(f"cannot download {repo_id!r} from Hugging Face: {type(e).__name__}: "
                             f"{reason[:200]}") from None
        local = Path(local)
        for cache in local.glob(".cache"):
            shutil.rmtree(cache, ignore_errors=True)
        weights = import_source(store, local, progress=progress)
        man = {**weights, "defaults": empty_defaults(), "source": f"hf://{repo_id}" +
               (f"@{revision}" if revision else ""), "created_at": now()}
        store.write_manifest(n, man)
        return str(n)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
