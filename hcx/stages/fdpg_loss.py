r"""f-DPG: aligning a policy with a target distribution by minimising an f-divergence.

Go et al. 2023, "Aligning Language Models with Preferences through f-divergence Minimization"
(arXiv:2302.08215). This module holds the core as small pure functions plus two pieces of
running state (the partition-function estimate and the baseline), each with a
``state_dict`` so that it can go into checkpoints.

The target
----------
Alignment is posed as approximating a *target distribution* p over sequences x, given by an
unnormalised energy-based model P(x) >= 0 with p(x) = P(x) / Z, Z = sum_x P(x). Two forms:

* GDC pointwise constraint (Khalifa et al. 2021, "A Distributional Approach to Controlled
  Text Generation"): P(x) = a(x) * b(x) with a the base model and b(x) in {0, 1} a binary
  constraint, so p = a conditioned on b(x) = 1. Then log P = log a + log b, and log b = -inf
  where the constraint fails: those sequences have p(x) = 0.
* reward with a KL penalty (RLHF's implicit target, Korbak et al. 2022): P(x) =
  a(x) * exp(r(x) / beta), i.e. log P = log a + r / beta. This p is the optimum of
  E_pi[r] - beta * KL(pi || a).

:func:`target_logp` builds log P for both. Everything else in the module takes log P as
given (``target_logps``, -inf allowed) and never needs to know which form it came from.

The objective and its gradient
------------------------------
With a convex f, f(1) = 0, the f-divergence of the policy pi from p is

    D_f(pi || p) = E_{x~p}[ f(pi(x) / p(x)) ]

(plus pi(x) * f'(inf) summed over the x with p(x) = 0, the limit of the same expression;
f'(inf) = lim_{t->inf} f(t)/t). Its gradient, using p * f'(pi/p) * grad(pi)/p = pi * f' *
grad log pi, is a policy gradient with "pseudo-reward" f'(pi/p):

    grad D_f(pi || p) = E_{x~pi}[ f'(pi(x)/p(x)) grad log pi(x) ]
                      = E_{x~q}[ (pi(x)/q(x)) (f'(pi(x)/p(x)) - B) grad log pi(x) ]

The samples come from a *proposal* q, an older (lagged, frozen) copy of the policy, hence the
importance weight w = pi/q; the baseline B does not change the expectation because
E_pi[grad log pi] = 0, and only reduces its variance (see :class:`MovingAverageBaseline`).
Z is unknown and replaced by an importance-sampling estimate (:class:`PartitionEstimate`).
:func:`fdpg_loss` returns a surrogate loss whose gradient is exactly this estimate.

The four divergences of the paper (t = pi/p)
--------------------------------------------

=============  ===================================  ==========================  ==========
name           f(t)                                 f'(t)                       f'(inf)
=============  ===================================  ==========================  ==========
forward_kl     -log t         (KL(p || pi), DPG)    -1/t                        0
reverse_kl     t log t        (KL(pi || p), RLHF)   log t + 1                   +inf
js             (t log t - (t+1) log((t+1)/2)) / 2   log(2t / (t+1)) / 2         log(2) / 2
tv             |t - 1| / 2                          sign(t - 1) / 2             1/2
=============  ===================================  ==========================  ==========

All are convex with f(1) = 0. "js" is the Jensen-Shannon divergence
(KL(pi||m) + KL(p||m)) / 2 with m = (pi + p)/2 (natural log, so it is at most log 2); "tv"
is the total variation distance sum_x |pi(x) - p(x)| / 2 (at most 1).

On the support of p the forward KL pushes pi to cover p (mass-covering), the reverse KL makes
pi avoid what p lacks (mode-seeking: it is +inf as soon as pi gives any mass to an x with
p(x) = 0, so with GDC targets it is only finite for a policy with exactly the support of p);
JS and TV are bounded and sit in between.

Numerics
--------
Inputs are per-sequence log-probabilities (tensors of shape [N]), whose differences easily
reach hundreds of nats, so everything is computed from log t, never from t: each
:class:`Divergence` takes ``log_t``. Two clamps keep exp() finite (float32 overflows at
exp(88.7)); both only change samples whose ratio is already extreme, and both bias the
estimate there, exactly like clipped importance weights in PPO:

* ``max_log_ratio`` (default 20): log t is clamped into [-20, 20] before f or f' is
  evaluated. This is what makes samples with p(x) = 0 (log P = -inf, t = +inf) finite:
  they get f'(e^20), i.e. 0 for forward KL (its exact limit, up to -e^-20), log(2)/2 for JS
  and 1/2 for TV (their exact limits, up to 1e-9) and 21 for reverse KL, whose exact value
  f'(inf) = +inf would be useless as a gradient weight: 21 is a large, constant penalty
  that drives pi(x) towards 0. On the other side, forward KL's f'(t) = -1/t is capped at
  -e^20 (DPG's weight p/pi capped).
* ``max_log_weight`` (default 20): the log importance weights log(pi/q) and log(p/q) are
  clamped above at 20 before exp.

Arithmetic runs in at least float32 (float64 stays float64). Everything that is not the
policy's log-prob is detached: only ``policy_logps`` receives a gradient.

Data parallelism
----------------
The loss is per-sample; the estimates of Z and the baseline should be the same on every
rank: pass values all-gathered from all ranks to :meth:`PartitionEstimate.update` and
:meth:`MovingAverageBaseline.update` (or all-reduce the means first), and compare
divergence estimates from the gathered batch in :func:`should_update_proposal`, so all ranks
take the same decision.

A training step
---------------
::

    x = sample(proposal, n)                         # the lagged policy q samples
    logq = proposal.logp(x); logpi = policy.logp(x)  # with grad for the policy
    logP = target_logp(base.logp(x), constraint=b(x))
    log_z = partition.update(logP, logq)
    losses, metrics = fdpg_loss(logpi, logq, logP, log_z, divergence="js",
                                baseline=baseline.value)
    losses.mean().backward(); optimizer.step()
    baseline.update(metrics["fdpg/weighted_pseudo_reward"])
    if should_update_proposal(divergence_estimate(logpi, logq, logP, log_z, "js"),
                              divergence_estimate(logq, logq, logP, log_z, "js")):
        proposal.load_state_dict(policy.state_dict())

(The paper checks the divergences every few steps on fresh samples; any batch from q works
since both estimates are importance-sampled from q.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hcx.stages.loss_helpers import constant, put_mean, upcast

LossOutput = tuple[Tensor, dict[str, Tensor]]

DEFAULT_MAX_LOG_RATIO = 20.0
DEFAULT_MAX_LOG_WEIGHT = 20.0
_LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """A float or 0-dim tensor as a detached 0-dim tensor of ``like``'s dtype and device."""
    if isinstance(value, Tensor):
        return value.detach().to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"inputs must have the same shape, got {shapes}")


