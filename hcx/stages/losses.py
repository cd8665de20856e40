"""Preference-alignment losses (DPO, IPO, KTO, BCO, ORPO, Bradley-Terry) as small pure functions.

The API, shared by every loss in this module
--------------------------------------------
Inputs are **per-sequence summed log-probabilities** of the completion tokens (prompt tokens
excluded), one float per example: tensors of shape ``[batch]``.

* ``policy_*`` tensors come from the model being trained and carry gradients.
* ``ref_*`` tensors come from the frozen reference model. They may be plain tensors; every
  loss detaches them anyway, so the reference can never receive a gradient by accident.
* Paired losses (DPO, IPO, ORPO, Bradley-Terry) take chosen/rejected tensors of the same length:
  row ``i`` of each is one preference pair. Unpaired losses (KTO, BCO) take one completion per
  row plus a boolean ``desirable`` tensor saying which side of the feedback it is on.
* Hyper-parameters are keyword-only, with TRL's names and defaults where TRL has them
  (``beta=0.1``, ``label_smoothing``, ``desirable_weight`` ...), so a value from a TRL config
  carries over unchanged.

Every loss returns ``(losses, metrics)``:

* ``losses``: shape ``[batch]``, one loss per example (per pair for paired losses). Reduce it
  yourself; ``losses.mean()`` is exactly the scalar TRL optimises for the same batch (for
  ORPO, given the same SFT inputs: see ``orpo_loss``). Keeping the per-example values lets
  the caller mask, weight, or sum across micro-batches.
* ``metrics``: ``dict[str, Tensor]`` of detached 0-dim tensors, each a mean over the batch.
  They stay tensors so that computing a loss never forces a GPU->CPU sync; call ``.item()``
  when logging. Names follow TRL's logs so dashboards can be compared side by side:

  ``rewards/chosen``, ``rewards/rejected``
      the implicit reward ``beta * (policy_logp - ref_logp)`` of chosen (desirable) and
      rejected (undesirable) completions;
  ``rewards/accuracies``
      paired: fraction of pairs whose chosen reward beats the rejected one; unpaired: fraction
      of examples whose reward falls on the correct side of the loss's reference point;
  ``rewards/margins``
      mean chosen reward minus mean rejected reward;
  ``logps/chosen``, ``logps/rejected``
      the policy log-probabilities as given (summed over tokens);
  ``kl``
      KTO only: the batch estimate of KL(policy || reference). Paired losses report none:
      their completions come from a dataset, not from the policy, so the mean log-ratio on
      them is not a KL estimate.

  A metric over an empty subset (no rejected examples in a KTO batch, an empty batch) is left
  out of the dict rather than reported as NaN, so averaging logged values stays meaningful.

All arithmetic runs in at least float32: log-probs of bfloat16 models are upcast first
(sigmoids and squares of bfloat16 differences lose most of their digits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hcx.stages.loss_helpers import constant, put_mean, upcast

LossOutput = tuple[Tensor, dict[str, Tensor]]


# ---------------------------------------------------------------------------------------------
# Helpers shared by the losses
# ---------------------------------------------------------------------------------------------


def _paired_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen_logps: Tensor,
                    policy_rejected_logps: Tensor) -> dict[str, Tensor]:
    metrics: dict[str, Tensor] = {}
    put_mean(metrics, "rewards/chosen", chosen_rewards)
    put_mean(metrics, "rewards/rejected", rejected_rewards)
    put_mean(metrics, "rewards/accuracies", (chosen_rewards > rejected_rewards).float())
    put_mean(metrics, "rewards/margins", chosen_rewards - rejected_rewards)
    put_mean(metrics, "logps/chosen", policy_chosen_logps)
    put_mean(metrics, "logps/rejected", policy_rejected_logps)
    return metrics


def _unpaired_metrics(rewards: Tensor, policy_logps: Tensor, desirable: Tensor,
                      reward_reference_point: Tensor) -> dict[str, Tensor]:
    """Metrics of KTO/BCO: chosen = desirable rows, rejected = undesirable rows. A reward is
    "accurate" when it lies on the correct side of the loss's reference point."""
    metrics: dict[str, Tensor] = {}
    put_mean(metrics, "rewards/chosen", rewards[desirable])
    put_mean(metrics, "rewards/rejected", rewards[~desirable])
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    correct = torch.where(desirable, rewards > reward_reference_point,
                          rewards < reward_reference_point)
    put_mean(metrics, "rewards/accuracies", correct.float())
    put_mean(metrics, "logps/chosen", policy_logps[desirable])
    put_mean(metrics, "logps/rejected", policy_logps[~desirable])
    return metrics


