r"""On-policy policy-gradient pieces (GRPO, RLOO) as small pure functions.

This module holds the math only: advantages from rewards, the clipped token-level policy
loss, the sequence-level RLOO loss, a repetition unlikelihood term and a reward normaliser.
Sampling completions, scoring them and running the optimiser belong to the caller.

Shapes and conventions
----------------------
A *rollout batch* holds ``P`` prompts with ``K`` completions each (``K`` =
``num_generations``), flattened prompt-major: rows ``p*K .. p*K + K-1`` are the completions
of prompt ``p``. This is the layout TRL's ``RepeatSampler`` produces, and every function
that groups rewards assumes it.

* ``rewards``: ``[P*K]``, one scalar per completion (any reward model / verifier output).
* per-token tensors: ``[B, T]`` with ``B`` completions padded to ``T`` tokens;
  ``logps[b, t]`` is log pi(y_t | x, y_<t) of the completion's t-th token (prompt tokens are
  not included; the caller slices them off).
* ``completion_mask``: ``[B, T]``, 1 for real completion tokens, 0 for padding (and for
  anything after EOS). Masked positions contribute nothing, whatever their values.
* ``advantages``: ``[B]`` (one per completion, broadcast over its tokens) or ``[B, T]``.

Hyper-parameters are keyword-only, with TRL 1.5.1's names and defaults (``GRPOConfig``:
``beta=0.0``, ``epsilon=0.2``, ``epsilon_high=None``, ``scale_rewards="group"``,
``loss_type="dapo"``; ``RLOOConfig``: ``beta=0.05``, ``normalize_advantages=False``,
``reward_clip_range=None``), so a value from a TRL config carries over unchanged.

Losses return ``(losses, metrics)`` like :mod:`hcx.stages.losses`:

* ``losses``: shape ``[B]``, one value per completion, scaled so that ``losses.mean()`` is
  exactly the scalar TRL optimises for the same micro-batch (single process, no gradient
  accumulation). Token-level aggregations are turned into per-sequence shares (see
  :func:`policy_loss`), so the caller may still sum across micro-batches and ranks and
  divide by the number of completions (:func:`hcx.stages.loss_helpers.loop_output`).
* ``metrics``: detached 0-dim float tensors with TRL's log names (``kl``,
  ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ...);
  a metric over no tokens is left out.

The advantage helpers return ``(advantages, metrics)`` in the same way; advantages are
detached (they are constants of the policy-gradient estimate).

All arithmetic runs in at least float32 (:func:`hcx.stages.loss_helpers.upcast`); only
``logps`` (the current policy's) receives a gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from hcx.stages.loss_helpers import constant, put_mean, upcast
from hcx.stages.losses import log1mexp

LossOutput = tuple[Tensor, dict[str, Tensor]]

#: TRL's guard against a zero standard deviation: ``(r - mean) / (std + 1e-4)``.
STD_EPS = 1e-4


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _groups(rewards: Tensor, num_generations: int) -> Tensor:
    """rewards [P*K] -> [P, K], checking the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [prompts * num_generations], got "
                         f"{tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of "
                         f"num_generations={num_generations}")
    return rewards.view(-1, num_generations)


