r"""BOND: distilling Best-of-N sampling into the policy, as small pure functions.

Sessa et al. 2024, "BOND: Aligning LLMs with Best-of-N Distillation" (arXiv:2407.14622,
ICLR 2025). Best-of-N (BoN) draws N completions from a reference policy pi_ref and keeps the
one with the highest reward. BOND trains a policy pi whose *single* sample is distributed
like that BoN choice, by minimising a divergence between pi and the BoN distribution. This
module holds the math; sampling and reward scoring belong to the caller.

The pieces
----------
1. :func:`reward_cdf`, :func:`best_of_n_probs`: the exact BoN distribution of a categorical
   reference (the paper's Theorem 1), for tests and for toy problems.
2. :func:`quantile_estimate`, :func:`log_quantile_reward`: the Monte-Carlo quantile
   p_<=(y) = P_{y' ~ pi_ref}[r(y') <= r(y)] of a sample among reference samples, and its log,
   the reward that turns BOND into RL ("BOND as RL").
3. :func:`bond_log_weight`: log(pi_BoN(y) / pi_ref(y)) from the quantiles.
4. :func:`bond_backward_loss`: a policy-gradient surrogate whose gradient estimates
   grad KL(pi || pi_BoN) (mode-seeking); :func:`bond_forward_loss`: the negative
   log-likelihood of BoN samples, whose gradient estimates grad KL(pi_BoN || pi)
   (mass-covering); :func:`jeffreys_loss`: their mixture.
5. J-BOND (iterative BOND with N = 2 and a moving anchor): :func:`jbond_reward`,
   :func:`jbond_loss` and the anchor update :func:`ema_update`.

Shapes: per-sequence quantities are ``[B]`` (summed completion log-probs, as in
:mod:`hcx.stages.losses`); reference/anchor samples for a row are ``[B, k]``. Losses return
``(losses [B], metrics)`` with detached 0-dim float metrics; only the policy's log-probs get
a gradient. Everything runs in at least float32.

About the paper text
--------------------
The full paper text could not be retrieved when this module was written, so references name
the paper's parts ("Theorem 1", "BOND as RL", "the Jeffreys divergence", "J-BOND") rather
than equation numbers; the formulas are derived here in full so they can be checked on
their own. Theorem 1 is verified numerically (exact enumeration of N-tuples in the tests).
Two details are hcx's conventions, each a keyword argument so that it can be set to the
paper's value: :func:`jeffreys_loss`'s ``beta`` weights the **forward** KL (beta = 0:
backward only; beta = 1: forward only; 0.5 is symmetric either way), and
:func:`jbond_reward`'s ``penalty`` (default log 16) is the reward given to a policy sample
that is worse than both anchor samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, TypeVar

import torch
from torch import Tensor

from hcx.stages.loss_helpers import constant, put_mean, upcast

LossOutput = tuple[Tensor, dict[str, Tensor]]
Params = TypeVar("Params", Tensor, Mapping[str, Tensor])


# ---------------------------------------------------------------------------------------------
# 1. The Best-of-N distribution of a categorical reference
# ---------------------------------------------------------------------------------------------


def reward_cdf(probs: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    r"""For each outcome y of a categorical reference, (p_<(y), p_<=(y)):

        p_<(y)  = sum_{y': r(y') <  r(y)} pi_ref(y')
        p_<=(y) = sum_{y': r(y') <= r(y)} pi_ref(y')

    ``probs`` and ``rewards``: ``[..., K]`` (the last dim enumerates outcomes).
    """
    probs, rewards = upcast(probs.detach()), upcast(rewards.detach())
    if probs.shape != rewards.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and rewards {tuple(rewards.shape)} differ")
    # below[..., i, j] = r_j < r_i
    below = rewards.unsqueeze(-1) > rewards.unsqueeze(-2)
    at_or_below = rewards.unsqueeze(-1) >= rewards.unsqueeze(-2)
    p = probs.unsqueeze(-2)
    return (p * below).sum(-1), (p * at_or_below).sum(-1)


def best_of_n_probs(probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    r"""The distribution of the Best-of-N choice among N i.i.d. samples of ``probs``.

    Sessa et al. 2024, Theorem 1: with ties broken by taking the *first* sample
    of maximal reward,

        pi_BoN(y) = pi_ref(y) * sum_{i=1}^{N} p_<(y)^{i-1} * p_<=(y)^{N-i}

    (sample i is y, the i-1 before it are strictly worse, the N-i after it are not better;
    the paper writes it as pi_ref * p_<=^{N-1} * sum_i (p_< / p_<=)^{i-1}). The sum is
    (p_<=^N - p_<^N) / (p_<= - p_<), so every outcome y at one reward level gets

        pi_BoN(y) = pi_ref(y) / q * (p_<=^N - p_<^N),    q = p_<=(y) - p_<(y)

    i.e. the probability that the best of N rewards equals that level,
    F(r)^N - F(r-)^N with F the reward CDF, split among the tied outcomes **in proportion to
    their reference probability** (not equally). Breaking ties uniformly at random among the
    tied samples gives the same distribution, since the samples are exchangeable (checked by
    exact enumeration in the tests). For distinct rewards q = pi_ref(y) and it is simply
    F(y)^N - F(y-)^N. N = 1 returns ``probs``.

    ``probs``, ``rewards``: ``[..., K]``; returns ``[..., K]``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    probs_f = upcast(probs.detach())
    p_lt, p_le = reward_cdf(probs_f, rewards)
    level = p_le - p_lt
    share = torch.where(level > 0, probs_f / level.clamp(min=torch.finfo(level.dtype).tiny),
                        torch.zeros_like(probs_f))
    return share * (p_le ** n - p_lt ** n)


# ---------------------------------------------------------------------------------------------
# 2. Quantile rewards
# ---------------------------------------------------------------------------------------------

Ties = Literal["le", "lt", "mid"]


def quantile_estimate(rewards: Tensor, ref_rewards: Tensor, *, ties: Ties = "le") -> Tensor:
    r"""The empirical quantile of each sample's reward among k reference samples.

    Sessa et al. 2024, Monte-Carlo quantile estimation: with y'_1..y'_k drawn
    from the reference for the same prompt,

        p^_<=(y) = (1/k) * sum_j 1[r(y'_j) <= r(y)]

    an unbiased estimate of p_<=(y). ``ties`` says how a reference reward equal to r(y)
    counts: ``"le"`` (default, the paper's p_<=) as 1, ``"lt"`` as 0 (estimates p_<),
    ``"mid"`` as 1/2 (the mid-rank; estimates (p_< + p_<=) / 2).

    ``rewards``: ``[B]``; ``ref_rewards``: ``[B, k]``. Returns ``[B]`` in [0, 1], detached.
    """
    rewards, ref_rewards = upcast(rewards.detach()), upcast(ref_rewards.detach())
    if ref_rewards.dim() != 2 or ref_rewards.shape[0] != rewards.shape[0]:
        raise ValueError(f"ref_rewards must be [B, k] with B = {rewards.shape[0]}, got "
                         f"{tuple(ref_rewards.shape)}")
    if ref_rewards.shape[1] == 0:
        raise ValueError("quantile_estimate needs at least one reference sample per row")
    r = rewards.unsqueeze(1)
    below = (ref_rewards < r).to(rewards.dtype)
    equal = (ref_rewards == r).to(rewards.dtype)
    weight = {"le": 1.0, "lt": 0.0, "mid": 0.5}
    if ties not in weight:
        raise ValueError(f"ties must be 'le', 'lt' or 'mid', not {ties!r}")
    return (below + weight[ties] * equal).mean(dim=1)


def log_quantile_reward(rewards: Tensor, ref_rewards: Tensor, *, ties: Ties = "le",
                        min_quantile: float | None = None) -> Tensor:
    r"""log p^_<=(y): the BOND reward ("BOND as RL": the backward-KL objective is
    RL with reward log p_<=(y), up to constants; see :func:`bond_log_weight`).

    A sample worse than every reference sample has estimate 0 and log 0 = -inf, so the
    estimate is floored at ``min_quantile`` first; the default 1/(2k) ("half a sample")
    keeps it below every non-zero estimate 1/k. Returns ``[B]``, detached.
    """
    k = ref_rewards.shape[-1]
    floor = 1.0 / (2 * k) if min_quantile is None else min_quantile
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"min_quantile must be in (0, 1], not {floor}")
    return torch.log(quantile_estimate(rewards, ref_rewards, ties=ties).clamp(min=floor))


