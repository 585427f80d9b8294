"""The alignment losses against their papers' equations, written out here in plain floats (math), not with the
functions under test: Bradley-Terry (reward model), KTO, ORPO, GRPO (+ its group advantages and KL estimator)."""
from __future__ import annotations

import math

import pytest
import torch

from llamaforge.train.grpo import group_advantages, grpo_loss
from llamaforge.train.preference import kto_loss, log1mexp, orpo_loss
from llamaforge.train.reward_model import bradley_terry_loss


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_loss_and_llama2_margin():
    rc, rr = torch.tensor([1.5, -0.2, 0.0]), torch.tensor([0.5, 0.3, 0.0])
    m = torch.tensor([0.0, 1.0, 2.0])
    got = bradley_terry_loss(rc, rr, m)
    # -log sigma(r_w - r_l - m): Ouyang et al. 2022 eq. 1, margin from Touvron et al. 2023 eq. 2
    want = [-math.log(sig(a - b - c)) for a, b, c in zip(rc.tolist(), rr.tolist(), m.tolist())]
    torch.testing.assert_close(got, torch.tensor(want))
    torch.testing.assert_close(bradley_terry_loss(rc, rr), torch.tensor([-math.log(sig(a - b))
                                                                         for a, b in zip(rc.tolist(), rr.tolist())]))
    a, b = rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)
    bradley_terry_loss(a, b).sum().backward()
    assert (a.grad < 0).all() and (b.grad > 0).all()   # descent raises the chosen reward, lowers the rejected


def _kto_ref(pol, ref, desirable, kl, beta, wd, wu):
    # Ethayarajh et al. 2024, eq. 8: L = lambda_y - v(x, y), v from r = log pi/ref and z0 = max(0, KL).
    z0 = max(0.0, kl)
    out = []
    for p, q, d in zip(pol, ref, desirable):
        r = p - q
        v = wd * sig(beta * (r - z0)) if d else wu * sig(beta * (z0 - r))
        out.append((wd if d else wu) - v)
    return out


@pytest.mark.parametrize("kl", [0.3, -0.4])   # a negative batch estimate is clamped to 0
def test_kto_loss_matches_the_paper(kl):
    pol = [-4.0, -6.5, -3.0, -9.0]
    ref = [-5.0, -6.0, -3.5, -7.0]
    des = [True, False, True, False]
    got, rewards = kto_loss(torch.tensor(pol), torch.tensor(ref), torch.tensor(des), torch.tensor(kl),
                            beta=0.5, desirable_weight=1.0, undesirable_weight=1.33)
    torch.testing.assert_close(got, torch.tensor(_kto_ref(pol, ref, des, kl, 0.5, 1.0, 1.33)))
    torch.testing.assert_close(rewards, 0.5 * (torch.tensor(pol) - torch.tensor(ref)))
    # The reference point carries no gradient; descent raises desirable and lowers undesirable log-probs.
    p = torch.tensor(pol, requires_grad=True)
    k = torch.tensor(kl, requires_grad=True)
    kto_loss(p, torch.tensor(ref), torch.tensor(des), k, beta=0.5)[0].sum().backward()
    assert k.grad is None or float(k.grad) == 0.0
    assert p.grad[0] < 0 and p.grad[2] < 0 and p.grad[1] > 0 and p.grad[3] > 0


def test_orpo_loss_matches_the_paper():
    chosen, rejected = [-0.5, -1.2, -2.0], [-1.5, -0.9, -2.0]
    lam = 0.25
    got, log_odds = orpo_loss(torch.tensor(chosen), torch.tensor(rejected), lam)
    want, want_lo = [], []
    for c, r in zip(chosen, rejected):
        pw, pl = math.exp(c), math.exp(r)             # P(y|x) = exp(mean token log-prob), eq. 3 normalisation
        odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)  # eq. 4
        l_or = -math.log(sig(math.log(odds_w / odds_l)))  # eq. 7
        want.append(-c + lam * l_or)                   # eq. 6 with L_SFT the chosen NLL
        want_lo.append(math.log(odds_w / odds_l))
    torch.testing.assert_close(got, torch.tensor(want))
    torch.testing.assert_close(log_odds, torch.tensor(want_lo))
    # Stable where P(y|x) -> 1 (log-prob -> 0): finite loss and gradient.
    c = torch.tensor([-1e-9], requires_grad=True)
    loss, _ = orpo_loss(c, torch.tensor([-3.0]), lam)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(c.grad).all()


def test_log1mexp_is_accurate_over_its_range():
    xs = [-1e-6, -1e-4, -0.1, -0.69, -0.7, -2.0, -30.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float64))
    want = torch.tensor([math.log(-math.expm1(x)) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # Log-probabilities within float32 rounding of 0 (P(y|x) == 1) are clamped: finite, not -inf.
    assert torch.isfinite(log1mexp(torch.tensor([0.0, -1e-9]))).all()


def test_group_advantages_are_relative_to_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 0.0]])
    got = group_advantages(r)
    for g in range(3):
        row = r[g].tolist()
        mean = sum(row) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / 3)  # unbiased, as torch.std / TRL
        torch.testing.assert_close(got[g], torch.tensor([(x - mean) / (std + 1e-4) for x in row]))
    assert (got[1] == 0).all()
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))


def test_grpo_loss_matches_eq3_with_clipping_and_kl():
    # Two completions, three token slots; the second has two tokens. Old log-probs differ from the current
    # ones so that ratios fall outside [1 - eps, 1 + eps] on both sides.
    logps = [[-1.0, -2.0, -0.5], [-0.3, -1.1, 0.0]]
    old = [[-1.5, -1.8, -0.5], [-0.2, -2.0, 0.0]]
    ref = [[-1.2, -2.2, -0.4], [-0.4, -1.0, 0.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    adv = [0.7, -1.3]
    beta, eps = 0.04, 0.2
    got, kl = grpo_loss(torch.tensor(logps), torch.tensor(old), torch.tensor(ref), torch.tensor(adv),
                        torch.tensor(mask, dtype=torch.bool), beta, eps)
    want, want_kl = [], []
    for i in range(2):
        terms, kls = [], []
        for t in range(3):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            k3 = math.exp(ref[i][t] - logps[i][t]) - (ref[i][t] - logps[i][t]) - 1   # eq. 4
            terms.append(min(ratio * adv[i], clipped * adv[i]) - beta * k3)
            kls.append(k3)
        want.append(-sum(terms) / len(terms))
        want_kl.append(sum(kls) / len(kls))
    torch.testing.assert_close(got, torch.tensor(want))
    torch.testing.assert_close(kl, torch.tensor(want_kl))
    # On-policy (old = current, as with one update per generation): the gradient is the advantage-weighted
    # log-likelihood gradient plus the KL pull; with beta 0 it is exactly -A / |o| per token.
    lp = torch.tensor(logps, requires_grad=True)
    loss, _ = grpo_loss(lp, lp.detach(), None, torch.tensor(adv), torch.tensor(mask, dtype=torch.bool), 0.0, eps)
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.7 / 3] * 3, [1.3 / 2, 1.3 / 2, 0.0]]))
