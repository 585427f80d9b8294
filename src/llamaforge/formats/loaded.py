"""`LoadedModel`: what every format loader returns - the architecture, the module, its tokenizer and facts.

Plain data at the formats floor, so loaders never reach up to the public API. `llamaforge.api.LoadedModel`
extends it with generation, adapters and the compiled decode step (what `llamaforge.load` returns); code below
the API (the engine, the trainer) accepts either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig


@dataclass
class LoadedModel:
    """A model ready to use: architecture config, the nn.Module, its tokenizer.

    `metadata` holds format facts (format, file type / quantization, license, chat template, context length...);
    `defaults` per-model generation defaults (from a store manifest: system prompt, parameters, template,
    adapter). `compiled` is the AOT-compiled one-token decode step when one is attached
    (`llamaforge.generate.compiled.attach`), else None.
    """

    config: ModelConfig
    model: torch.nn.Module
    tokenizer: Any = None          # llamaforge.tokenizer.base.Tokenizer
    path: Path | None = None
    name: str | None = None
    metadata: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    compiled: Any = None           # llamaforge.model.aot.CompiledDecoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
