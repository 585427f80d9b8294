"""The entry point of a fine-tuning job: one Trainer run, or rounds of rejection sampling (each an SFT run)."""
from __future__ import annotations

from .config import TrainConfig
from .rejection import rejection_sampling
from .trainer import Trainer, TrainResult


def train(cfg: TrainConfig, lm=None, chat_format=None, examples=None) -> TrainResult:
    """Run one fine-tuning job (see Trainer); task "rs" runs rejection-sampling rounds (train.rejection)."""
    if cfg.task == "rs":
        return rejection_sampling(cfg, lm=lm, chat_format=chat_format, examples=examples)
    return Trainer(cfg, lm=lm, chat_format=chat_format, examples=examples).run()
