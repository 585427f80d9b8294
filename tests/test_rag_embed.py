"""The BERT encoder behind RAG embeddings and re-ranking, checked against the reference implementations:
sentence-transformers for all-MiniLM-L6-v2 and for a random cross-encoder, transformers' BertModel for random
weights with each pooling mode; bad model directories give ModelFormatError."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rag_support import tiny_bert_dir

from llamaforge.errors import ModelFormatError
from llamaforge.rag.embedders import SentenceEncoder, default_model_dir, get_embedder

TEXTS = ["The ferry is called the Grey Heron.", "Ember moss glows faintly after rain. " * 30, "x",
         "Error code E9 means the temperature sensor has failed.", "naïve café – 1,450 °C"]


def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer
    ours = get_embedder().embed(TEXTS)
    ref = SentenceTransformer(str(default_model_dir()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    # batching and padding do not change a vector
    np.testing.assert_allclose(get_embedder().embed(TEXTS[2:3])[0], ours[2], atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_random_bert_matches_transformers(tmp_path, pooling):
    from transformers import BertModel
    d = tiny_bert_dir(tmp_path / pooling, seed=3, pooling=pooling)
    enc = SentenceEncoder(d, str(d))
    assert enc.pooling == pooling and enc.dim == 32 and enc.max_tokens == 128
    ref_model = BertModel.from_pretrained(d).eval()
    got = enc.embed(TEXTS)
    for i, t in enumerate(TEXTS):
        ids = enc.tokenizer.encode(t).ids
        with torch.no_grad():
            h = ref_model(torch.tensor([ids])).last_hidden_state[0]
        v = {"mean": h.mean(0), "cls": h[0], "max": h.max(0).values}[pooling]
        np.testing.assert_allclose(got[i], torch.nn.functional.normalize(v, dim=0).numpy(), atol=2e-5)


def test_cross_encoder_matches_sentence_transformers(tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from llamaforge.rag.rerank import CrossEncoder
    from llamaforge.rag.search import Hit
    d = tiny_bert_dir(tmp_path / "ce", seed=5, classifier=True)
    passages = ["The ferry is called the Grey Heron.", "Saltroot stew simmers for three hours.", "E9: sensor."]
    ours = CrossEncoder(d).scores("what is the ferry called", passages)
    ref = STCrossEncoder(str(d), device="cpu").predict([("what is the ferry called", p) for p in passages])
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    hits = [Hit(source=str(i), text=p, score=0.0, chunk_id=i, start=0, end=len(p)) for i, p in enumerate(passages)]
    ranked = CrossEncoder(d).rerank("what is the ferry called", hits)
    assert [h.score for h in ranked] == sorted(ours, reverse=True)


def test_bad_model_directories(tmp_path):
    d = tiny_bert_dir(tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelFormatError):
        SentenceEncoder(d, str(d))
    d2 = tiny_bert_dir(tmp_path / "m2")
    cfg = json.loads((d2 / "config.json").read_text())
    (d2 / "config.json").write_text(json.dumps(dict(cfg, hidden_size=64)))
    with pytest.raises(ModelFormatError, match="shape"):
        SentenceEncoder(d2, str(d2))
    d3 = tiny_bert_dir(tmp_path / "m3")
    (d3 / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Dense", "path": "2"}]))
    with pytest.raises(ModelFormatError, match="unsupported"):
        SentenceEncoder(d3, str(d3))
    d4 = tiny_bert_dir(tmp_path / "m4")
    (d4 / "config.json").write_text(json.dumps(dict(cfg, model_type="roberta")))
    with pytest.raises(ModelFormatError, match="BERT only"):
        SentenceEncoder(d4, str(d4))
