"""Optional re-ranking with a cross-encoder (a BERT sequence classifier that reads query and passage together,
e.g. the ms-marco MiniLM cross-encoders): more accurate than the bi-encoder's cosine, too slow for a whole
collection, so it re-orders the fused candidates only.

`--reranker DIR`: a Hugging Face directory (config.json, model.safetensors, tokenizer.json) of a
`BertForSequenceClassification`; no such model ships with llamaforge, so re-ranking is off unless one is given.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from ..errors import ModelFormatError

_BATCH = 16


class CrossEncoder:
    """Scores (query, passage) pairs: sigmoid of the logit for one-label models, else the last label's softmax."""

    def __init__(self, model_dir: str | Path, max_tokens: int = 512):
        from tokenizers import Tokenizer

        from .bert import load_bert
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ModelFormatError(self.dir, "re-ranker must be a model directory")
        self.model = load_bert(self.dir, classifier=True)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ModelFormatError(self.dir / "tokenizer.json", f"cannot read tokenizer: {e}") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(min(max_tokens, self.model.config.max_positions), strategy="only_second")
        self._lock = threading.Lock()

    def scores(self, query: str, passages: Sequence[str]) -> list[float]:
        import torch
        encs = self.tokenizer.encode_batch([(query, p) for p in passages])
        out: list[float] = []
        with self._lock, torch.inference_mode():
            for s in range(0, len(encs), _BATCH):
                part = encs[s:s + _BATCH]
                T = max(len(e.ids) for e in part)
                ids = torch.zeros((len(part), T), dtype=torch.long)
                types = torch.zeros_like(ids)
                mask = torch.zeros_like(ids)
                for r, e in enumerate(part):
                    n = len(e.ids)
                    ids[r, :n] = torch.tensor(e.ids)
                    types[r, :n] = torch.tensor(e.type_ids)
                    mask[r, :n] = 1
                logits = self.model.classify(ids, mask, types).float()
                if logits.shape[-1] == 1:
                    out += torch.sigmoid(logits[:, 0]).tolist()
                else:
                    out += torch.softmax(logits, -1)[:, -1].tolist()
        return out

    def rerank(self, query: str, hits: list) -> list:
        """`hits` (objects with .text and .score) re-ordered by cross-encoder score, which replaces .score."""
        if not hits:
            return hits
        for h, s in zip(hits, self.scores(query, [h.text for h in hits])):
            h.score = float(s)
        return sorted(hits, key=lambda h: -h.score)


_cache: dict[str, CrossEncoder] = {}
_lock = threading.Lock()


def get_reranker(path: str) -> CrossEncoder:
    key = str(Path(path).resolve())
    with _lock:
        if key not in _cache:
            _cache[key] = CrossEncoder(key)
        return _cache[key]
