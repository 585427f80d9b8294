"""Which strategy a training task uses. A module of its own because the strategies of the newer tasks (KTO/ORPO,
reward models, GRPO) build on the base strategies in strategies.py: the choice sits above all of them."""
from __future__ import annotations

from .grpo import GRPOStrategy
from .preference import KTOStrategy, ORPOStrategy
from .reward_model import RewardStrategy
from .strategies import DPOStrategy, LoraStrategy, Strategy


def make_strategy(cfg) -> Strategy:
    """The strategy for cfg.task (rejection sampling is a loop of SFT rounds: train.rejection)."""
    if cfg.task == "dpo":
        return DPOStrategy(cfg)
    if cfg.task in ("kto", "orpo"):
        return KTOStrategy(cfg) if cfg.task == "kto" else ORPOStrategy(cfg)
    if cfg.task == "rm":
        return RewardStrategy(cfg)
    if cfg.task == "grpo":
        return GRPOStrategy(cfg)
    return Strategy(cfg) if cfg.method == "full" else LoraStrategy(cfg)