# ---------------------------------------------------------------------------------------------
# The divergences
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Divergence:
    """One f-divergence D_f(pi || p) = E_p[f(pi/p)], every function taking ``log_t`` = log t.

    * ``f(log_t)``: the generator f(t), convex, f(1) = 0.
    * ``f_prime(log_t)``: its derivative f'(t), the pseudo-reward of f-DPG.
    * ``f_over_t(log_t)``: f(t) / t, used where t > 1 to weight by pi instead of p
      (p * f(pi/p) = pi * f(t)/t), which stays finite when p -> 0.
    * ``f_at_zero``: f(0) = lim_{t->0} f(t), the value on outcomes with pi = 0 < p.
    * ``f_prime_at_infinity``: lim_{t->inf} f(t)/t = lim f'(t), the weight of pi(x) on
      outcomes with p(x) = 0.

    The functions are exact (no clamping) for finite ``log_t``; callers clamp.
    """

    name: str
    f: Callable[[Tensor], Tensor]
    f_prime: Callable[[Tensor], Tensor]
    f_over_t: Callable[[Tensor], Tensor]
    f_at_zero: float
    f_prime_at_infinity: float


def _js_f(u: Tensor) -> Tensor:
    # (t log t - (t+1) log((t+1)/2)) / 2 with log((t+1)/2) = softplus(u) - log 2
    t = torch.exp(u)
    return 0.5 * (t * u - (t + 1.0) * (F.softplus(u) - _LOG2))


