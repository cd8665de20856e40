"""hcx.stages.bond_loss: the Best-of-N distribution, quantile rewards, and BOND / J-BOND on a
toy categorical policy (6 outcomes, a logits tensor optimised with Adam, CPU, well under 5 s).

The toy problems compute expectations exactly (every outcome is a "sample", weighted by its
probability), so the optimisation is deterministic; one test also uses sampled batches.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hcx.stages.bond_loss import (best_of_n_probs, bond_backward_loss, bond_forward_loss,
                                  bond_log_weight, ema_update, jbond_loss, jbond_reward,
                                  jeffreys_loss, log_quantile_reward, quantile_estimate,
                                  reward_cdf)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(tensor: torch.Tensor, expected, tol: float = 1e-9) -> bool:
    return torch.allclose(tensor.double(), torch.as_tensor(expected, dtype=torch.float64),
                          rtol=0, atol=tol)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


# ---------------------------------------------------------------------------------------------
# The Best-of-N distribution
# ---------------------------------------------------------------------------------------------


def test_best_of_n_hand_computed():
    # rewards 0 < 1 < 2, CDF F = (0.5, 0.8, 1.0), F- = (0, 0.5, 0.8); N = 2: F^2 - F-^2
    probs, rewards = t(0.5, 0.3, 0.2), t(0.0, 1.0, 2.0)
    assert close(best_of_n_probs(probs, rewards, 2), [0.25, 0.64 - 0.25, 1.0 - 0.64])
    assert close(best_of_n_probs(probs, rewards, 1), probs)
    # order of outcomes does not matter
    assert close(best_of_n_probs(t(0.2, 0.5, 0.3), t(2.0, 0.0, 1.0), 2), [0.36, 0.25, 0.39])


def test_best_of_n_ties_split_in_proportion_to_the_reference():
    # outcomes 0 and 1 tie at reward 1 (mass 0.5), outcome 2 has reward 0 (mass 0.5). N = 2:
    # P(best level is 0) = 0.5^2 = 0.25; the tied level gets 0.75, split 0.2 : 0.3.
    probs, rewards = t(0.2, 0.3, 0.5), t(1.0, 1.0, 0.0)
    assert close(best_of_n_probs(probs, rewards, 2), [0.75 * 0.4, 0.75 * 0.6, 0.25])
    p_lt, p_le = reward_cdf(probs, rewards)
    assert close(p_lt, [0.5, 0.5, 0.0]) and close(p_le, [1.0, 1.0, 0.5])


@pytest.mark.parametrize("n", [2, 3])
def test_best_of_n_equals_exact_enumeration_with_random_tie_breaking(n):
    # Every ordered N-tuple of outcomes, the choice made uniformly among the samples of
    # maximal reward: the distribution Theorem 1's formula describes.
    probs = t(0.05, 0.25, 0.1, 0.3, 0.2, 0.1)
    rewards = t(0.3, 0.7, 0.7, 0.1, 0.3, 0.9)  # two tied pairs
    expected = torch.zeros(6, dtype=torch.float64)
    for draw in itertools.product(range(6), repeat=n):
        weight = math.prod(probs[i].item() for i in draw)
        top = max(rewards[i].item() for i in draw)
        winners = [i for i in draw if rewards[i].item() == top]
        for i in winners:
            expected[i] += weight / len(winners)
    assert close(best_of_n_probs(probs, rewards, n), expected, 1e-12)
    # Theorem 1's first-sample form, summed term by term, agrees too
    p_lt, p_le = reward_cdf(probs, rewards)
    series = probs * sum(p_lt ** (i - 1) * p_le ** (n - i) for i in range(1, n + 1))
    assert close(series, expected, 1e-12)
    assert close(torch.exp(bond_log_weight(p_le, p_lt, n=n)) * probs, expected, 1e-12)


# ---------------------------------------------------------------------------------------------
# Quantile rewards
# ---------------------------------------------------------------------------------------------


def test_quantile_estimates_by_hand():
    rewards = t(2.0, 0.0, 5.0)
    refs = t(1.0, 2.0, 3.0, 2.0,
             1.0, 1.0, 1.0, 1.0,
             5.0, 5.0, 5.0, 5.0).view(3, 4)
    # row 0: refs <= 2: {1, 2, 2} -> 3/4; < 2: {1} -> 1/4; mid: 1/4 + 2 * 1/8 = 2/4
    # row 1: nothing below -> 0; row 2: all tie -> 1, 0, 1/2
    assert close(quantile_estimate(rewards, refs), [0.75, 0.0, 1.0])
    assert close(quantile_estimate(rewards, refs, ties="lt"), [0.25, 0.0, 0.0])
    assert close(quantile_estimate(rewards, refs, ties="mid"), [0.5, 0.0, 0.5])
    # log-quantile: the zero estimate is floored at half a sample, 1/(2k) = 1/8
    assert close(log_quantile_reward(rewards, refs), [math.log(0.75), math.log(1 / 8), 0.0])
    assert close(log_quantile_reward(rewards, refs, min_quantile=0.01)[1], math.log(0.01))
    with pytest.raises(ValueError):
        quantile_estimate(rewards, refs, ties="up")
    with pytest.raises(ValueError):
        quantile_estimate(rewards, refs[:2])


def test_quantile_estimate_is_unbiased_for_the_reference_cdf():
    # 20000 reference draws of a categorical: the estimate approaches p_<= (standard error
    # below 0.004, tolerance 0.02 = 5 standard errors).
    g = torch.Generator().manual_seed(0)
    probs, rewards = t(0.1, 0.4, 0.2, 0.3), t(3.0, 1.0, 2.0, 1.0)
    draws = rewards[torch.multinomial(probs, 20000, replacement=True, generator=g)]
    _, p_le = reward_cdf(probs, rewards)
    estimate = quantile_estimate(rewards, draws.expand(4, -1))
    assert close(estimate, p_le, 0.02)


def test_bond_log_weight_without_ties_is_log_n_plus_the_quantile_term():
    p = t(0.5, 0.9)
    assert close(bond_log_weight(p, n=4), 3 * torch.log(p) + math.log(4))
    assert close(bond_log_weight(p, p, n=4), 3 * torch.log(p) + math.log(4))  # p_< = p_<=


# ---------------------------------------------------------------------------------------------
# Losses, by hand
# ---------------------------------------------------------------------------------------------


def test_backward_forward_and_jeffreys_by_hand():
    logp = t(-1.0, -2.0).requires_grad_()
    base, w = t(-1.5, -1.0), t(0.25, -0.5)
    losses, metrics = bond_backward_loss(logp, base, w)
    coef = [(-1.0 + 1.5) - 0.25, (-2.0 + 1.0) + 0.5]  # log pi - log base - w = 0.25, -0.5
    assert close(losses, [coef[0] * -1.0, coef[1] * -2.0])
    assert close(metrics["bond/kl_estimate"], (0.25 - 0.5) / 2, 1e-7)
    assert close(metrics["bond/kl_base"], (0.5 - 1.0) / 2, 1e-7)
    losses.sum().backward()
    assert close(logp.grad, coef)  # the coefficient is a constant of the estimate
    with_baseline, _ = bond_backward_loss(logp, base, w, baseline=0.25)
    assert close(with_baseline, [0.0, (-0.5 - 0.25) * -2.0])

    fwd, metrics = bond_forward_loss(t(-3.0, -1.0))
    assert close(fwd, [3.0, 1.0]) and close(metrics["bond/forward_nll"], 2.0)
    assert close(jeffreys_loss(t(1.0), t(3.0), beta=0.25), [0.75 * 1 + 0.25 * 3])
    with pytest.raises(ValueError):
        jeffreys_loss(t(1.0), t(3.0), beta=1.5)


def test_jbond_reward_and_loss_by_hand():
    anchors = t(1.0, 3.0, 2.0, 2.0, 0.0, 0.5).view(3, 2)
    # row 0: 0.5 < 1 and < 3 -> penalised; row 1: equal to both anchors -> not worse;
    # row 2: better than both -> 0
    r = jbond_reward(t(0.5, 2.0, 4.0), anchors)
    assert close(r, [-math.log(16), 0.0, 0.0])
    assert close(jbond_reward(t(0.5), anchors[:1], penalty=2.0), [-2.0])

    logp = t(-1.0, -2.0, -0.5).requires_grad_()
    anchor_logp = t(-1.2, -1.5, -0.5)
    best = t(-0.8, -3.0, -1.0).requires_grad_()
    losses, metrics = jbond_loss(logp, anchor_logp, r, best, beta=0.5, kl_coef=0.5)
    log_ratio = [0.2, -0.5, 0.0]
    back = [(0.5 * lr - ri) * lp for lr, ri, lp in zip(log_ratio, r.tolist(), [-1.0, -2.0, -0.5])]
    assert close(losses, [0.5 * b + 0.5 * -f for b, f in zip(back, [-0.8, -3.0, -1.0])])
    assert close(metrics["jbond/reward"], -math.log(16) / 3, 1e-7)
    assert close(metrics["jbond/kl_anchor"], -0.3 / 3, 1e-7)
    losses.sum().backward()
    assert close(best.grad, [-0.5, -0.5, -0.5])  # the forward term is plain NLL
    # the optional pull towards the reference enters the coefficient
    ref = t(-1.0, -1.0, -1.0)
    with_ref, metrics = jbond_loss(logp, anchor_logp, r, best, beta=0.0, kl_coef=1.0,
                                   ref_logps=ref, gamma=0.1)
    expected = [(lr + 0.1 * (lp - rf) - ri) * lp for lr, lp, rf, ri in
                zip(log_ratio, [-1.0, -2.0, -0.5], [-1.0] * 3, r.tolist())]
    assert close(with_ref, expected) and "jbond/kl_ref" in metrics
    with pytest.raises(ValueError, match="ref_logps"):
        jbond_loss(logp, anchor_logp, r, best, gamma=0.1)


def test_ema_update_tensors_and_parameter_dicts():
    anchor, policy = t(0.0, 10.0), t(1.0, 20.0)
    out = ema_update(anchor, policy, eta=0.1)
    assert out is anchor and close(anchor, [0.1, 11.0])
    a = {"w": torch.zeros(2, dtype=torch.bfloat16), "steps": torch.tensor(3)}
    p = {"w": torch.full((2,), 4.0, dtype=torch.bfloat16), "steps": torch.tensor(7)}
    ema_update(a, p, eta=0.25)
    assert a["w"].dtype == torch.bfloat16 and close(a["w"].double(), [1.0, 1.0])
    assert a["steps"].item() == 7  # integer buffers follow the policy
    assert close(ema_update(t(5.0), t(9.0), eta=0.0), [5.0])
    assert close(ema_update(t(5.0), t(9.0), eta=1.0), [9.0])
    with pytest.raises(ValueError):
        ema_update({"w": t(1.0)}, {"v": t(1.0)}, eta=0.5)


# ---------------------------------------------------------------------------------------------
# The toy categorical policy
# ---------------------------------------------------------------------------------------------

REF_LOGITS = torch.tensor([0.6, -0.2, 1.1, -1.0, 0.3, -0.4], dtype=torch.float64)
REF_LOGP = torch.log_softmax(REF_LOGITS, -1)
REF_P = REF_LOGP.exp()
DISTINCT = t(0.1, 0.5, 0.2, 0.9, 0.4, 0.7)
TIED = t(0.1, 0.5, 0.5, 0.9, 0.1, 0.7)


@pytest.mark.parametrize("rewards", [DISTINCT, TIED], ids=["distinct", "tied"])
def test_backward_kl_reaches_the_best_of_n_distribution(rewards):
    # Minimise KL(pi || pi_BoN) over the logits with exact expectations: the policy gradient
    # sum_y pi(y) * coefficient(y) * grad log pi(y) is the exact gradient, the objective is
    # strictly convex in pi with its minimum at pi_BoN, and at pi_BoN every coefficient is 0.
    # The slowest part is the lowest-reward outcome, whose target mass is 0.003 (its gradient
    # scales with pi(y)). After 500 Adam steps (lr 0.2) TV is below 1e-6 for both reward
    # sets; TV < 1e-4 leaves two orders of margin yet fails for any wrong target (the
    # reference itself is at TV > 0.3 from its Best-of-4).
    n = 4
    target = best_of_n_probs(REF_P, rewards, n)
    p_lt, p_le = reward_cdf(REF_P, rewards)
    w = bond_log_weight(p_le, p_lt, n=n)
    assert tv(REF_P, target) > 0.3
    theta = REF_LOGITS.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.2)
    for _ in range(500):
        logp = torch.log_softmax(theta, -1)
        losses, _ = bond_backward_loss(logp, REF_LOGP, w)
        opt.zero_grad()
        (logp.exp().detach() * losses).sum().backward()
        opt.step()
    pi = torch.softmax(theta, -1).detach()
    assert tv(pi, target) < 1e-4
    # and KL(pi || pi_BoN) = E_pi[log pi - log pi_ref - w] is ~0 there
    assert abs((pi * (torch.log(pi) - REF_LOGP - w)).sum().item()) < 1e-6


def test_sampled_backward_kl_reaches_the_best_of_n_distribution():
    # The same with 256 sampled outcomes per step (seeded) and a batch-mean baseline: the
    # estimate's variance vanishes at the optimum (every coefficient is 0 there), so
    # sampled training converges to pi_BoN too. 500 steps (lr 0.1) bring TV to about 1e-4
    # for this seed; the tolerance 1e-3 allows for a different random stream.
    n = 4
    target = best_of_n_probs(REF_P, DISTINCT, n)
    # a categorical has p_< < p_<= at every outcome, so the tie term of the weight is needed
    p_lt, p_le = reward_cdf(REF_P, DISTINCT)
    w = bond_log_weight(p_le, p_lt, n=n)
    g = torch.Generator().manual_seed(1)
    theta = REF_LOGITS.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.1)
    for _ in range(500):
        logp_all = torch.log_softmax(theta, -1)
        y = torch.multinomial(logp_all.exp().detach(), 256, replacement=True, generator=g)
        coefficient = logp_all[y].detach() - REF_LOGP[y] - w[y]
        losses, _ = bond_backward_loss(logp_all[y], REF_LOGP[y], w[y],
                                       baseline=coefficient.mean())
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    assert tv(torch.softmax(theta, -1).detach(), target) < 1e-3


def test_iterated_jbond_raises_reward_and_kl_monotonically():
    # J-BOND on the toy: policy and anchor start at the reference; each step minimises the
    # Jeffreys mixture (beta = 0.5) of the backward term (reward r_J, KL to the anchor) and
    # the forward term (NLL of the anchor's Best-of-2), in exact expectation:
    #   E[r_J(y)] = -log 16 * P_anchor(both anchor samples beat y) = -log 16 (1 - a_<=(y))^2
    # then the anchor logits move by EMA (eta = 0.05). Expected reward and KL(pi || pi_ref)
    # must rise step after step (tolerance 1e-9: float64 noise only), and the policy must end
    # well beyond Best-of-4 of the reference, which a fixed-target method with N = 2 cannot.
    theta = REF_LOGITS.clone().requires_grad_()
    anchor = REF_LOGITS.clone()
    opt = torch.optim.Adam([theta], lr=0.02)
    history = [(float((REF_P * DISTINCT).sum()), 0.0)]
    for _ in range(300):
        logp = torch.log_softmax(theta, -1)
        alpha = torch.softmax(anchor, -1)
        _, a_le = reward_cdf(alpha, DISTINCT)
        expected_r = -math.log(16.0) * (1.0 - a_le) ** 2
        best_of_2 = best_of_n_probs(alpha, DISTINCT, 2)
        pi = logp.exp().detach()
        # rows = all outcomes; the backward part is weighted by pi, the forward part by the
        # anchor's Best-of-2 distribution (beta = 0 / 1 pick each term out of jbond_loss)
        back, _ = jbond_loss(logp, torch.log(alpha), expected_r, logp, beta=0.0)
        fwd, _ = jbond_loss(logp, torch.log(alpha), expected_r, logp, beta=1.0)
        loss = 0.5 * (pi * back).sum() + 0.5 * (best_of_2 * fwd).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(anchor, theta.detach(), eta=0.05)
        pi = torch.softmax(theta, -1).detach()
        history.append((float((pi * DISTINCT).sum()), float((pi * (pi.log() - REF_LOGP)).sum())))
    rewards = [h[0] for h in history]
    kls = [h[1] for h in history]
    assert all(b >= a - 1e-9 for a, b in zip(rewards, rewards[1:]))
    assert all(b >= a - 1e-9 for a, b in zip(kls, kls[1:]))
    best_of_4 = float((best_of_n_probs(REF_P, DISTINCT, 4) * DISTINCT).sum())
    assert rewards[0] < 0.4 and best_of_4 < 0.75 < rewards[-1]