def _as_bool(desirable: Tensor, like: Tensor) -> Tensor:
    if desirable.shape != like.shape:
        raise ValueError(f"desirable has shape {tuple(desirable.shape)}, log-probs have "
                         f"{tuple(like.shape)}")
    return desirable.to(device=like.device, dtype=torch.bool)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate over the whole range (Maechler 2012,
    "Accurately computing log(1 - exp(-|a|))").

    Near x = 0, exp(x) is close to 1 and ``log1p(-exp(x))`` cancels catastrophically, so use
    ``log(-expm1(x))`` there; for x below -log 2 the opposite holds. Each branch gets an input
    clamped into its own half, so the branch torch.where discards cannot produce an inf whose
    gradient (inf * 0 = NaN) would poison the one it keeps.
    """
    t = -math.log(2.0)
    small = torch.log1p(-torch.exp(torch.clamp(x, max=t)))
    near_zero = torch.log(-torch.expm1(torch.clamp(x, min=t)))
    return torch.where(x < t, small, near_zero)


# ---------------------------------------------------------------------------------------------
# 1. DPO (with conservative DPO / label smoothing)
# ---------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> LossOutput:
    r"""Direct Preference Optimization, sigmoid loss.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model" (arXiv:2305.18290), Eq. 7. With the log-ratio difference

        h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))

    the loss per pair is

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    where eps = ``label_smoothing`` is conservative DPO (cDPO; Mitchell 2023, "A note on DPO
    with noisy preferences & relationship to IPO"): the label is assumed flipped with
    probability eps, so the loss stops pushing once sigmoid(beta*h) reaches 1 - eps instead
    of driving h to infinity. eps = 0 is plain DPO. (TRL < 0.29 applied label_smoothing to its
    "sigmoid" loss exactly like this; later TRL keeps the same formula only in its "aot" loss.)

    ``beta`` is the KL-penalty temperature: larger keeps the policy closer to the reference.
    """
    policy_chosen_logps = upcast(policy_chosen_logps)
    policy_rejected_logps = upcast(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - constant(ref_chosen_logps)
    rejected_logratios = policy_rejected_logps - constant(ref_rejected_logps)
    h = chosen_logratios - rejected_logratios

    losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
              - label_smoothing * F.logsigmoid(-beta * h))
    metrics = _paired_metrics(beta * chosen_logratios, beta * rejected_logratios,
                              policy_chosen_logps, policy_rejected_logps)
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# 2. IPO
# ---------------------------------------------------------------------------------------------

def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, chosen_lengths: Tensor, rejected_lengths: Tensor,
             beta: float = 0.1) -> LossOutput:
    r"""Identity Preference Optimization.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv:2310.12036), Eq. 17, with tau = ``beta``:

        loss = (h - 1 / (2 * beta))^2

    a squared regression of the log-ratio difference h onto the fixed target 1/(2 beta), so,
    unlike DPO, the loss does not keep pushing h upwards on already-separated pairs.

    What hcx does (the same as TRL's ``loss_type="ipo"``): h is computed from log-ratios
    **averaged over completion tokens**,

        h = (log pi(y_w) - log pi_ref(y_w)) / |y_w| - (log pi(y_l) - log pi_ref(y_l)) / |y_l|

    because with summed log-probs the square grows with completion length and no single beta
    suits short and long answers; TRL confirmed this normalisation with the IPO authors. The
    lengths are therefore required: ``chosen_lengths`` / ``rejected_lengths`` are the number
    of completion tokens of each sequence (clamped below at 1, as TRL does). Pass tensors of
    ones to get Eq. 17 on summed log-probs instead.

    The reward metrics stay beta * (summed log-ratio), as in TRL's logs.
    """
    policy_chosen_logps = upcast(policy_chosen_logps)
    policy_rejected_logps = upcast(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - constant(ref_chosen_logps)
    rejected_logratios = policy_rejected_logps - constant(ref_rejected_logps)
    n_chosen = upcast(chosen_lengths.detach()).clamp(min=1.0)
    n_rejected = upcast(rejected_lengths.detach()).clamp(min=1.0)
    h = chosen_logratios / n_chosen - rejected_logratios / n_rejected

    losses = (h - 1.0 / (2.0 * beta)) ** 2
    metrics = _paired_metrics(beta * chosen_logratios, beta * rejected_logratios,
                              policy_chosen_logps, policy_rejected_logps)
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# 3. KTO (unpaired)
# ---------------------------------------------------------------------------------------------

def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor, *,
                        reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    r"""KTO's reference point z0: a batch estimate of KL(policy || reference), as in TRL.

        z0 = max(0, mean_j [log pi(y'_j | x_j) - log pi_ref(y'_j | x_j)])

    computed on *mismatched* pairs: each prompt x_j paired with the completion y'_j of another
    example in the batch (TRL rotates completions by one position within the batch:
    y'_j = y_{j-1}, wrapping around). Mismatched completions are close to unconditioned
    samples, so their mean log-ratio estimates the KL term of the KTO value function without
    sampling from the policy. Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization" (arXiv:2402.01306).

    z0 is detached: it is a baseline, not something to optimise (the paper does not
    back-propagate through it). ``reduce`` is applied to the local mean before clamping; pass
    an all-reduce average across data-parallel ranks to get TRL's global estimate (TRL
    averages per-rank means, then clamps). Compute the policy side under ``torch.no_grad()``
    to save memory; it is detached anyway.

    Returns a 0-dim tensor. An empty batch gives z0 = 0.
    """
    if policy_kl_logps.numel() == 0:
        return torch.zeros((), dtype=upcast(policy_kl_logps).dtype, device=policy_kl_logps.device)
    kl = (upcast(policy_kl_logps.detach()) - constant(ref_kl_logps)).mean()
    if reduce is not None:
        kl = reduce(kl)
    return kl.clamp(min=0.0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor,
             reference_point: Tensor | float, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    r"""Kahneman-Tversky Optimization: learns from unpaired "good"/"bad" labels.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv:2402.01306), the KTO loss. With the log-ratio r = log pi(y|x) - log pi_ref(y|x) and
    the reference point z0 (``reference_point``, from :func:`kto_reference_point`):

        desirable:    loss = lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  loss = lambda_U * (1 - sigmoid(beta * (z0 - r)))

    ``desirable`` is a boolean tensor [batch]. lambda_D = ``desirable_weight`` and
    lambda_U = ``undesirable_weight`` balance the two kinds of feedback; the paper recommends
    lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] when the counts n_D, n_U differ.
    Pass ``reference_point=0.0`` for the variant without a KL term (TRL's
    ``calculate_KL=False``).

    ``losses`` keeps the input order (TRL concatenates desirable then undesirable rows; the
    mean is the same). The metrics add ``kl`` (= z0); ``rewards/accuracies`` counts a
    desirable reward above beta * z0, or an undesirable one below it, as correct.
    """
    policy_logps = upcast(policy_logps)
    desirable = _as_bool(desirable, policy_logps)
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype,
                         device=policy_logps.device).detach()
    logratios = policy_logps - constant(ref_logps)

    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)

    metrics = _unpaired_metrics(beta * logratios, policy_logps, desirable, beta * z0)
    metrics["kl"] = z0.float()
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# 4. BCO (unpaired) and its running reward shift
# ---------------------------------------------------------------------------------------------

class RunningMean:
    """BCO's reward shift delta: the mean of every implicit reward seen so far.

    This is the only state of the BCO loss, kept outside :func:`bco_loss` so the loss stays a
    pure function and the state can go into checkpoints (``state_dict`` /
    ``load_state_dict``); resuming without it would restart delta at 0 and jolt the loss.

    It is a cumulative, count-weighted mean (TRL's ``RunningMoments.mean``), not an
    exponential moving average. In each training step, update it with the batch's rewards
    *before* computing the loss, as TRL does::

        rewards = beta * (policy_logps - ref_logps).detach()
        delta = running.update(rewards)   # all-gather rewards first under data parallelism
        losses, metrics = bco_loss(policy_logps, ref_logps, desirable, delta, beta=beta)

    Under data parallelism, pass the rewards gathered from every rank so all ranks keep the
    same delta. Do not update it during evaluation.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, values: Tensor) -> float:
        """Fold ``values`` into the mean and return the new mean. Syncs with the device
        (``.item()``): delta is a Python float so it can be stored as plain JSON."""
        n = values.numel()
        if n == 0:
            return self.mean
        batch_mean = values.detach().double().mean().item()
        self.count += n
        self.mean += (batch_mean - self.mean) * n / self.count
        return self.mean

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.mean = float(state["mean"])
        self.count = int(state["count"])