def _std(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased standard deviation (torch's default, as TRL), 0 where there is a single
    value (TRL's convention for ``num_generations == 1``) instead of NaN."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.mean() if dim is None else x.mean(dim=dim))
    return x.std() if dim is None else x.std(dim=dim)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the masked-in positions; x may be [B, T] or [B, 1] (then every
    sequence counts once, as TRL's ``masked_batch_mean`` for sequence-level ratios)."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _check_token_shapes(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token inputs must have the same shape [B, T], got {shapes}")
    if any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"per-token inputs must be 2-D [B, T], got {shapes}")


# ---------------------------------------------------------------------------------------------
# 1. Rewards and advantages
# ---------------------------------------------------------------------------------------------


def clip_rewards(rewards: Tensor, reward_clip_range: tuple[float, float] | None) -> Tensor:
    """Clamp rewards into ``reward_clip_range = (low, high)``; ``None`` leaves them as they are
    (TRL's ``RLOOConfig.reward_clip_range``)."""
    if reward_clip_range is None:
        return rewards
    low, high = reward_clip_range
    if low > high:
        raise ValueError(f"reward_clip_range {reward_clip_range}: low is above high")
    return rewards.clamp(min=low, max=high)


class RewardNormalizer:
    r"""Reward normalisation and clipping with running statistics.

    Reward-model scores have an arbitrary offset and scale that drift between reward
    models; PPO-style RLHF therefore whitens them before use and clips outliers (the
    HyperCLOVA X report, Yoo et al. 2024, arXiv:2404.01954, describes its RLHF rewards as
    normalised and clipped). The formula here is the common one, running whitening then a
    symmetric clip (the running statistics are those of TRL's ``RunningMoments``)::

        r' = clip((r - mu) / (sigma + eps), -clip, +clip)

    where mu and sigma are the mean and (population) standard deviation of *every reward
    seen so far* (:meth:`update`, Chan et al.'s parallel merge of count/mean/M2), or, before
    any update, of the batch itself. Keep this object in checkpoints (:meth:`state_dict`):
    resuming without it would re-centre the rewards on the first batch and jolt training.
    Under data parallelism, update it with rewards gathered from all ranks.

    ``clip=None`` normalises without clipping; ``clip`` is symmetric around 0, in units of
    sigma (e.g. 5.0 keeps 5-sigma outliers at 5).
    """

    def __init__(self, *, clip: float | None = 5.0, eps: float = 1e-8) -> None:
        self.clip = clip
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count else 0.0

    @torch.no_grad()
    def update(self, rewards: Tensor) -> None:
        """Fold a batch of rewards into the running mean and variance. Syncs with the device
        (``.item()``): the statistics are plain floats so they can be stored as JSON."""
        n = rewards.numel()
        if n == 0:
            return
        x = rewards.detach().double()
        batch_mean = x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def __call__(self, rewards: Tensor) -> Tensor:
        """The normalised (and clipped) rewards, detached; with no statistics yet, the batch's
        own mean and standard deviation are used."""
        x = upcast(rewards.detach())
        if self.count:
            mu, sigma = self.mean, self.std
        else:
            mu = x.mean().item() if x.numel() else 0.0
            sigma = x.std(unbiased=False).item() if x.numel() else 0.0
        out = (x - mu) / (sigma + self.eps)
        if self.clip is not None:
            out = out.clamp(min=-self.clip, max=self.clip)
        return out

    def state_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def kl_penalized_rewards(rewards: Tensor, old_logps: Tensor, ref_logps: Tensor,
                         completion_mask: Tensor, *, beta: float = 0.05) -> Tensor:
    r"""RLOO's KL-in-reward: ``r - beta * sum_t (log pi_old(y_t) - log pi_ref(y_t))``.

    The sequence-level k1 estimate of KL(pi_old || pi_ref) on the sampled completion, summed
    over its tokens, is subtracted from the reward before the baseline is formed (TRL 1.5.1
    ``RLOOTrainer._generate_and_score_completions``; Ahmadian et al. 2024, "Back to Basics:
    Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    arXiv:2402.14740). ``old_logps`` / ``ref_logps``: ``[B, T]``, the rollout
    policy's and the reference's per-token log-probs; ``rewards``: ``[B]``. Detached.
    """
    _check_token_shapes(old_logps=old_logps, ref_logps=ref_logps, completion_mask=completion_mask)
    mask = upcast(completion_mask.detach())
    kl = ((constant(old_logps) - constant(ref_logps)) * mask).sum(-1)
    return upcast(rewards.detach()) - beta * kl


def group_advantages(rewards: Tensor, num_generations: int, *,
                     scale_rewards: Literal["group", "batch", "none"] = "group",
                     eps: float = STD_EPS) -> tuple[Tensor, dict[str, Tensor]]:
    r"""GRPO's group-relative advantages.

    Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), Section 4.1.2 (outcome
    supervision): each of the K completions of a prompt is scored, and its advantage is its
    reward standardised within the prompt's group,

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    ``scale_rewards`` (TRL 1.5.1 ``GRPOConfig.scale_rewards``, same computation as
    ``GRPOTrainer._generate_and_score_completions``):

    * ``"group"`` (default): divide by the group's standard deviation, as above;
    * ``"batch"``: divide by the standard deviation of all rewards in the batch (the centring
      stays per group; "PPO Lite", Liu et al. 2025, arXiv:2508.08221);
    * ``"none"``: no division, A_i = r_i - mean(r_group) (Dr. GRPO, Liu et al. 2025,
      arXiv:2503.20783: the division gives easy and hard prompts outsized weight).

    Standard deviations are unbiased (Bessel-corrected, torch's and TRL's default); eps is
    TRL's 1e-4. A group whose rewards are all equal gets advantages 0 (nothing to learn
    from it). ``rewards``: ``[P*K]``, prompt-major (see the module docstring).

    Metrics (TRL names): ``reward`` (mean reward), ``reward_std`` (mean of the group
    standard deviations, or the batch one for ``"batch"``), ``frac_reward_zero_std``
    (fraction of completions whose group has zero spread).
    """
    rewards = upcast(rewards.detach())
    grouped = _groups(rewards, num_generations)
    mean = grouped.mean(dim=1, keepdim=True).expand_as(grouped)
    if scale_rewards in ("group", "none"):
        std = _std(grouped, dim=1).unsqueeze(1).expand_as(grouped)
    elif scale_rewards == "batch":
        std = _std(rewards).expand_as(grouped)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', not {scale_rewards!r}")
    advantages = grouped - mean
    if scale_rewards != "none":
        advantages = advantages / (std + eps)

    metrics: dict[str, Tensor] = {}
    put_mean(metrics, "reward", rewards)
    put_mean(metrics, "reward_std", std)
    put_mean(metrics, "frac_reward_zero_std",
             torch.isclose(std, torch.zeros_like(std)).float())
    return advantages.reshape(-1), metrics


def rloo_advantages(rewards: Tensor, num_generations: int, *, normalize_advantages: bool = False,
                    eps: float = STD_EPS) -> tuple[Tensor, dict[str, Tensor]]:
    r"""REINFORCE Leave-One-Out advantages.

    Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al.
    2024 (arXiv:2402.14740), the RLOO estimator: each completion's baseline is the mean
    reward of the *other* K-1 completions of its prompt,

        A_i = r_i - (1 / (K-1)) * sum_{j != i} r_j  =  K / (K-1) * (r_i - mean(r_group))

    which is independent of y_i, so the estimate stays unbiased. ``normalize_advantages``
    then standardises over the whole batch, (A - mean(A)) / (std(A) + eps), as TRL 1.5.1's
    ``RLOOConfig.normalize_advantages``. With K = 1 there is no other sample: advantages are 0
    (TRL's convention). Apply :func:`clip_rewards` / :func:`kl_penalized_rewards` to the
    rewards first to reproduce TRL's order (clip, subtract beta*KL, then the baseline).

    Metrics: ``reward``, ``reward_std`` (mean group standard deviation),
    ``frac_reward_zero_std``.
    """
    rewards = upcast(rewards.detach())
    grouped = _groups(rewards, num_generations)
    if num_generations > 1:
        baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
        advantages = (grouped - baselines).reshape(-1)
    else:
        advantages = torch.zeros_like(rewards)
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (_std(advantages) + eps)

    std = _std(grouped, dim=1)
    metrics: dict[str, Tensor] = {}
    put_mean(metrics, "reward", rewards)
    put_mean(metrics, "reward_std", std)
    put_mean(metrics, "frac_reward_zero_std",
             torch.isclose(std, torch.zeros_like(std)).float().repeat_interleave(num_generations))
    return advantages, metrics


# ---------------------------------------------------------------------------------------------
# 2. Token-level clipped policy loss (GRPO / DAPO / Dr. GRPO; RLOO advantages work too)
# ---------------------------------------------------------------------------------------------


def per_token_kl(logps: Tensor, ref_logps: Tensor, *,
                 estimator: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    r"""Per-token estimates of KL(pi || pi_ref) from a sampled token (Schulman 2020,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html). With
    d = log pi_ref(y_t) - log pi(y_t):

    * ``"k3"``: exp(d) - d - 1, unbiased and always >= 0 (GRPO's, DeepSeekMath Eq. 4; TRL's
      ``per_token_kl``);
    * ``"k1"``: -d = log pi - log pi_ref, unbiased, can be negative;
    * ``"k2"``: d^2 / 2, biased but low-variance, always >= 0.

    Gradients flow through ``logps`` (the estimator is a penalty term of the loss, as in
    TRL); ``ref_logps`` is detached.
    """
    d = constant(ref_logps) - upcast(logps)
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', not {estimator!r}")


LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]


def policy_loss(logps: Tensor, old_logps: Tensor | None, advantages: Tensor,
                completion_mask: Tensor, *, ref_logps: Tensor | None = None, beta: float = 0.0,
                epsilon: float = 0.2, epsilon_high: float | None = None,
                delta: float | None = None, kl_estimator: Literal["k1", "k2", "k3"] = "k3",
                use_bias_correction_kl: bool = False, loss_type: LossType = "dapo",
                max_completion_length: int | None = None,
                mean_completion_tokens: float | Tensor | None = None,
                importance_sampling_level: Literal["token", "sequence"] = "token") -> LossOutput:
    r"""The clipped surrogate policy loss of GRPO (and of PPO without a value function).

    Shao et al. 2024 (arXiv:2402.03300), Eq. 3, as implemented by TRL 1.5.1
    (``GRPOTrainer._compute_loss``). Per token t of completion i, with the importance ratio
    rho = pi(y_t) / pi_old(y_t) (``exp(logps - old_logps)``) and the completion's advantage A:

        l_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)  +  beta * KL_t

    * ``old_logps``: ``[B, T]`` log-probs of the policy that generated the rollout. Several
      optimisation passes over one rollout batch (TRL's ``num_iterations``) need them; pass
      ``None`` for a single on-policy pass (then rho = 1 with the gradient of pi/pi, exactly
      TRL's ``per_token_logps.detach()`` shortcut).
    * ``epsilon`` / ``epsilon_high``: eps_low and eps_high (``epsilon_high=None`` means
      eps_high = eps_low; DAPO, Yu et al. 2025, arXiv:2503.14476, Section 3.1, raises it to
      0.28, "clip-higher").
    * ``delta``: if set, rho is also capped at delta in the unclipped branch (two-sided
      clipping, INTELLECT-2 report, arXiv:2505.07291; TRL ``GRPOConfig.delta``).
    * KL: with ``beta != 0`` pass ``ref_logps`` ``[B, T]``; KL_t is :func:`per_token_kl`
      with ``kl_estimator`` ("k3" as GRPO/TRL, or "k1"/"k2"). ``use_bias_correction_kl``
      multiplies KL_t by rho (TRL's importance-sampling correction for old-policy samples).
    * ``importance_sampling_level="sequence"``: one ratio per completion, exp of the mean
      token log-ratio (GSPO, Zheng et al. 2025, arXiv:2507.18071), TRL's option.

    Aggregation over tokens (``loss_type``, TRL's definitions), with m the completion mask,
    |y_i| = sum_t m_it and L the per-token loss:

    ``"grpo"``
        per-sequence mean, then batch mean: mean_i( sum_t L_it m_it / |y_i| ). Returned
        ``losses[i] = sum_t L_it m_it / |y_i|`` (|y_i| clamped at 1).
    ``"bnpo"``
        token mean over the micro-batch: sum L m / sum m. ``losses[i] = sum_t L_it m_it /
        (sum m / B)``, so that ``losses.mean()`` is that token mean.
    ``"dapo"`` (TRL's default)
        token mean over the *whole* optimisation batch (all micro-batches of the step and all
        ranks; DAPO's token-level loss).
        ``losses[i] = sum_t L_it m_it / mean_completion_tokens`` where
        ``mean_completion_tokens`` = total completion tokens / total completions of the
        optimisation batch (TRL: ``num_items_in_batch`` / global batch size); the caller
        computes it before the step. Then (sum of ``losses`` over the step) / (number of
        completions in the step) is the global token mean, which is what
        :func:`~hcx.stages.loss_helpers.loop_output` computes. Default (``None``): this
        micro-batch's own mean, i.e. the same value as ``"bnpo"``.
    ``"dr_grpo"``
        divide by a constant: sum L m / (B * max_completion_length) (Dr. GRPO, Liu et al.
        2025, arXiv:2503.20783). ``losses[i] = sum_t L_it m_it /
        max_completion_length``; ``max_completion_length`` (the generation limit) is
        required.

    ``advantages``: ``[B]`` (or ``[B, T]``, per-token advantages), detached.

    Metrics (TRL's names, token means over the masked-in tokens, 0 when there are none;
    sequence means with ``importance_sampling_level="sequence"``): ``kl`` (only with
    ``ref_logps``),
    ``clip_ratio/low_mean`` (rho < 1 - eps_low where A < 0), ``clip_ratio/high_mean``
    (rho > 1 + eps_high where A > 0), ``clip_ratio/region_mean`` (either), and
    ``completions/mean_length``.
    """
    _check_token_shapes(logps=logps, old_logps=old_logps, ref_logps=ref_logps,
                        completion_mask=completion_mask)
    logps = upcast(logps)
    mask = upcast(completion_mask.detach())
    old = logps.detach() if old_logps is None else constant(old_logps)
    advantages = constant(advantages)
    if advantages.dim() == 1:
        if advantages.shape[0] != logps.shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows, log-probs have "
                             f"{logps.shape[0]}")
        advantages = advantages.unsqueeze(1)
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the reference model's per-token log-probs)")

    log_ratio = logps - old
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', not "
                         f"{importance_sampling_level!r}")
    ratio = torch.exp(log_weights)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.min(unclipped * advantages, clipped * advantages)

    kl = None
    if ref_logps is not None:
        kl = per_token_kl(logps, ref_logps, estimator=kl_estimator)
        if use_bias_correction_kl:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
    per_token = per_token.expand_as(mask) if per_token.shape != mask.shape else per_token

    summed = (per_token * mask).sum(-1)
    batch = logps.shape[0]
    if loss_type == "grpo":
        losses = summed / mask.sum(-1).clamp(min=1.0)
    elif loss_type in ("bnpo", "dapo"):
        if loss_type == "dapo" and mean_completion_tokens is not None:
            per_sequence = torch.as_tensor(mean_completion_tokens, dtype=summed.dtype,
                                           device=summed.device).detach()
        else:
            per_sequence = mask.sum() / max(batch, 1)
        losses = summed / per_sequence.clamp(min=1.0 / max(batch, 1))
    elif loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the generation "
                             "limit it divides by)")
        losses = summed / float(max_completion_length)
    else:
        raise ValueError(f"loss_type must be 'grpo', 'bnpo', 'dapo' or 'dr_grpo', not "
                         f"{loss_type!r}")

    metrics: dict[str, Tensor] = {}
    # shape test, not mask.sum() > 0: a data-dependent branch would sync with the device
    if mask.numel() > 0:
        if kl is not None:
            metrics["kl"] = _masked_mean(kl.detach(), mask).float()
        low = ((ratio < 1.0 - eps_low) & (advantages < 0)).float()
        high = ((ratio > 1.0 + eps_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"] = _masked_mean(low, mask).float()
        metrics["clip_ratio/high_mean"] = _masked_mean(high, mask).float()
        metrics["clip_ratio/region_mean"] = _masked_mean(torch.maximum(low, high), mask).float()
    put_mean(metrics, "completions/mean_length", mask.sum(-1))
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# 3. Sequence-level RLOO loss (TRL 1.5.1's RLOOTrainer)
# ---------------------------------------------------------------------------------------------


def rloo_loss(policy_logps: Tensor, old_logps: Tensor, advantages: Tensor, *,
              epsilon: float = 0.2, epsilon_high: float | None = None) -> LossOutput:
    r"""The clipped REINFORCE loss of TRL 1.5.1's ``RLOOTrainer._compute_loss``.

    Unlike :func:`policy_loss`, RLOO treats the whole completion as one action (Ahmadian et
    al. 2024, arXiv:2402.14740): inputs are **summed** completion log-probs
    ``[B]`` (``(per_token_logps * mask).sum(-1)``), the ratio is per sequence,
    rho = exp(log pi(y) - log pi_old(y)), and

        loss_i = -min(rho_i * A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) * A_i)

    with A from :func:`rloo_advantages` (the KL penalty, if any, is already in the reward:
    :func:`kl_penalized_rewards`). ``losses.mean()`` equals TRL's loss.

    Metrics: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``
    (fractions of sequences).
    """
    policy_logps = upcast(policy_logps)
    advantages = constant(advantages)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(policy_logps - constant(old_logps))
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    losses = -torch.min(ratio * advantages, clipped * advantages)

    metrics: dict[str, Tensor] = {}
    low = ((ratio < 1.0 - epsilon) & (advantages < 0)).float()
    high = ((ratio > 1.0 + eps_high) & (advantages > 0)).float()
    put_mean(metrics, "clip_ratio/low_mean", low)
    put_mean(metrics, "clip_ratio/high_mean", high)
    put_mean(metrics, "clip_ratio/region_mean", torch.maximum(low, high))
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# 4. Repetition unlikelihood
# ---------------------------------------------------------------------------------------------


def repeated_ngram_mask(token_ids: Sequence[Sequence[int]] | Tensor,
                        completion_mask: Sequence[Sequence[int]] | Tensor | None = None, *,
                        n: int = 4) -> Tensor:
    r"""Which completion tokens belong to a repeated n-gram: a ``[B, T]`` float 0/1 tensor.

    Welleck et al. 2020, "Neural Text Generation with Unlikelihood Training" (ICLR 2020,
    arXiv:1908.04319), sequence-level training, repeat candidates: token x_t is a negative
    candidate if it lies inside an n-gram (x_s, ..., x_{s+n-1}), s <= t <= s+n-1, that
    already occurred *entirely before* that n-gram starts, i.e. as (x_u, ..., x_{u+n-1})
    with u + n - 1 < s. Only the completion's own tokens count (``completion_mask`` 1; they
    are assumed to be a prefix of each row, as after right padding). Pure Python over the
    token ids: O(B * T) with a set of seen n-grams.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    rows = token_ids.tolist() if isinstance(token_ids, Tensor) else [list(r) for r in token_ids]
    if completion_mask is None:
        lengths = [len(r) for r in rows]
    else:
        m = completion_mask.tolist() if isinstance(completion_mask, Tensor) else completion_mask
        lengths = [int(sum(1 for v in r if v)) for r in m]
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width)
    for b, (row, length) in enumerate(zip(rows, lengths)):
        seen: set[tuple[int, ...]] = set()
        # n-grams are added to `seen` once they end before the current start s
        for s in range(0, length - n + 1):
            if s - n >= 0:
                seen.add(tuple(row[s - n:s]))
            if tuple(row[s:s + n]) in seen:
                out[b, s:s + n] = 1.0
    return out


def repetition_unlikelihood_loss(logps: Tensor, repeated: Tensor, completion_mask: Tensor, *,
                                 max_logp: float = -1e-6) -> LossOutput:
    r"""Sequence-level unlikelihood against repetition (Welleck et al. 2020: the
    unlikelihood loss on the repeated-n-gram candidates of their sequence-level training):

        loss_i = -sum_t  c_it * log(1 - p_i(y_t))

    where p_i(y_t) = exp(``logps[i, t]``) is the policy's probability of the sampled token and
    c = ``repeated`` (from :func:`repeated_ngram_mask`) marks tokens of a repeated n-gram; a
    masked-out token never counts. The loss is summed per sequence, as in the paper; weight
    it (the paper mixes it with the MLE loss with alpha = 1 and applies it to a fraction of
    the updates) and reduce as you like. log(1 - p) uses :func:`~hcx.stages.losses.log1mexp`,
    with log p clamped at ``max_logp`` so a token of probability 1 stays finite.

    Metrics: ``unlikelihood/repeat_fraction`` (fraction of completion tokens marked),
    ``unlikelihood/loss``.
    """
    _check_token_shapes(logps=logps, repeated=repeated, completion_mask=completion_mask)
    logps = upcast(logps)
    weights = upcast(repeated.detach()) * upcast(completion_mask.detach())
    losses = -(weights * log1mexp(logps.clamp(max=max_logp))).sum(-1)
    metrics: dict[str, Tensor] = {}
    mask = upcast(completion_mask.detach())
    if mask.numel() > 0:
        fraction = weights.sum() / mask.sum().clamp(min=1.0)
        metrics["unlikelihood/repeat_fraction"] = fraction.float()
    put_mean(metrics, "unlikelihood/loss", losses)
    return losses, metrics
