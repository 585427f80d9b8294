"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", section 4.1), as a strategy of
the one training loop.

Each step samples G completions for every prompt of the batch from the current policy (batched engine,
rollout.py), scores them with the reward (rewards.py), and takes the advantage of each completion relative to
its own group: A_i = (r_i - mean(r)) / std(r). The loss is the clipped policy-ratio objective with a KL
penalty to the reference policy, which for LoRA is the same model with its adapters disabled (no second copy).
One optimizer step is taken per generation batch (TRL's default num_iterations=1), so the sampling policy is
the current one: the ratio is 1 in value and the clip only matters for its gradient bookkeeping.
A reward that raises or returns NaN skips the step (counted in the result's summary); training goes on.
"""
from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn

from ..errors import ContextLengthError
from ..generate.engine import context_length
from .data import IGNORE, DatasetError, Example, collate
from .rewards import RewardFailure, check_records, make_reward, safe_scores
from .rollout import completion_rows, greedy_completions, sample_completions
from .strategies import PolicyStrategy, SkipStep, target_logits


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[P, G] rewards -> advantages normalised within each prompt's group (outcome supervision, sec. 4.1.2):
    (r - mean) / (std + eps), std unbiased as in TRL. A group whose rewards all agree gets zeros."""
    if rewards.shape[-1] < 2:
        raise ValueError("group advantages need at least 2 completions per prompt")
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float = 0.04, epsilon: float = 0.2):
    """The GRPO objective (Shao et al. 2024, eq. 3) with the unbiased KL estimator of eq. 4, per completion:

        ratio_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
        kl_t    = ref_t / pi_t - log(ref_t / pi_t) - 1
        loss_i  = -1/|o_i| * sum_t [ min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i) - beta * kl_t ]

    logps / old_logps / ref_logps: per-token log-probabilities [N, T] (ref None when beta is 0); advantages
    [N]; mask [N, T] marks completion tokens. Returns (losses [N], mean per-token KL per completion [N]).
    """
    m = mask.to(logps.dtype)
    n_tok = m.sum(-1).clamp(min=1)
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    if ref_logps is not None and beta:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
    else:
        kl = torch.zeros_like(logps)
    per_token = -(surrogate - beta * kl)
    return (per_token * m).sum(-1) / n_tok, ((kl * m).sum(-1) / n_tok).detach()


def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """(log-probabilities [B, T] of each label under softmax(logits / temperature), zero where there is no
    label; the label mask [B, T])."""
    logits, tgt, _ = target_logits(model, input_ids, labels)
    lp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tgt[:, None]).squeeze(-1)
    keep = labels != IGNORE
    out = torch.zeros(labels.shape, dtype=lp.dtype, device=lp.device)
    out[keep] = lp
    return out, keep


def prompt_of(record: dict):
    """What a reward sees as the prompt: the record's "prompt" (string or messages) or its "messages"."""
    return record.get("prompt", record.get("messages"))


class GRPOStrategy(PolicyStrategy):
    name = "grpo"
    kind = "prompt"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._step_tokens = (None, 0, 0.0)   # (step, tokens trained on, seconds sampling + scoring)

    def attach(self, lm, chat_format, examples: list[Example]) -> None:
        self.lm = lm
        self.stop_ids = tuple(sorted(getattr(chat_format, "stop_ids", ()) or ()))
        self.reward = make_reward(self.cfg.reward)
        check_records(self.reward, [(e.line, e.record or {}) for e in examples], self.cfg.data or "<examples>")
        ctx = context_length(lm)
        for e in examples:
            if len(e.ids) + self.cfg.max_new_tokens > ctx:
                raise DatasetError(self.cfg.data or "<examples>", e.line,
                                   str(ContextLengthError(len(e.ids) + self.cfg.max_new_tokens, ctx))
                                   + f" (prompt {len(e.ids)} tokens + max_new_tokens {self.cfg.max_new_tokens})")

    def count(self, examples: list[Example]) -> int:
        return len(examples) * self.cfg.group_size

    def _rewards(self, micro: list[Example], comps) -> list[float]:
        flat = [c for group in comps for c in group]
        records = [micro[c.prompt_index].record or {} for c in flat]
        try:
            return safe_scores(self.reward, [prompt_of(r) for r in records], [c.text for c in flat], records)
        except RewardFailure as e:
            raise SkipStep(str(e)) from None

    def collate(self, micro: list[Example]) -> dict:
        c, G = self.cfg, self.cfg.group_size
        t0 = time.perf_counter()
        prompts = [e.ids for e in micro]
        comps = sample_completions(self.lm, prompts, G, max_new_tokens=c.max_new_tokens,
                                   temperature=c.temperature, top_p=1.0, seed=c.seed,
                                   salt=(self.current_step, *(e.line for e in micro)), stop_ids=self.stop_ids)
        rewards = torch.tensor(self._rewards(micro, comps), dtype=torch.float32).view(len(micro), G)
        flat = [x for group in comps for x in group]
        batch = collate(completion_rows(prompts, flat))
        batch["advantages"] = group_advantages(rewards).flatten()
        batch["rewards"] = rewards.flatten()
        batch["completion_len"] = torch.tensor([len(x.token_ids) for x in flat], dtype=torch.float32)
        step, n, secs = self._step_tokens
        if step != self.current_step:
            n, secs = 0, 0.0
        n += sum(len(p) * G for p in prompts) + sum(len(x.token_ids) for x in flat)
        self._step_tokens = (self.current_step, n, secs + time.perf_counter() - t0)
        return batch

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        ids, labels = batch["input_ids"], batch["labels"]
        logps, keep = token_logps(model, ids, labels, c.temperature)
        ref = None
        if c.grpo_beta:
            with torch.no_grad(), self.reference(model) as ref_model:
                ref, _ = token_logps(ref_model, ids, labels, c.temperature)
        losses, kl = grpo_loss(logps, logps.detach(), ref, batch["advantages"], keep, c.grpo_beta, c.grpo_epsilon)
        r = batch["rewards"]
        return losses.sum(), {"loss": losses.sum().detach(), "reward": r.sum(), "reward_sq": (r * r).sum(),
                              "kl": kl.sum(), "completion_len": batch["completion_len"].sum()}

    def step_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        mean = stats.pop("reward", 0.0)
        sq = stats.pop("reward_sq", 0.0)
        out = {"loss": stats.pop("loss", 0.0), "reward_mean": mean, "reward_std": math.sqrt(max(0.0, sq - mean ** 2))}
        out.update(stats)
        step, n, secs = self._step_tokens
        if step == self.current_step and n:
            out["tokens"] = n   # prompt and completion tokens this process trained on
            out["rollout_s"] = secs  # of the step's time: sampling and scoring
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[Example]) -> dict:
        """Mean reward of one greedy completion per held-out prompt (and its mean length)."""
        comps = greedy_completions(self.lm, [e.ids for e in examples], max_new_tokens=self.cfg.max_new_tokens,
                                   stop_ids=self.stop_ids)
        records = [e.record or {} for e in examples]
        try:
            scores = safe_scores(self.reward, [prompt_of(r) for r in records], [c.text for c in comps], records)
        except RewardFailure as e:
            warnings.warn(f"held-out evaluation skipped: {e}", stacklevel=2)  # reported, not fatal
            return {"reward_failures": 1.0}
        return {"reward": sum(scores) / len(scores),
                "completion_len": sum(len(c.token_ids) for c in comps) / len(comps)}