def _js_f_over_t(u: Tensor) -> Tensor:
    # f(t)/t = (log t - (1 + 1/t) log((t+1)/2)) / 2; finite as t -> inf (-> log(2)/2)
    return 0.5 * (u - (1.0 + torch.exp(-u)) * (F.softplus(u) - _LOG2))


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(
        name="forward_kl",
        f=lambda u: -u,
        f_prime=lambda u: -torch.exp(-u),
        f_over_t=lambda u: -u * torch.exp(-u),
        f_at_zero=math.inf,
        f_prime_at_infinity=0.0,
    ),
    "reverse_kl": Divergence(
        name="reverse_kl",
        f=lambda u: u * torch.exp(u),
        f_prime=lambda u: u + 1.0,
        f_over_t=lambda u: u,
        f_at_zero=0.0,
        f_prime_at_infinity=math.inf,
    ),
    "js": Divergence(
        name="js",
        f=_js_f,
        # log(2t/(t+1)) / 2 = (log 2 - log(1 + 1/t)) / 2: stable for every u
        f_prime=lambda u: 0.5 * (_LOG2 - F.softplus(-u)),
        f_over_t=_js_f_over_t,
        f_at_zero=0.5 * _LOG2,
        f_prime_at_infinity=0.5 * _LOG2,
    ),
    "tv": Divergence(
        name="tv",
        f=lambda u: 0.5 * torch.abs(torch.expm1(u)),
        # the subgradient 0 at t = 1
        f_prime=lambda u: 0.5 * torch.sign(u),
        f_over_t=lambda u: 0.5 * torch.abs(torch.expm1(-u)),
        f_at_zero=0.5,
        f_prime_at_infinity=0.5,
    ),
}


def get_divergence(divergence: str | Divergence) -> Divergence:
    """A :class:`Divergence` by name (or itself); unknown names raise ValueError."""
    if isinstance(divergence, Divergence):
        return divergence
    try:
        return DIVERGENCES[divergence]
    except KeyError:
        raise ValueError(f"unknown divergence {divergence!r}; known: "
                         f"{', '.join(sorted(DIVERGENCES))}") from None


# ---------------------------------------------------------------------------------------------
# The target
# ---------------------------------------------------------------------------------------------

def target_logp(base_logps: Tensor, *, constraint: Tensor | None = None,
                reward: Tensor | None = None, beta: float | None = None) -> Tensor:
    r"""log P(x) of the target EBM, from the base model's log-probs, detached.

    * ``constraint`` b(x) (GDC pointwise constraint, bool or numbers in {0, 1}; any b >= 0
      is accepted, e.g. a soft constraint): adds log b, which is -inf where b = 0.
    * ``reward`` r(x) with temperature ``beta`` > 0 (KL-penalised reward): adds r / beta.

    Both may be given: P = a * b * exp(r / beta). With neither, P = a.
    """
    logp = constant(base_logps)
    if constraint is not None:
        b = constraint.detach().to(device=logp.device, dtype=logp.dtype)
        if b.shape != logp.shape:
            raise ValueError(f"constraint has shape {tuple(b.shape)}, log-probs have "
                             f"{tuple(logp.shape)}")
        if bool((b < 0).any()):
            raise ValueError("constraint values must be >= 0")
        logp = logp + torch.log(b)
    if (reward is None) != (beta is None):
        raise ValueError("pass both reward and beta, or neither")
    if reward is not None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, not {beta}")
        r = reward.detach().to(device=logp.device, dtype=logp.dtype)
        if r.shape != logp.shape:
            raise ValueError(f"reward has shape {tuple(r.shape)}, log-probs have "
                             f"{tuple(logp.shape)}")
        logp = logp + r / beta
    return logp