def bco_udm_weights(prob_desirable: Tensor, desirable: Tensor, *, min_ratio: float = 0.5,
                    max_ratio: float = 10.0) -> Tensor:
    r"""Per-example weights for BCO's underlying-distribution matching (UDM).

    When desirable and undesirable feedback come from different prompt distributions, BCO
    re-weights each *undesirable* example by the density ratio
    p(x | desirable) / p(x | undesirable) of its prompt x, estimated with a binary classifier:

        w = clamp(p / (1 - p), min_ratio, max_ratio),   p = P(desirable | embed(x))

    Desirable examples get weight 1. How p is obtained (TRL's recipe): embed a sample of
    desirable and undesirable prompts (TRL: 1024 each) with a frozen sentence-embedding model,
    fit a logistic-regression classifier (class_weight="balanced") once before training, and
    read p from its ``predict_proba`` for each batch's prompts. This function only turns the
    probabilities into weights (with TRL's 1e-8 guard and default clamp range).
    """
    desirable = _as_bool(desirable, prob_desirable)
    p = upcast(prob_desirable.detach())
    ratio = (p / (1.0 - p + 1e-8)).clamp(min=min_ratio, max=max_ratio)
    return torch.where(desirable, torch.ones_like(ratio), ratio)


def bco_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, delta: Tensor | float,
             *, beta: float = 0.1, udm_weights: Tensor | None = None) -> LossOutput:
    r"""Binary Classifier Optimization: learns from unpaired "good"/"bad" labels.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
    (arXiv:2404.04656). The implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)) is
    the logit of a binary classifier "is this completion desirable?", trained with binary
    cross-entropy after shifting by delta:

        desirable:    loss = -log sigmoid(r - delta)
        undesirable:  loss = -log sigmoid(-(r - delta))

    The paper shows this BCE bounds the DPO loss from above, and that shifting the rewards by
    their mean tightens the bound; delta (``delta``) is that mean, a running mean of all
    rewards so far (keep it in a :class:`RunningMean`).

    ``udm_weights`` (shape [batch], default all ones) multiplies each example's loss, for
    underlying-distribution matching: build it with :func:`bco_udm_weights`.

    ``losses`` keeps the input order (TRL concatenates desirable then undesirable rows). The
    metrics add ``delta``; ``rewards/accuracies`` counts a desirable reward above delta, or
    an undesirable one below it, as correct.
    """
    policy_logps = upcast(policy_logps)
    desirable = _as_bool(desirable, policy_logps)
    delta = torch.as_tensor(delta, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    rewards = beta * (policy_logps - constant(ref_logps))

    # -log sigmoid(s * (r - delta)) with s = +1 for desirable rows, -1 for undesirable ones
    sign = torch.where(desirable, 1.0, -1.0).to(policy_logps.dtype)
    losses = -F.logsigmoid(sign * (rewards - delta))
    if udm_weights is not None:
        losses = losses * upcast(udm_weights.detach())

    metrics = _unpaired_metrics(rewards, policy_logps, desirable, delta)
    metrics["delta"] = delta.float()
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# 5. ORPO (reference-free)
# ---------------------------------------------------------------------------------------------

def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *,
              chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float = 0.1,
              sft_reduction: Literal["token", "sequence"] = "token",
              sft_logps: Tensor | None = None, sft_lengths: Tensor | None = None) -> LossOutput:
    r"""Odds Ratio Preference Optimization: SFT plus an odds-ratio penalty, no reference model.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (arXiv:2403.07691), Eq. 6-7. On the *average per-token* log-prob of each completion,
    logp_avg(y) = log pi(y|x) / |y|, the log odds are

        log odds(y) = logp_avg(y) - log(1 - exp(logp_avg(y)))

    (computed with :func:`log1mexp`), and

        loss = L_SFT - beta * log sigmoid(log odds(y_w) - log odds(y_l))

    with ``beta`` the paper's lambda (TRL's ``ORPOConfig.beta``, default 0.1).

    Inputs are summed log-probs like everywhere in this module; ``chosen_lengths`` /
    ``rejected_lengths`` are the completion token counts that turn them into averages.

    L_SFT is the negative log-likelihood of the chosen sequence, averaged per token. By
    default (the paper's L_SFT) it is computed on the chosen completion, from
    ``policy_chosen_logps`` / ``chosen_lengths``. TRL computes it over the *whole* chosen
    sequence, prompt tokens included; to match TRL exactly, pass that summed log-prob as
    ``sft_logps`` and its number of predicted tokens as ``sft_lengths``. ``sft_reduction``
    says how tokens are averaged:

    * ``"token"`` (default, as TRL: a cross-entropy over the batch): every token weighs the
      same, L_SFT = -sum_i logp_i / sum_i n_i. Example i's share is
      -logp_i * batch / sum_i n_i, so ``losses.mean()`` is exactly that batch loss.
    * ``"sequence"``: every example weighs the same, L_SFT,i = -logp_i / n_i.

    One deviation from TRL, for safety: the averages are clamped at -1e-6 before taking
    the odds. A completion the model is certain of (logp_avg rounds to 0, easy for a short
    one in float32) would otherwise have infinite log odds and a NaN gradient; at -1e-6 its
    odds are already e^13.8, and the clamp only stops pushing them further.

    Metrics (as TRL): the implicit rewards are beta * logp_avg, plus ``nll_loss``,
    ``log_odds_ratio`` (mean log sigmoid of the log-odds difference) and
    ``log_odds_chosen`` (mean log-odds difference). ``logps/*`` are the summed inputs.
    """
    policy_chosen_logps = upcast(policy_chosen_logps)
    policy_rejected_logps = upcast(policy_rejected_logps)
    n_chosen = upcast(chosen_lengths.detach()).clamp(min=1.0)
    n_rejected = upcast(rejected_lengths.detach()).clamp(min=1.0)
    chosen_avg = policy_chosen_logps / n_chosen
    rejected_avg = policy_rejected_logps / n_rejected

    def log_odds_of(avg_logp: Tensor) -> Tensor:
        # log1mexp(0) = -inf: keep the average strictly negative (see the docstring).
        avg_logp = avg_logp.clamp(max=-1e-6)
        return avg_logp - log1mexp(avg_logp)

    log_odds = log_odds_of(chosen_avg) - log_odds_of(rejected_avg)
    log_odds_ratio = F.logsigmoid(log_odds)

    if (sft_logps is None) != (sft_lengths is None):
        raise ValueError("pass both sft_logps and sft_lengths, or neither")
    if sft_logps is None:
        sft_logps, n_sft = policy_chosen_logps, n_chosen
    else:
        sft_logps, n_sft = upcast(sft_logps), upcast(sft_lengths.detach()).clamp(min=1.0)
    if sft_reduction == "token":
        # Scale so that the batch mean of nll is -sum(logps) / sum(tokens).
        nll = -sft_logps * (sft_logps.numel() / n_sft.sum().clamp(min=1.0))
    elif sft_reduction == "sequence":
        nll = -sft_logps / n_sft
    else:
        raise ValueError(f"sft_reduction must be 'token' or 'sequence', not {sft_reduction!r}")
    losses = nll - beta * log_odds_ratio

    metrics = _paired_metrics(beta * chosen_avg, beta * rejected_avg,
                              policy_chosen_logps, policy_rejected_logps)
    put_mean(metrics, "nll_loss", nll)
    put_mean(metrics, "log_odds_ratio", log_odds_ratio)
    put_mean(metrics, "log_odds_chosen", log_odds)
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# 6. Bradley-Terry reward-model loss
# ---------------------------------------------------------------------------------------------