def bond_log_weight(p_le: Tensor, p_lt: Tensor | None = None, *, n: int) -> Tensor:
    r"""log(pi_BoN(y) / pi_ref(y)) from Theorem 1:

        (N-1) * log p_<=(y) + log sum_{i=1}^{N} (p_<(y) / p_<=(y))^{i-1}

    ``p_le``: ``[B]`` (exact, or the floored estimate exp(:func:`log_quantile_reward`)).
    ``p_lt=None`` takes p_< = p_<= in the sum (a constant log N): right when every single
    outcome has negligible mass, as for LLM completions scored by a continuous reward model,
    where only the first term matters for the gradient. For a categorical with a few
    outcomes, p_< < p_<= at every outcome (its own mass), so pass ``p_lt`` there.
    """
    p_le = upcast(p_le.detach())
    tiny = torch.finfo(p_le.dtype).tiny
    out = (n - 1) * torch.log(p_le.clamp(min=tiny))
    if p_lt is None:
        return out + math.log(n)
    ratio = upcast(p_lt.detach()) / p_le.clamp(min=tiny)
    powers = ratio.unsqueeze(-1) ** torch.arange(n, dtype=p_le.dtype, device=p_le.device)
    return out + torch.log(powers.sum(-1))


# ---------------------------------------------------------------------------------------------
# 3. The BOND objective: backward KL, forward KL, Jeffreys mixture
# ---------------------------------------------------------------------------------------------


