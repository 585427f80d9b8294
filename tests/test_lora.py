"""LoRA layers, NF4, and PEFT-format adapters checked against Hugging Face peft + transformers."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llamaforge.errors import InvalidRequestError, ModelFormatError
from llamaforge.train.lora import (LoRALinear, adapters_disabled, apply_adapter, apply_lora, load_adapter,
                                   lora_state_dict, merge_lora, save_adapter)
from llamaforge.train.nf4 import NF4_CODE, NF4Linear, dequantize_nf4, quantize_nf4
from test_train_utils import VOCAB, llama_from_hf, tiny_llama


def _randomize_lora(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)  # non-zero B: the update really counts


def test_lora_linear_math_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    lora = LoRALinear.from_base(base, r=4, alpha=8)
    assert lora.base is base and lora.scaling == 2.0
    x = torch.randn(3, 12)
    torch.testing.assert_close(lora(x), base(x))  # B starts at zero
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    expect = base(x) + 2.0 * x @ lora.lora_A.weight.t() @ lora.lora_B.weight.t()
    torch.testing.assert_close(lora(x), expect)
    torch.testing.assert_close(lora.merge()(x), expect, atol=1e-5, rtol=1e-5)
    lora.disabled = True
    torch.testing.assert_close(lora(x), base(x))
    assert not base.weight.requires_grad and lora.lora_A.weight.requires_grad


def test_apply_lora_freezes_base_and_disable_restores_base():
    model = tiny_llama()
    x = torch.randint(0, VOCAB, (1, 7))
    ref = model(x).detach()
    names = apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    _randomize_lora(model)
    assert not torch.allclose(model(x), ref, atol=1e-4)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x), ref)
    with pytest.raises(InvalidRequestError):
        apply_lora(tiny_llama(), target_modules=["nope"])


def test_nf4_codebook_is_the_papers_normal_quantiles():
    # QLoRA appendix E: 8 positive quantiles of N(0,1) from offset 0.9677 to 0.5, 7 negative, plus an exact 0.
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close((v / v.abs().max()).float(), NF4_CODE, atol=1e-6, rtol=0)


def test_nf4_round_trip_error_and_exact_codes():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    packed, absmax = quantize_nf4(w)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2 and absmax.numel() == w.numel() // 64
    back = dequantize_nf4(packed, absmax, w.shape)
    # Each value lands on the nearest code: error at most half the widest code gap times the block absmax.
    max_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    assert ((back - w).abs() <= max_gap * absmax.repeat_interleave(64).view_as(w) + 1e-6).all()
    # Values that are exactly code points times absmax survive unchanged.
    exact = NF4_CODE.repeat(4).view(1, 64) * 3.0
    p2, a2 = quantize_nf4(exact)
    torch.testing.assert_close(dequantize_nf4(p2, a2, exact.shape), exact)
    with pytest.raises(InvalidRequestError):
        quantize_nf4(torch.randn(10, 7))


def test_nf4_linear_passes_gradient_to_input_and_merges():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = NF4Linear.from_linear(lin)
    x = torch.randn(2, 64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, lin(x), atol=0.15, rtol=0.1)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    lora = LoRALinear.from_base(q, r=2, alpha=4)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    torch.testing.assert_close(lora.merge()(x), lora(x), atol=1e-5, rtol=1e-5)


def _hf_pair(variant="llama31"):
    from conftest import make_tiny_hf
    hf = make_tiny_hf(variant, vocab_size=VOCAB)
    return hf, llama_from_hf(hf)


@pytest.mark.parametrize("variant", ["llama31", "llama32"])
def test_saved_adapter_matches_peft_logits(tmp_path, variant):
    """Our model + adapter == transformers + peft loading the adapter we wrote (<= 1e-4)."""
    from peft import PeftModel
    hf, ours = _hf_pair(variant)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_lora(ours, r=4, alpha=12, target_modules=targets)
    _randomize_lora(ours)
    save_adapter(ours, tmp_path / "ad", base_model="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 12 and cfg["peft_type"] == "LORA"
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    x = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ref = peft_model(x).logits
        got = ours.eval()(x)
    assert (got - ref).abs().max() <= 1e-4
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(x).logits
    assert (plain - ref).abs().max() > 1e-3  # the adapter changes the output: the check above is not vacuous


def test_peft_written_adapter_loads_in_llamaforge(tmp_path):
    """The reverse direction: an adapter peft saves (non-zero B, rslora off) applied by apply_adapter."""
    from peft import LoraConfig, get_peft_model
    hf, ours = _hf_pair("llama31")
    pcfg = LoraConfig(r=6, lora_alpha=9, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                      init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(hf, pcfg).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    x = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        ref = pm(x).logits
    wrapped = load_adapter(ours, tmp_path / "peft")
    assert len(wrapped) == 6
    with torch.no_grad():
        assert (ours.eval()(x) - ref).abs().max() <= 1e-4
    # apply_adapter merges into plain Linear layers: same logits, no LoRA wrappers left.
    _, fresh = _hf_pair("llama31")
    apply_adapter(fresh, tmp_path / "peft")
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())
    with torch.no_grad():
        assert (fresh(x) - ref).abs().max() <= 1e-4


def test_merge_lora_equals_wrapped(tmp_path):
    model = tiny_llama()
    apply_lora(model, r=4, alpha=4, target_modules=["q_proj", "gate_proj"])
    _randomize_lora(model)
    x = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert not lora_state_dict(model)


def test_bad_adapters_are_named_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(ModelFormatError, match="adapter_config.json is missing"):
        load_adapter(model, tmp_path)
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_adapter(model, d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelFormatError, match="pickled"):
        load_adapter(model, d)
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelFormatError, match="unreadable"):
        load_adapter(model, d)
    # Wrong shapes for this model: names the module and both shapes.
    other = tiny_llama(hidden_size=32, intermediate_size=64, head_dim=8)
    apply_lora(other, r=4, alpha=8, target_modules=["q_proj"])
    save_adapter(other, d)
    with pytest.raises(ModelFormatError, match="q_proj.*do not fit"):
        load_adapter(tiny_llama(), d)