def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, *,
                       margin: Tensor | float | None = None,
                       center_rewards_coefficient: float | None = None) -> LossOutput:
    r"""Pairwise loss for training a scalar reward model.

    The Bradley-Terry model (Bradley & Terry 1952) says P(y_w > y_l) = sigmoid(r_w - r_l);
    its negative log-likelihood, as used for RLHF reward models (Ouyang et al. 2022,
    "Training language models to follow instructions with human feedback", Eq. 1), is

        loss = -log sigmoid(r_w - r_l - m)

    with an optional per-pair ``margin`` m (Llama 2, Touvron et al. 2023: larger for pairs
    the annotators rated as clearly different). ``center_rewards_coefficient`` c adds
    c * (r_w + r_l)^2, which pulls rewards towards mean zero (Eisenstein et al. 2023; TRL's
    ``RewardConfig.center_rewards_coefficient``), since BT only fixes reward differences.

    Inputs here are the reward model's scalar outputs (not log-probs); both sides get
    gradients. Metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``.
    """
    chosen_rewards, rejected_rewards = upcast(chosen_rewards), upcast(rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2

    metrics: dict[str, Tensor] = {}
    put_mean(metrics, "rewards/chosen", chosen_rewards)
    put_mean(metrics, "rewards/rejected", rejected_rewards)
    put_mean(metrics, "rewards/accuracies", (chosen_rewards > rejected_rewards).float())
    put_mean(metrics, "rewards/margins", chosen_rewards - rejected_rewards)
    return losses, metrics
