"""KTO and ORPO: the DPO family beyond paired, reference-based DPO (which lives in strategies.py).

KTO learns from unpaired completions labelled desirable or not (prospect theory, with a KL reference point);
ORPO needs no reference model at all (an SFT loss plus an odds-ratio preference term). Both read the same files
as DPO: KTO also takes {"prompt", "completion", "label": bool} records and splits preference pairs in two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE, Example, collate
from .strategies import PolicyStrategy, sequence_logps


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", eq. 8), per example:

        r = log pi(y|x) - log ref(y|x),   z0 = KL(pi || ref) (a detached, clamped-at-0 batch estimate)
        v = lambda_D * sigmoid(beta * (r - z0))   if y is desirable
            lambda_U * sigmoid(beta * (z0 - r))   if y is undesirable
        loss = lambda_y - v

    Inputs: summed completion log-probabilities [N], desirable [N] bool, kl a scalar. Returns (losses [N],
    implicit rewards beta * r [N], detached).
    """
    r = policy_logps - ref_logps
    z0 = kl.detach().clamp(min=0)
    lam = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    v = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (r - z0)),
                    undesirable_weight * torch.sigmoid(beta * (z0 - r)))
    return lam - v, (beta * r).detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 (Maechler 2012): the log of 1 - P for P = exp(x).

    x is clamped to <= -1e-7 (float32 rounding of a log-probability of 0), so P(y|x) == 1 stays finite."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, lam: float = 0.1):
    """Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", eqs. 4-7), per pair, from length-normalised log-likelihoods log P(y|x) = mean token logprob:

        odds(y|x) = P(y|x) / (1 - P(y|x))
        L_OR  = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
        L_SFT = -log P(y_w|x)                       (the chosen reply's token-averaged NLL)
        loss  = L_SFT + lambda * L_OR

    Returns (losses [N], log odds ratios [N] detached).
    """
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps)
                                                            - log1mexp(rejected_mean_logps))
    losses = -chosen_mean_logps - lam * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


class KTOStrategy(PolicyStrategy):
    """KTO on full weights or LoRA; the reference is the frozen copy or the model with adapters disabled."""

    name = "kto"
    kind = "unpaired"

    def count(self, examples: list[Example]) -> int:
        return len(examples)

    def collate(self, examples: list[Example]) -> dict:
        # The KL rows pair each prompt with the previous example's completion (mismatched pairs, as the paper
        # and TRL estimate z0); with one example the pair would be matched, so batch_size >= 2 is required.
        n = len(examples)
        if any(e.prompt_len is None or e.label is None for e in examples):
            raise ValueError("KTO examples need prompt_len and label (data.load_dataset kind='unpaired')")
        rows = [(e.ids, e.mask) for e in examples]
        for i, e in enumerate(examples):
            o = examples[i - 1] if n > 1 else e
            rows.append((e.ids[:e.prompt_len] + o.ids[o.prompt_len:],
                         [False] * e.prompt_len + o.mask[o.prompt_len:]))
        batch = collate(rows)
        batch["desirable"] = torch.tensor([bool(e.label) for e in examples])
        return batch

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        n = batch["desirable"].shape[0]
        ids, labels = batch["input_ids"], batch["labels"]
        pol = sequence_logps(model, ids[:n], labels[:n])
        with torch.no_grad():
            pol_kl = sequence_logps(model, ids[n:], labels[n:])
            with self.reference(model) as ref_model:
                ref = sequence_logps(ref_model, ids, labels)
        kl = (pol_kl - ref[n:]).mean().clamp(min=0)
        c = self.cfg
        losses, rewards = kto_loss(pol, ref[:n], batch["desirable"], kl, c.kto_beta, c.kto_desirable_weight,
                                   c.kto_undesirable_weight)
        d = batch["desirable"]
        return losses.sum(), {"loss": losses.sum().detach(), "kl": kl * n,
                              "reward_desirable": rewards[d].sum(), "reward_undesirable": rewards[~d].sum(),
                              "n_desirable": d.float().sum()}

    def step_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        # Rewards are reported as means over their own class, not over the whole batch.
        frac_d = stats.pop("n_desirable", 0.0)
        if "reward_desirable" in stats:
            stats["reward_desirable"] = stats["reward_desirable"] / frac_d if frac_d else 0.0
            stats["reward_undesirable"] = stats["reward_undesirable"] / (1 - frac_d) if frac_d < 1 else 0.0
        return stats


class ORPOStrategy(PolicyStrategy):
    """ORPO on full weights or LoRA, without a reference model."""

    name = "orpo"
    kind = "preference"
    needs_reference = False

    def count(self, examples: list[Example]) -> int:
        return len(examples)

    def collate(self, examples: list[Example]) -> dict:
        from .data import collate_preference
        return collate_preference(examples)

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        n = int(batch["n_pairs"])
        labels = batch["labels"]
        mean_logps = sequence_logps(model, batch["input_ids"], labels) / (labels != IGNORE).sum(1).clamp(min=1)
        losses, log_odds = orpo_loss(mean_logps[:n], mean_logps[n:], self.cfg.orpo_lambda)
        return losses.sum(), {"loss": losses.sum().detach(), "nll": -mean_logps[:n].detach().sum(),
                              "log_odds_ratio": log_odds.sum(), "reward_accuracy": (log_odds > 0).float().sum()}