# ---------------------------------------------------------------------------------------------
# The partition function Z
# ---------------------------------------------------------------------------------------------

def log_partition_estimate(target_logps: Tensor, proposal_logps: Tensor) -> Tensor:
    r"""Importance-sampling estimate of log Z from samples x_i ~ q:

        Z_hat = (1/N) sum_i P(x_i) / q(x_i),  log Z_hat = logsumexp(log P - log q) - log N

    Z_hat is unbiased for Z (log Z_hat is not, slightly, by Jensen). A detached 0-dim tensor;
    -inf if every sample has P = 0. Under data parallelism pass the gathered values.
    """
    target_logps, proposal_logps = constant(target_logps), constant(proposal_logps)
    _check_same_shape(target_logps=target_logps, proposal_logps=proposal_logps)
    n = target_logps.numel()
    if n == 0:
        raise ValueError("no samples to estimate Z from")
    return torch.logsumexp((target_logps - proposal_logps).flatten(), dim=0) - math.log(n)


class PartitionEstimate:
    """Running importance-sampling estimate of log Z over every sample seen so far.

    Keeps log sum_i P(x_i)/q(x_i) (``log_sum``) and the number of samples (``count``), so
    ``log_z`` = log_sum - log count is the cumulative mean of P/q in log space. Each term is
    unbiased whatever proposal drew it, so the estimate stays valid (and keeps improving) as
    the proposal is refreshed during training. The state is two plain floats (``log_sum`` is
    -inf until a sample with P > 0 is seen; Python's json writes it as -Infinity and reads it
    back). While log Z is -inf, p = P/Z is meaningless: skip the policy update until then.

    Update it in each training step *before* the loss, with the batch's log P and log q
    (gathered from every rank under data parallelism so all ranks hold the same estimate).
    """

    def __init__(self) -> None:
        self.log_sum = -math.inf
        self.count = 0

    @torch.no_grad()
    def update(self, target_logps: Tensor, proposal_logps: Tensor) -> float:
        """Fold a batch of samples from q in; returns the new log Z estimate."""
        target_logps, proposal_logps = constant(target_logps), constant(proposal_logps)
        _check_same_shape(target_logps=target_logps, proposal_logps=proposal_logps)
        n = target_logps.numel()
        if n > 0:
            batch = torch.logsumexp((target_logps - proposal_logps).double().flatten(),
                                    dim=0).item()
            if batch > self.log_sum:
                self.log_sum, batch = batch, self.log_sum
            if batch > -math.inf:  # log_sum >= batch: log(e^log_sum + e^batch)
                self.log_sum += math.log1p(math.exp(batch - self.log_sum))
            self.count += n
        return self.log_z

    @property
    def log_z(self) -> float:
        """log Z_hat = log_sum - log count; ValueError before any sample was seen."""
        if self.count == 0:
            raise ValueError("PartitionEstimate has seen no samples yet")
        return self.log_sum - math.log(self.count)

    def state_dict(self) -> dict[str, float | int]:
        return {"log_sum": self.log_sum, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.log_sum = float(state["log_sum"])
        self.count = int(state["count"])


# ---------------------------------------------------------------------------------------------
# The baseline
# ---------------------------------------------------------------------------------------------

class MovingAverageBaseline:
    r"""The baseline B of f-DPG: an exponential moving average of E_pi[f'(pi/p)].

    What is averaged: per batch, the importance-sampled mean pseudo-reward

        x = (1/N) sum_i w_i f'(t_i),   w_i = pi(x_i)/q(x_i),  t_i = pi(x_i)/p(x_i),  x_i ~ q

    an unbiased estimate of E_pi[f'(pi/p)] (the value that makes the baseline-corrected
    pseudo-reward zero-mean under pi); :func:`fdpg_loss` reports it as the metric
    ``fdpg/weighted_pseudo_reward``. ``update(x)`` sets value = x on the first call, then
    value = decay * value + (1 - decay) * x. Pass a tensor to average it first.

    Use ``value`` as the ``baseline`` of :func:`fdpg_loss` and update *after* computing the
    loss, so a batch is never its own baseline. The state is plain numbers (JSON-able).
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), not {decay}")
        self.decay = decay
        self.value = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, x: Tensor | float) -> float:
        """Fold one batch's mean weighted pseudo-reward in; returns the new value."""
        if isinstance(x, Tensor):
            if x.numel() == 0:
                return self.value
            x = x.detach().double().mean().item()
        x = float(x)
        self.value = x if self.count == 0 else self.decay * self.value + (1.0 - self.decay) * x
        self.count += 1
        return self.value

    def state_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.value = float(state["value"])
        self.count = int(state["count"])


# ---------------------------------------------------------------------------------------------
# The loss and the divergence estimates
# ---------------------------------------------------------------------------------------------

def _log_t(policy_logps: Tensor, target_logps: Tensor, log_z: Tensor,
           max_log_ratio: float) -> Tensor:
    """log(pi/p) = log pi - log P + log Z, clamped into [-max, max]; +inf (then max) where
    P = 0, whatever pi is (so -inf - -inf never makes a NaN)."""
    log_t = policy_logps - target_logps + log_z
    log_t = torch.where(target_logps == -math.inf, math.inf, log_t)
    return log_t.clamp(min=-max_log_ratio, max=max_log_ratio)


def _is_terms(div: Divergence, policy_logps: Tensor, proposal_logps: Tensor,
              target_logps: Tensor, log_z: Tensor, max_log_weight: float,
              max_log_ratio: float) -> Tensor:
    """(p_i/q_i) f(t_i) per sample, each of whose mean over x_i ~ q estimates D_f(pi || p).

    Where t <= 1 it is computed as (p/q) f(t); where t > 1 as (pi/q) f(t)/t, which is
    the same number but stays finite as p -> 0 (its limit is pi/q * f'(inf)). Each branch
    gets log t clamped into its own half, so the discarded one cannot make an inf or NaN.
    """
    log_t = _log_t(policy_logps, target_logps, log_z, max_log_ratio)
    p_over_q = torch.exp((target_logps - log_z - proposal_logps).clamp(max=max_log_weight))
    w = torch.exp((policy_logps - proposal_logps).clamp(max=max_log_weight))
    low = p_over_q * div.f(log_t.clamp(max=0.0))
    high = w * div.f_over_t(log_t.clamp(min=0.0))
    return torch.where(log_t <= 0.0, low, high)


def divergence_estimate(policy_logps: Tensor, proposal_logps: Tensor, target_logps: Tensor,
                        log_z: Tensor | float, divergence: str | Divergence, *,
                        max_log_weight: float = DEFAULT_MAX_LOG_WEIGHT,
                        max_log_ratio: float = DEFAULT_MAX_LOG_RATIO) -> Tensor:
    r"""Importance-sampling estimate of D_f(pi || p) from samples x_i ~ q:

        D_hat = (1/N) sum_i (p(x_i) / q(x_i)) f(pi(x_i) / p(x_i)),   p = P / Z_hat

    A detached 0-dim tensor. For samples with p = 0 the term is its limit (pi/q) f'(inf):
    exact for forward KL, JS and TV; for reverse KL (where it is +inf) log t is clamped at
    ``max_log_ratio``, so each such sample adds (pi/q) * max_log_ratio instead (see the
    module docstring): the estimate stays comparable between policies, and lower for the
    one that violates the constraint less.

    D_f(q || p) is estimated by passing ``proposal_logps`` as the policy too (then
    pi/q = 1); this is how :func:`should_update_proposal` is fed.
    """
    div = get_divergence(divergence)
    policy_logps, proposal_logps = constant(policy_logps), constant(proposal_logps)
    target_logps = constant(target_logps)
    _check_same_shape(policy_logps=policy_logps, proposal_logps=proposal_logps,
                      target_logps=target_logps)
    log_z = _scalar(log_z, policy_logps)
    terms = _is_terms(div, policy_logps, proposal_logps, target_logps, log_z, max_log_weight,
                      max_log_ratio)
    return terms.mean()


def should_update_proposal(policy_divergence: Tensor | float,
                           proposal_divergence: Tensor | float) -> bool:
    """The paper's rule for the lagged proposal: replace q by a copy of pi when the
    estimated divergence of pi from p is lower than that of q (both estimated with
    :func:`divergence_estimate` on the same samples). NaN never triggers an update."""
    return float(policy_divergence) < float(proposal_divergence)


def fdpg_loss(policy_logps: Tensor, proposal_logps: Tensor, target_logps: Tensor,
              log_z: Tensor | float, *, divergence: str | Divergence,
              baseline: Tensor | float = 0.0,
              max_log_weight: float = DEFAULT_MAX_LOG_WEIGHT,
              max_log_ratio: float = DEFAULT_MAX_LOG_RATIO) -> LossOutput:
    r"""The f-DPG surrogate loss for samples x_i drawn from the proposal q.

        losses_i = w_i * (f'(t_i) - B) * log pi(x_i)

    with w_i = pi(x_i)/q(x_i) and t_i = pi(x_i)/p(x_i) = exp(log pi - log P + log Z)
    treated as constants, so that

        grad losses.mean() = (1/N) sum_i w_i (f'(t_i) - B) grad log pi(x_i)

    is the importance-sampled estimate of grad D_f(pi || p) (module docstring): minimising
    the loss minimises the divergence. The loss *value* means nothing by itself; watch
    ``fdpg/divergence``.

    Arguments, all of shape [N] (per-sequence summed log-probs of the sampled x_i):
    ``policy_logps`` log pi(x_i) (the only input that gets a gradient), ``proposal_logps``
    log q(x_i), ``target_logps`` log P(x_i) (see :func:`target_logp`; -inf where P = 0),
    and ``log_z`` the estimate of log Z (a float or 0-dim tensor, e.g.
    :attr:`PartitionEstimate.log_z`). ``divergence`` is a name of :data:`DIVERGENCES` or a
    :class:`Divergence`; ``baseline`` B (e.g. :attr:`MovingAverageBaseline.value`).

    Samples with P = 0 have t = +inf; log t is clamped at ``max_log_ratio``, so their
    pseudo-reward is f'(inf) for forward KL (0: only the baseline acts on them, and the
    normalisation of pi, which raises every x with p > 0, pushes them down), JS (log(2)/2)
    and TV (1/2), and the finite penalty max_log_ratio + 1 for reverse KL (f'(inf) = +inf).
    ``max_log_weight`` clamps log w before exp. The loss is finite whenever
    ``policy_logps`` is.

    Metrics (detached 0-dim tensors, means over the batch):

    ``fdpg/divergence``            :func:`divergence_estimate` of D_f(pi || p)
    ``fdpg/log_z``                 the log Z used
    ``fdpg/importance_weight``     mean w (about 1 while pi is close to q)
    ``fdpg/pseudo_reward``         mean f'(t), unweighted
    ``fdpg/weighted_pseudo_reward`` mean w f'(t): the estimate of E_pi[f'] to feed
                                   :meth:`MovingAverageBaseline.update`
    ``fdpg/baseline``              the B used
    """
    div = get_divergence(divergence)
    policy_logps = upcast(policy_logps)
    logpi = policy_logps.detach()
    logq, logP = constant(proposal_logps), constant(target_logps)
    _check_same_shape(policy_logps=logpi, proposal_logps=logq, target_logps=logP)
    log_z = _scalar(log_z, logpi)
    b = _scalar(baseline, logpi)

    log_t = _log_t(logpi, logP, log_z, max_log_ratio)
    w = torch.exp((logpi - logq).clamp(max=max_log_weight))
    pseudo_reward = div.f_prime(log_t)
    losses = (w * (pseudo_reward - b)) * policy_logps

    metrics: dict[str, Tensor] = {}
    if logpi.numel() > 0:
        terms = _is_terms(div, logpi, logq, logP, log_z, max_log_weight, max_log_ratio)
        put_mean(metrics, "fdpg/divergence", terms)
    metrics["fdpg/log_z"] = log_z.float()
    put_mean(metrics, "fdpg/importance_weight", w)
    put_mean(metrics, "fdpg/pseudo_reward", pseudo_reward)
    put_mean(metrics, "fdpg/weighted_pseudo_reward", w * pseudo_reward)
    metrics["fdpg/baseline"] = b.float()
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# Exact divergence (categorical) and evaluation metrics
# ---------------------------------------------------------------------------------------------

def exact_divergence(pi_probs: Tensor, p_probs: Tensor,
                     divergence: str | Divergence) -> Tensor:
    r"""D_f(pi || p) of two categorical distributions over the same outcomes, exactly:

        sum_{p>0, pi>0} p f(pi/p) + f(0) sum_{pi=0<p} p + f'(inf) sum_{p=0<pi} pi

    (the last two are the limits of p f(pi/p); an outcome with both zero adds nothing). So
    forward KL sums p log(p/pi) over p > 0 (+inf if pi = 0 somewhere there), and reverse KL
    is +inf as soon as pi > 0 where p = 0. Probabilities along the last dimension; returns
    a float64 tensor (0-dim for vectors), no gradient needed or kept.
    """
    div = get_divergence(divergence)
    pi, p = pi_probs.detach().double(), p_probs.detach().double()
    if pi.shape != p.shape:
        raise ValueError(f"pi has shape {tuple(pi.shape)}, p has {tuple(p.shape)}")
    both = (pi > 0) & (p > 0)
    # placeholders where a log would be -inf; those entries are replaced below
    log_t = torch.where(both, torch.log(pi.where(both, 1.0)) - torch.log(p.where(both, 1.0)),
                        0.0)
    interior = torch.where(log_t <= 0.0, p * div.f(log_t.clamp(max=0.0)),
                           pi * div.f_over_t(log_t.clamp(min=0.0)))
    zero = torch.zeros_like(pi)
    terms = torch.where(both, interior, zero)
    terms = terms + torch.where((pi == 0) & (p > 0), p * div.f_at_zero, zero)
    terms = terms + torch.where((p == 0) & (pi > 0), pi * div.f_prime_at_infinity, zero)
    return terms.sum(dim=-1)


def kl_estimate(policy_logps: Tensor, proposal_logps: Tensor, base_logps: Tensor, *,
                max_log_weight: float = 20.0) -> Tensor:
    """KL(pi || a) from samples of the proposal q: the self-normalised importance-sampling
    estimate sum_i w_i (log pi(x_i) - log a(x_i)) / sum_i w_i, with w = pi/q (log w clamped
    above at ``max_log_weight``, as elsewhere). Detached; a 0-dim tensor."""
    policy_logps = upcast(policy_logps.detach())
    weights = torch.softmax((policy_logps - upcast(proposal_logps.detach())).clamp(
        max=max_log_weight), dim=0)
    return (weights * (policy_logps - upcast(base_logps.detach()))).sum()


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): the number of distinct n-grams divided by the total
    number of n-grams, over all sequences together (a sequence shorter than n has none).
    0.0 when there are no n-grams at all."""
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    seen: set[tuple[int, ...]] = set()
    total = 0
    for seq in sequences:
        seq = list(seq)
        for i in range(len(seq) - n + 1):
            seen.add(tuple(seq[i:i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def constraint_satisfaction(b: Tensor | Sequence[float] | Sequence[bool]) -> float:
    """Fraction of samples that satisfy a binary constraint: the mean of b(x) in {0, 1}
    (or bool). 0.0 for no samples."""
    b = torch.as_tensor(b).detach()
    if b.numel() == 0:
        return 0.0
    return b.double().mean().item()
