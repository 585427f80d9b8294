"""Shared helpers for the RAG tests: the demo collection built once per session and copied into each test's
isolated $LLAMAFORGE_HOME, and a tiny random sentence-embedding BERT directory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import llamaforge

DEMO_DOCS = Path(llamaforge.__file__).parent / "data" / "rag_demo" / "docs"
DEMO_QUESTIONS = DEMO_DOCS.parent / "questions.jsonl"
_BUILT: dict[str, Path] = {}


def demo_collection_file(tmp_factory) -> Path:
    """The demo documents ingested (default embedder) into a session-wide collection file."""
    if "demo" not in _BUILT:
        from llamaforge.rag.ingest import ingest
        root = tmp_factory.mktemp("ragdemo")
        rep = ingest("demo", [DEMO_DOCS], root=root, progress=False)
        assert not rep.errors and len(rep.added) == 10
        _BUILT["demo"] = root / "demo.sqlite"
    return _BUILT["demo"]


def install_demo(tmp_factory, name: str = "demo") -> Path:
    """Copy the demo collection into this test's $LLAMAFORGE_HOME/rag as `name`."""
    from llamaforge.rag.index import rag_home
    src = demo_collection_file(tmp_factory)
    dst = rag_home() / f"{name}.sqlite"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def tiny_bert_dir(path: Path, *, seed: int = 0, pooling: str = "mean", classifier: bool = False) -> Path:
    """A random 2-layer BERT saved by transformers (safetensors), with the MiniLM tokenizer and a
    sentence-transformers layout (or a sequence classifier for cross-encoder tests)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from llamaforge.rag.embedders import default_model_dir
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    model = (BertForSequenceClassification if classifier else BertModel)(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    src = default_model_dir()
    shutil.copyfile(src / "tokenizer.json", path / "tokenizer.json")
    if not classifier:
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": 32, f"pooling_mode_{pooling}_tokens" if pooling != "cls"
            else "pooling_mode_cls_token": True}))
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    return path
