"""Public Python API: `load()` and the `LoadedModel` it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig


@dataclass
class LoadedModel:
    """A model ready to use: architecture config, the nn.Module, its tokenizer and chat format.

    `defaults` holds per-model generation defaults (from a store manifest: system prompt, parameters).
    """

    config: ModelConfig
    model: torch.nn.Module
    tokenizer: Any = None          # llamaforge.tokenizer.base.Tokenizer
    path: Path | None = None
    name: str | None = None
    metadata: dict = field(default_factory=dict)   # format facts: file type / quantization, license, template...
    defaults: dict = field(default_factory=dict)   # {"system": str, "options": {...}, "template": str}
    compiled: Any = None   # model.aot.CompiledDecoder: the AOT-compiled one-token decode step, when available

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # generate / stream / chat are implemented in llamaforge.generate (see there).
    def generate(self, prompt, **sampling):
        from .generate.api import generate
        return generate(self, prompt, **sampling)

    def stream(self, prompt, **sampling):
        from .generate.api import stream
        return stream(self, prompt, **sampling)

    def chat(self, messages, *, stream: bool = False, **sampling):
        from .generate.api import chat
        return chat(self, messages, stream=stream, **sampling)


def load(path_or_name, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         quant: str | None = None, compile: bool | str = "auto", **kwargs) -> LoadedModel:
    """Load by store name (e.g. "smollm2") or path (GGUF file, HF directory, Meta checkpoint directory).

    dtype: activation/weight dtype for dequantized weights (default float32 on CPU).
    quant: in-memory weight format for the fast path (see llamaforge.model.quant), None = the default.
    compile: the AOT-compiled decode step (llamaforge.model.aot) for quantized CPU models: "auto" uses a cached
        one and otherwise builds it in a background process for next time; True builds it now if missing
        (30-120 s); False never uses it. LLAMAFORGE_COMPILE=0 turns it off.
    """
    from .formats.load import load_model
    from .store import Resolved, resolve
    # A store.Resolved (what the server resolved by name) is used as is; anything else is resolved here.
    ref = path_or_name if isinstance(path_or_name, Resolved) else resolve(path_or_name)
    if quant is None and dtype is None and not (ref.defaults or {}).get("adapter"):
        quant = "auto"  # the fast in-memory format for this file (model.quant.default_quant); adapters need dense
    lm = load_model(ref.path, dtype=dtype, device=device, quant=quant, **kwargs)
    lm.name = ref.name
    lm.defaults = dict(ref.defaults or {})
    if lm.defaults.get("adapter"):
        # A store model created with `--adapter`: a PEFT LoRA adapter directory applied on top of the base.
        from .train.lora import apply_adapter
        apply_adapter(lm, lm.defaults["adapter"])
    if compile and (lm.metadata.get("quant") or "none") != "none":
        from .model.aot import attach
        attach(lm, build_missing=True if compile is True else "background")
    return lm