def bond_backward_loss(policy_logps: Tensor, base_logps: Tensor, log_weights: Tensor, *,
                       baseline: Tensor | float | None = None) -> LossOutput:
    r"""Policy-gradient surrogate for the backward KL(pi || pi_target), pi_target ∝ pi_base *
    exp(w).

    With the target pi_BoN = pi_ref * exp(w), w = :func:`bond_log_weight`,

        KL(pi || pi_BoN) = E_{y~pi}[ log pi(y) - log pi_ref(y) - w(y) ]

    and, since E_pi[grad log pi] = 0, its gradient is the policy gradient

        grad KL = E_{y~pi}[ (log pi(y) - log pi_ref(y) - w(y)) * grad log pi(y) ]

    i.e. RL with reward w(y) = (N-1) log p_<=(y) + const and a KL(pi || pi_ref) penalty of
    weight 1 (the paper's "BOND as RL"). Per sample y_i ~ pi (``policy_logps``, with
    gradient; ``base_logps`` = log pi_ref(y_i); ``log_weights`` = w(y_i)),

        losses_i = (log pi(y_i) - log pi_base(y_i) - w_i - b) * log pi(y_i)   [first factor
                                                                              detached]

    so ``losses.mean()`` has the gradient of the estimate. The value of ``losses`` is not
    the divergence; the metric ``bond/kl_estimate`` is (its batch estimate
    mean(log pi - log pi_base - w)). ``baseline`` b (a float or ``[B]``, detached) reduces the
    variance without biasing the gradient; ``None`` means b = 0. For J-BOND pass the anchor
    as the base and the J-BOND reward as w (:func:`jbond_loss` does this).

    Metrics: ``bond/kl_estimate``, ``bond/log_weight`` (mean w), ``bond/kl_base``
    (mean log pi - log pi_base: a k1 estimate of KL(pi || pi_base)).
    """
    policy_logps = upcast(policy_logps)
    log_ratio = policy_logps.detach() - constant(base_logps)
    w = constant(log_weights)
    coefficient = log_ratio - w
    if baseline is not None:
        coefficient = coefficient - torch.as_tensor(baseline, dtype=coefficient.dtype,
                                                    device=coefficient.device).detach()
    losses = coefficient * policy_logps
    metrics: dict[str, Tensor] = {}
    put_mean(metrics, "bond/kl_estimate", log_ratio - w)
    put_mean(metrics, "bond/log_weight", w)
    put_mean(metrics, "bond/kl_base", log_ratio)
    return losses, metrics


