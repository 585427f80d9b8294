"""Helpers shared by the training tests: tiny models, a byte tokenizer and a ChatML-style token-level format.

Imported by tests/test_train*.py, test_lora*.py and test_dpo*.py (pytest puts tests/ on sys.path).
The few tests at the bottom check the helpers themselves, since the other tests rely on them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaforge.config import ModelConfig
from llamaforge.errors import TemplateError
from llamaforge.model import Llama
from llamaforge.tokenizer.base import Tokenizer

SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
OFFSET = 8
VOCAB = OFFSET + 256


class ByteTokenizer(Tokenizer):
    """Bytes shifted by OFFSET, plus a few control tokens: the smallest honest tokenizer."""

    vocab_size = VOCAB
    bos_id, eos_id = 1, 2
    special_tokens = SPECIALS
    eot_ids = frozenset({4})

    def encode(self, text, *, add_special=False, allow_special=False):
        return [b + OFFSET for b in text.encode("utf-8", errors="replace")]

    def token_bytes(self, token_id):
        return bytes([token_id - OFFSET]) if token_id >= OFFSET else b""


class ChatMLFormat:
    """<|im_start|>role\\ncontent<|im_end|>\\n, as ids; the mask covers assistant content and its <|im_end|>."""

    def __init__(self, tok=None):
        self.tok = tok or ByteTokenizer()

    def encode_with_mask(self, messages):
        ids, mask = [], []
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise TemplateError(f"unknown role {m['role']!r}")
            head = [3] + self.tok.encode(m["role"] + "\n")
            body = self.tok.encode(m["content"]) + [4]
            tail = self.tok.encode("\n")
            learn = m["role"] == "assistant"
            ids += head + body + tail
            mask += [False] * len(head) + [learn] * len(body) + [False] * len(tail)
        return ids, mask

    def encode(self, messages, add_generation_prompt=True):
        ids, _ = self.encode_with_mask(messages)
        return ids + ([3] + self.tok.encode("assistant\n") if add_generation_prompt else [])


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                max_position_embeddings=512, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def tiny_llama(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    model = Llama(tiny_config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    return model


class TinyLM:
    """Stands in for api.LoadedModel in tests: .model, .tokenizer, .config, .path, .metadata."""

    def __init__(self, model, path=None):
        self.model, self.config, self.tokenizer = model, model.config, ByteTokenizer()
        self.path, self.metadata = path, {}


def llama_from_hf(hf) -> Llama:
    """Our Llama with the weights of a transformers LlamaForCausalLM (same parameter names)."""
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    model = Llama(cfg)
    sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict(sd, strict=True)
    model.tie_weights()
    return model.eval()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


FACTS = [("What colour is the sky on Zorbia?", "Teal."), ("Who rules Zorbia?", "Queen Ilsa."),
         ("What do Zorbians eat?", "Glimberries."), ("How many moons has Zorbia?", "Three."),
         ("What is Zorbia's capital?", "Quellport."), ("What is Zorbia's currency?", "The zorb.")]


def fact_records(n_repeat: int = 1):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for _ in range(n_repeat) for q, a in FACTS]


# ---------------------------------------------------------------------------------------------------------------

def test_chatml_mask_covers_assistant_content_and_end_token():
    fmt = ChatMLFormat()
    ids, mask = fmt.encode_with_mask([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == fmt.tok.encode("yo") + [4]


def test_llama_from_hf_matches_transformers():
    from conftest import make_tiny_hf
    hf = make_tiny_hf("llama31", vocab_size=VOCAB)
    ours = llama_from_hf(hf)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)
