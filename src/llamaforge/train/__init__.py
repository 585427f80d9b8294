"""Fine-tuning: SFT (full, LoRA, QLoRA) and DPO, PEFT-format adapters, checkpoints and resume, torchrun.

    from llamaforge.train import TrainConfig, train
    train(TrainConfig(model="smollm2", data="facts.jsonl", out="out/", method="lora", max_steps=100))

Submodules are imported lazily so `import llamaforge.train.lora` (used by the model loader) stays light.
"""
from __future__ import annotations

__all__ = ["TrainConfig", "train", "Trainer", "TrainResult", "apply_adapter", "LoRALinear", "dpo_loss"]


def __getattr__(name):
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    if name == "train":
        from .jobs import train
        return train
    if name in ("Trainer", "TrainResult"):
        from . import trainer
        return getattr(trainer, name)
    if name in ("apply_adapter", "LoRALinear"):
        from . import lora
        return getattr(lora, name)
    if name == "dpo_loss":
        from .strategies import dpo_loss
        return dpo_loss
    raise AttributeError(f"module 'llamaforge.train' has no attribute {name!r}")
