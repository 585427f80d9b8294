"""The default fast configuration on the real SmolLM2 Q4_1 GGUF: what it loads, and that it keeps quality."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.model import quant as Q

ESSAY = Path(__file__).resolve().parent.parent / "bench" / "texts" / "essay.txt"
PROMPTS = ["The first bridges were", "Steel is strong when it is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def fast(smollm2_gguf):
    return llamaforge.load(str(smollm2_gguf))


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return llamaforge.load(str(smollm2_gguf), dtype="float32")


def test_default_is_packed_straight_from_the_file(fast):
    m = fast.model
    assert fast.metadata["quant"] == "q4"
    layer = m.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Q.Int4Linear) and isinstance(layer.mlp.down_proj, Q.Int4Linear)
    assert isinstance(m.model.embed_tokens, Q.Int8Embedding)
    # Tied embedding and head share one int8 table: no second copy.
    assert m.lm_head.qweight.data_ptr() == m.model.embed_tokens.qweight.data_ptr()
    # No float copy of the big matrices survives: only norms are float parameters.
    assert max(p.numel() for p in m.parameters()) == m.config.hidden_size
    assert sum(b.numel() * b.element_size() for b in m.buffers()) < 100e6  # ~90 MB vs 540 MB in float32


def _greedy(lm, prompt: str, n: int) -> list[int]:
    ids = lm.tokenizer.encode(prompt)
    cache = lm.model.new_cache(1, len(ids) + n)
    out = []
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids]), cache=cache, input_pos=0, last_only=True)
        for i in range(n):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits = lm.model(torch.tensor([[tok]]), cache=cache, input_pos=len(ids) + i, last_only=True)
    return out


def test_greedy_tokens_match_float32(fast, reference):
    """The q4 weights are the file's own Q4_1 values (exact conversion); only bf16 kernel inputs and the int8
    head differ from float32, so greedy continuations of these prompts agree token for token."""
    for prompt in PROMPTS:
        assert _greedy(fast, prompt, 12) == _greedy(reference, prompt, 12), prompt


def _perplexity(lm, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids]))[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
    return math.exp(float(nll) / (len(ids) - 1))


def test_perplexity_guard_within_one_percent_of_float32(fast, reference):
    """The quality bar for choosing the default: perplexity within 1% of the dequantized float32 model's
    (bench/run.py measures the whole text; 384 tokens keep this test quick)."""
    ids = fast.tokenizer.encode(ESSAY.read_text(encoding="utf-8"))[:384]
    p_fast, p_ref = _perplexity(fast, ids), _perplexity(reference, ids)
    assert 1 < p_ref < 100
    assert abs(p_fast / p_ref - 1) < 0.01, (p_fast, p_ref)


def test_explicit_choices_are_honoured(smollm2_gguf):
    lm = llamaforge.load(str(smollm2_gguf), quant="int8")
    assert lm.metadata["quant"] == "int8"
    assert isinstance(lm.model.model.layers[0].mlp.gate_up_proj, Q.Int8Linear)
    with pytest.raises(llamaforge.errors.InvalidRequestError):
        llamaforge.load(str(smollm2_gguf), quant="q2")


def test_static_cache_decode_equals_dynamic_cache():
    """The fixed-shape cache used for CUDA graphs / torch.compile gives the same logits as the default one."""
    from conftest import make_tiny_hf
    from llamaforge.config import ModelConfig
    from llamaforge.model import Llama
    hf = make_tiny_hf("llama31")
    model = Llama(ModelConfig.from_hf_config(hf.config.to_dict())).eval()
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    outs = []
    with torch.no_grad():
        for static in (False, True):
            cache = model.new_cache(1, 16, static=static)
            model(ids[:, :6], cache=cache, input_pos=0)
            steps = [model(ids[:, i:i + 1], cache=cache, input_pos=torch.tensor([i])) for i in range(6, 9)]
            outs.append(torch.cat(steps, 1))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