def bond_forward_loss(policy_logps_of_target_samples: Tensor) -> LossOutput:
    r"""Forward KL(pi_BoN || pi) = E_{y~pi_BoN}[log pi_BoN(y)] - E_{y~pi_BoN}[log pi(y)]: only
    the cross-entropy depends on pi, so its gradient is estimated by the negative
    log-likelihood of BoN samples (Sessa et al. 2024: draw N reference samples,
    keep the best, and do supervised fine-tuning on it):

        losses_i = -log pi(y_i),   y_i ~ pi_BoN

    ``policy_logps_of_target_samples``: ``[B]``, the policy's summed log-probs of the BoN
    samples. Metrics: ``bond/forward_nll``.
    """
    logps = upcast(policy_logps_of_target_samples)
    losses = -logps
    metrics: dict[str, Tensor] = {}
    put_mean(metrics, "bond/forward_nll", losses)
    return losses, metrics


def jeffreys_loss(backward_losses: Tensor, forward_losses: Tensor, *,
                  beta: float = 0.5) -> Tensor:
    r"""The Jeffreys mixture of the two BOND terms (Sessa et al. 2024, the Jeffreys divergence):

        J_beta = (1 - beta) * KL(pi || pi_BoN) + beta * KL(pi_BoN || pi)

    applied row-wise to the surrogate losses (row i: one policy sample and one BoN sample of
    the same prompt). ``beta`` weights the forward (mass-covering) term: 0 is pure backward
    KL (mode-seeking), 1 pure forward KL (see the module docstring on this convention).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], not {beta}")
    return (1.0 - beta) * backward_losses + beta * forward_losses


# ---------------------------------------------------------------------------------------------
# 4. J-BOND: iterative BOND with N = 2 and an EMA anchor
# ---------------------------------------------------------------------------------------------


def jbond_reward(rewards: Tensor, anchor_rewards: Tensor, *,
                 penalty: float = math.log(16.0)) -> Tensor:
    r"""The J-BOND reward of a policy sample y given two anchor samples y'_1, y'_2 of the
    same prompt (Sessa et al. 2024, J-BOND):

        r_J(y) = -penalty  if r(y) < min(r(y'_1), r(y'_2))   (worse than both)
                 0         otherwise

    With two anchor samples the quantile estimate p^_<=(y) is 0, 1/2 or 1; its log is -inf,
    -log 2 or 0. J-BOND keeps only the informative, bounded part: a fixed penalty when the
    sample loses to both (p^_<= = 0), nothing otherwise; a tie with an anchor reward counts
    as not worse (the "le" convention of :func:`quantile_estimate`).

    ``rewards``: ``[B]``; ``anchor_rewards``: ``[B, 2]`` (any k >= 1 works: worse than all).
    Returns ``[B]``, detached.
    """
    q = quantile_estimate(rewards, anchor_rewards, ties="le")
    return torch.where(q > 0, torch.zeros_like(q), torch.full_like(q, -penalty))


def jbond_loss(policy_logps: Tensor, anchor_logps: Tensor, rewards: Tensor,
               best_anchor_policy_logps: Tensor, *, beta: float = 0.5, kl_coef: float = 1.0,
               ref_logps: Tensor | None = None, gamma: float = 0.0,
               baseline: Tensor | float | None = None) -> LossOutput:
    r"""One J-BOND step's loss (Sessa et al. 2024, J-BOND), row i = one prompt:

    * ``policy_logps``: log pi_t(y_i), y_i ~ pi_t (the current policy; with gradient);
    * ``anchor_logps``: log pi_anchor(y_i), the anchor's log-prob of that same sample;
    * ``rewards``: the J-BOND reward of y_i (:func:`jbond_reward` from its reward and those
      of two anchor samples y'_i1, y'_i2);
    * ``best_anchor_policy_logps``: log pi_t(y'_best), the better of the two anchor samples
      (the anchor's Best-of-2 sample), for the forward term.

    Backward term: :func:`bond_backward_loss` towards pi_anchor * exp(r_J / kl_coef), i.e.
    RL with reward r_J and a KL(pi_t || pi_anchor) penalty of weight ``kl_coef`` (1 =
    1/(N-1) for N = 2, the BOND derivation), plus ``gamma`` * KL(pi_t || pi_ref) when
    ``ref_logps`` is given (an optional extra pull towards the initial reference):

        losses_back,i = (kl_coef * (log pi_t - log pi_anchor)(y_i)
                         + gamma * (log pi_t - log pi_ref)(y_i) - r_J(y_i) - b) * log pi_t(y_i)

    Forward term: -log pi_t(y'_best). Combined with :func:`jeffreys_loss` (``beta`` weights
    the forward term). After each optimiser step, move the anchor with :func:`ema_update`.

    Metrics: ``jbond/reward`` (mean r_J), ``jbond/kl_anchor`` and (with ``ref_logps``)
    ``jbond/kl_ref`` (k1 estimates), ``bond/forward_nll``.
    """
    if kl_coef <= 0:
        raise ValueError(f"kl_coef must be positive, not {kl_coef}")
    policy_logps = upcast(policy_logps)
    r = constant(rewards)
    # fold the optional reference penalty into the weight: it is a constant of the sample
    w = r
    kl_ref = None
    if ref_logps is not None:
        kl_ref = policy_logps.detach() - constant(ref_logps)
        w = w - gamma * kl_ref
    elif gamma != 0.0:
        raise ValueError("gamma != 0 needs ref_logps")
    scaled_baseline = None if baseline is None else torch.as_tensor(baseline) / kl_coef
    back, _ = bond_backward_loss(policy_logps, anchor_logps, w / kl_coef,
                                            baseline=scaled_baseline)
    forward, forward_metrics = bond_forward_loss(best_anchor_policy_logps)
    losses = jeffreys_loss(kl_coef * back, forward, beta=beta)

    metrics: dict[str, Tensor] = {}
    put_mean(metrics, "jbond/reward", r)
    put_mean(metrics, "jbond/kl_anchor", policy_logps.detach() - constant(anchor_logps))
    if kl_ref is not None:
        put_mean(metrics, "jbond/kl_ref", kl_ref)
    metrics.update(forward_metrics)
    return losses, metrics


@torch.no_grad()
def ema_update(anchor: Params, policy: Params, *, eta: float) -> Params:
    r"""Move the anchor towards the policy: anchor <- (1 - eta) * anchor + eta * policy
    (J-BOND's exponential-moving-average anchor, Sessa et al. 2024), in place.

    ``anchor`` / ``policy``: two tensors, or two mappings of parameter name -> tensor (e.g.
    ``model.state_dict()`` or ``dict(model.named_parameters())``) with the same keys and
    shapes. Floating-point entries are updated (in their own dtype, computed in float32 or
    wider); integer buffers (step counters) are copied from the policy. Returns ``anchor``.
    eta = 0 keeps the anchor, eta = 1 copies the policy.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], not {eta}")

    def step(a: Tensor, p: Tensor, name: str) -> None:
        if a.shape != p.shape:
            raise ValueError(f"anchor and policy differ in shape at {name}: "
                             f"{tuple(a.shape)} vs {tuple(p.shape)}")
        if not a.is_floating_point():
            a.copy_(p)
            return
        mixed = upcast(a) * (1.0 - eta) + upcast(p.to(a.device)) * eta
        a.copy_(mixed.to(a.dtype))

    if isinstance(anchor, Tensor):
        if not isinstance(policy, Tensor):
            raise TypeError("anchor is a tensor, policy is not")
        step(anchor, policy, "tensor")
        return anchor
    if set(anchor) != set(policy):
        missing = sorted(set(anchor) ^ set(policy))
        raise ValueError(f"anchor and policy parameters differ: {missing[:5]}")
    for name, a in anchor.items():
        step(a, policy[name], name)
    return anchor
