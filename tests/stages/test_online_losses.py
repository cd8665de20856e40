"""hcx.stages.online_losses: hand-computed advantages and losses, and agreement with TRL 1.5.1.

The TRL tests call TRL's own ``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss`` on
a bare trainer object (no __init__) whose log-prob method returns our tensors. TRL computes
advantages inside its rollout method, which needs models and a tokenizer, so the advantage
references are transcribed from it with the exact lines cited.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from hcx.stages.online_losses import (RewardNormalizer, clip_rewards, group_advantages,
                                      kl_penalized_rewards, per_token_kl, policy_loss,
                                      repeated_ngram_mask, repetition_unlikelihood_loss,
                                      rloo_advantages, rloo_loss)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(tensor: torch.Tensor, expected, tol: float = 1e-9) -> bool:
    return torch.allclose(tensor.double(), torch.as_tensor(expected, dtype=torch.float64),
                          rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------
# Advantages, by hand
# ---------------------------------------------------------------------------------------------

# Two prompts, K = 3: group 0 rewards (1, 2, 6), group 1 rewards (4, 4, 4).
REWARDS = t(1.0, 2.0, 6.0, 4.0, 4.0, 4.0)


def test_group_advantages_hand_computed():
    # group 0: mean 3, unbiased std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7)
    s = math.sqrt(7.0)
    adv, metrics = group_advantages(REWARDS, 3)
    assert close(adv, [-2 / (s + 1e-4), -1 / (s + 1e-4), 3 / (s + 1e-4), 0, 0, 0])
    assert close(metrics["reward"], 21 / 6, 1e-6)
    assert close(metrics["reward_std"], s / 2, 1e-6)  # mean over completions of (s, s, s, 0, 0, 0)
    assert close(metrics["frac_reward_zero_std"], 0.5)

    adv, _ = group_advantages(REWARDS, 3, scale_rewards="none")
    assert close(adv, [-2, -1, 3, 0, 0, 0])

    # batch: centred per group, scaled by the std of all six rewards
    b = REWARDS.std().item()
    adv, _ = group_advantages(REWARDS, 3, scale_rewards="batch")
    assert close(adv, [-2 / (b + 1e-4), -1 / (b + 1e-4), 3 / (b + 1e-4), 0, 0, 0])

    # one completion per prompt: std 0 (TRL's convention), advantages 0
    adv, _ = group_advantages(t(1.0, 5.0), 1)
    assert close(adv, [0.0, 0.0])


def test_rloo_advantages_hand_computed():
    # r_i minus the mean of the other two: 1 - 4, 2 - 3.5, 6 - 1.5; group 1 all zero
    adv, metrics = rloo_advantages(REWARDS, 3)
    assert close(adv, [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    assert close(metrics["frac_reward_zero_std"], 0.5)
    # equal to K/(K-1) times the mean-centred reward
    assert close(adv[:3], 1.5 * (REWARDS[:3] - 3.0))
    adv, _ = rloo_advantages(REWARDS, 3, normalize_advantages=True)
    raw = t(-3.0, -1.5, 4.5, 0.0, 0.0, 0.0)
    assert close(adv, (raw - raw.mean()) / (raw.std() + 1e-4))
    adv, _ = rloo_advantages(t(1.0, 5.0), 1)
    assert close(adv, [0.0, 0.0])


def test_reward_clipping_and_kl_penalty():
    assert close(clip_rewards(t(-3.0, 0.5, 9.0), (-1.0, 2.0)), [-1.0, 0.5, 2.0])
    assert close(clip_rewards(t(-3.0, 9.0), None), [-3.0, 9.0])
    with pytest.raises(ValueError):
        clip_rewards(t(1.0), (2.0, 1.0))
    # KL summed over the completion's tokens only: row 0: (0.5 + 0.25), row 1: 1.0 (pad ignored)
    old = t(-1.0, -2.0, -3.0, -1.0, -9.0, -9.0).view(2, 3)
    ref = t(-1.5, -2.25, -3.0, -2.0, 0.0, 0.0).view(2, 3)
    mask = t(1, 1, 1, 1, 0, 0).view(2, 3)
    assert close(kl_penalized_rewards(t(1.0, 1.0), old, ref, mask, beta=0.1),
                 [1.0 - 0.1 * 0.75, 1.0 - 0.1 * 1.0])


def test_reward_normalizer_whitens_clips_and_round_trips():
    norm = RewardNormalizer(clip=1.5)
    # before any update: the batch's own statistics (mean 2, population std sqrt(2/3))
    x = t(1.0, 2.0, 3.0)
    s = math.sqrt(2 / 3)
    assert close(norm(x), [-1 / s, 0.0, 1 / s], 1e-6)  # 1/s = 1.22 < 1.5: not clipped
    norm.update(x)
    norm.update(t(10.0))  # running stats over (1, 2, 3, 10): mean 4, var (9+4+1+36)/4 = 12.5
    assert norm.count == 4 and norm.mean == pytest.approx(4.0)
    assert norm.std == pytest.approx(math.sqrt(12.5))
    assert close(norm(t(4.0, 100.0, -100.0)), [0.0, 1.5, -1.5], 1e-6)  # clipped at +-1.5
    copy = RewardNormalizer(clip=1.5)
    copy.load_state_dict(norm.state_dict())
    assert close(copy(t(7.0)), norm(t(7.0)))


# ---------------------------------------------------------------------------------------------
# Policy loss, by hand
# ---------------------------------------------------------------------------------------------


def test_per_token_kl_estimators():
    logp, ref = t(-1.0), t(-1.5)  # d = ref - logp = -0.5
    assert close(per_token_kl(logp, ref), math.exp(-0.5) + 0.5 - 1.0)
    assert close(per_token_kl(logp, ref, estimator="k1"), 0.5)
    assert close(per_token_kl(logp, ref, estimator="k2"), 0.125)


def test_policy_loss_hand_computed():
    # Two completions, T = 3; row 1 has 2 tokens. Advantages +1 and -2, eps = 0.2.
    logps = t(-1.0, -1.0, -1.0, -2.0, -2.0, 0.0).view(2, 3).requires_grad_()
    old = t(-1.0, -1.5, -0.5, -2.0, -1.5, 0.0).view(2, 3)
    mask = t(1, 1, 1, 1, 1, 0).view(2, 3)
    adv = t(1.0, -2.0)
    # ratios: row 0: 1, e^0.5 = 1.65 (A > 0: clipped at 1.2), e^-0.5 = 0.61 (A > 0: unclipped)
    #         row 1: 1, e^-0.5 = 0.61 (A < 0: min(-1.21, -1.6) = clipped at 0.8 -> -(0.8 * -2))
    r = math.exp(-0.5)
    tok = [[-1.0, -1.2, -r], [2.0, 1.6, 0.0]]
    s0, s1 = sum(tok[0]), sum(tok[1])
    losses, metrics = policy_loss(logps, old, adv, mask, loss_type="grpo")
    assert close(losses, [s0 / 3, s1 / 2])
    losses, _ = policy_loss(logps, old, adv, mask, loss_type="bnpo")
    assert close(losses.mean(), (s0 + s1) / 5)
    losses, _ = policy_loss(logps, old, adv, mask, loss_type="dapo")
    assert close(losses.mean(), (s0 + s1) / 5)
    # dapo with the optimisation batch's mean length (say 4 tokens per completion)
    losses, _ = policy_loss(logps, old, adv, mask, loss_type="dapo", mean_completion_tokens=4.0)
    assert close(losses, [s0 / 4, s1 / 4])
    losses, _ = policy_loss(logps, old, adv, mask, loss_type="dr_grpo", max_completion_length=8)
    assert close(losses, [s0 / 8, s1 / 8])
    # clipping metrics over the 5 real tokens: one high-clipped (row 0 t1), one low (row 1 t1)
    assert close(metrics["clip_ratio/high_mean"], 0.2, 1e-7)
    assert close(metrics["clip_ratio/low_mean"], 0.2, 1e-7)
    assert close(metrics["clip_ratio/region_mean"], 0.4, 1e-7)
    assert close(metrics["completions/mean_length"], 2.5)
    assert "kl" not in metrics

    # gradient: only unclipped tokens push; d/dlogp of -(rho A) is -rho A
    losses, _ = policy_loss(logps, old, adv, mask, loss_type="grpo")
    losses.mean().backward()
    assert close(logps.grad, [[-1 / 6, 0.0, -r / 6], [2.0 / 4, 0.0, 0.0]])  # A = -2, 2 tokens


def test_policy_loss_kl_term_and_delta():
    logps = t(-1.0, -2.0).view(1, 2)
    ref = t(-1.5, -1.0).view(1, 2)
    mask = t(1, 1).view(1, 2)
    beta = 0.04
    kl = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    # on-policy (old = None): ratio 1, token loss -A + beta * kl
    losses, metrics = policy_loss(logps, None, t(0.5), mask, ref_logps=ref, beta=beta,
                                  loss_type="grpo")
    assert close(losses, [(-0.5 + beta * kl[0] - 0.5 + beta * kl[1]) / 2])
    assert close(metrics["kl"], sum(kl) / 2, 1e-7)
    # the KL metric is reported with beta = 0 too, but not added to the loss
    losses, metrics = policy_loss(logps, None, t(0.5), mask, ref_logps=ref, loss_type="grpo")
    assert close(losses, [-0.5]) and "kl" in metrics
    # delta caps the unclipped ratio: rho = e^1 with A < 0 -> loss = -(min(e, 1.5) * -1)
    losses, _ = policy_loss(t(0.0).view(1, 1), t(-1.0).view(1, 1), t(-1.0), t(1).view(1, 1),
                            delta=1.5, loss_type="grpo")
    assert close(losses, [1.5])
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, None, t(0.5), mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, None, t(0.5), mask, loss_type="dr_grpo")


def test_policy_loss_ignores_padding_values_and_upcasts():
    logps = t(-1.0, -1.0, -1.0).view(1, 3)
    mask = t(1, 1, 0).view(1, 3)
    a, _ = policy_loss(logps, logps - 0.1, t(1.0), mask, loss_type="grpo")
    wild = logps.clone()
    wild[0, 2] = 50.0  # a pad position holding garbage
    b, _ = policy_loss(wild, logps - 0.1, t(1.0), mask, loss_type="grpo")
    assert close(a, b)
    losses, metrics = policy_loss(logps.bfloat16(), None, t(1.0).bfloat16(), mask.bool(),
                                  loss_type="dapo")
    assert losses.dtype == torch.float32
    assert metrics["clip_ratio/region_mean"].dtype == torch.float32


def test_rloo_loss_hand_computed():
    policy, old, adv = t(-10.0, -12.0, -5.0), t(-10.5, -11.0, -5.0), t(2.0, -1.0, 0.5)
    losses, metrics = rloo_loss(policy, old, adv)
    e = math.exp
    # row 0: rho e^0.5 > 1.2, A > 0 -> clipped 1.2 * 2; row 1: rho e^-1 < 0.8, A < 0 -> 0.8
    assert close(losses, [-min(e(0.5) * 2, 1.2 * 2), -min(e(-1) * -1, 0.8 * -1), -0.5])
    assert close(metrics["clip_ratio/high_mean"], 1 / 3, 1e-7)
    assert close(metrics["clip_ratio/low_mean"], 1 / 3, 1e-7)


def test_repeated_ngram_mask_and_unlikelihood():
    # n = 2: "5 6" first at 0-1, again at 3-4 (starts after the first ends): marked.
    # "6 7" at 1-2 vs ... no repeat; overlapping "1 1 1": "1 1" at 6-7, again at 7-8 overlaps
    # (not entirely before), at 8-9 its earlier copy 6-7 ends before 8: marked.
    ids = [[5, 6, 7, 5, 6, 9, 1, 1, 1, 1, 0, 0]]
    mask = [[1] * 10 + [0, 0]]
    marked = repeated_ngram_mask(ids, mask, n=2)
    assert marked.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0]]
    # padding (the trailing zeros would form a repeated "0 0" n-gram) is never marked
    assert repeated_ngram_mask([[3, 3, 3, 3]], [[1, 1, 0, 0]], n=1).tolist() == [[0, 1, 0, 0]]

    logps = torch.full((1, 12), math.log(0.25), dtype=torch.float64, requires_grad=True)
    losses, metrics = repetition_unlikelihood_loss(logps, marked, torch.tensor(mask))
    assert close(losses, [-4 * math.log(0.75)])
    assert close(metrics["unlikelihood/repeat_fraction"], 0.4, 1e-7)
    losses.sum().backward()
    # d/dlogp of -log(1 - e^logp) = p / (1 - p) = 1/3 on marked tokens, 0 elsewhere
    assert close(logps.grad, marked.double() / 3)
    # a certain token stays finite
    sure = torch.zeros(1, 12, dtype=torch.float64)
    assert torch.isfinite(repetition_unlikelihood_loss(sure, marked, torch.tensor(mask))[0]).all()


# ---------------------------------------------------------------------------------------------
# Agreement with TRL 1.5.1
# ---------------------------------------------------------------------------------------------

TOL = 1e-6
CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                      gather_for_metrics=lambda x: x, num_processes=1, process_index=0,
                      use_distributed=False, is_main_process=True)


@pytest.fixture(scope="module")
def trl():
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.5.1":
        pytest.skip(f"TRL comparisons are written against trl==1.5.1; found {trl.__version__}")
    return trl


def bare(cls, **attrs):
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


def rollout(seed: int, batch: int = 6, width: int = 7):
    """Random per-token log-probs (policy, old, reference), a ragged mask and advantages."""
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(batch, width, generator=g, dtype=torch.float64)
    old = logps + 0.4 * torch.randn(batch, width, generator=g, dtype=torch.float64)
    ref = logps + 0.6 * torch.randn(batch, width, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    return logps, old, ref, mask, adv


def trl_grpo_loss(trl, logps, old, ref, mask, adv, *, loss_type, beta, epsilon, epsilon_high,
                  delta=None, level="token", max_completion_length=16, bias_kl=False):
    """TRL's GRPOTrainer._compute_loss on our tensors: returns loss and logged metrics."""
    batch, width = logps.shape
    inputs = {"prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
              "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
              "completion_ids": torch.zeros(batch, width, dtype=torch.long),
              "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    trainer = bare(
        trl.GRPOTrainer, model=SimpleNamespace(training=False), accelerator=CPU,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps)),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon_high, use_vllm=False, max_completion_length=max_completion_length,
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=bias_kl),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    loss = trl.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,epsilon_high,delta,level", [
    (0.0, 0.2, None, "token"),
    (0.04, 0.28, None, "token"),
    (0.04, 0.28, 1.6, "token"),
    (0.1, 0.2, None, "sequence"),
])
def test_policy_loss_matches_trl_grpo(trl, loss_type, beta, epsilon_high, delta, level):
    logps, old, ref, mask, adv = rollout(seed=len(loss_type) + int(100 * beta))
    ours_in = logps.clone().requires_grad_()
    theirs_in = logps.clone().requires_grad_()
    losses, metrics = policy_loss(ours_in, old, adv, mask, ref_logps=ref, beta=beta,
                                  epsilon=0.2, epsilon_high=epsilon_high, delta=delta,
                                  loss_type=loss_type, max_completion_length=16,
                                  importance_sampling_level=level)
    trl_loss, trl_metrics = trl_grpo_loss(trl, theirs_in, old, ref, mask, adv,
                                          loss_type=loss_type, beta=beta, epsilon=0.2,
                                          epsilon_high=epsilon_high, delta=delta, level=level)
    assert abs(losses.mean().item() - trl_loss.item()) < TOL
    losses.mean().backward()
    trl_loss.backward()
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=0, atol=TOL)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert abs(metrics[key].item() - trl_metrics[key]) < TOL, key
    if beta:
        assert abs(metrics["kl"].item() - trl_metrics["kl"]) < TOL


def test_bias_corrected_kl_matches_trl(trl):
    logps, old, ref, mask, adv = rollout(seed=7)
    losses, metrics = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=0.05,
                                  use_bias_correction_kl=True, loss_type="dapo")
    trl_loss, trl_metrics = trl_grpo_loss(trl, logps, old, ref, mask, adv, loss_type="dapo",
                                          beta=0.05, epsilon=0.2, epsilon_high=0.2,
                                          bias_kl=True)
    assert abs(losses.mean().item() - trl_loss.item()) < TOL
    assert abs(metrics["kl"].item() - trl_metrics["kl"]) < TOL


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl_formula(scale_rewards):
    # Transcribed from trl==1.5.1 trl/trainer/grpo_trainer.py, GRPOTrainer.
    # _generate_and_score_completions, lines 2145-2167 (multi_objective_aggregation =
    # "sum_then_normalize", one reward function of weight 1).
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    rewards[4:8] = 0.7  # a group with zero spread
    k = 4
    mean_grouped = rewards.view(-1, k).mean(dim=1).repeat_interleave(k, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = rewards.view(-1, k).std(dim=1).repeat_interleave(k, dim=0)
    else:
        std_rewards = rewards.std().expand_as(rewards)
    expected = rewards - mean_grouped
    if scale_rewards != "none":
        expected = expected / (std_rewards + 1e-4)
    adv, metrics = group_advantages(rewards, k, scale_rewards=scale_rewards)
    assert close(adv, expected, 1e-12)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    assert close(metrics["frac_reward_zero_std"], is_std_zero.float().mean(), 1e-7)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl_formula(normalize):
    # Transcribed from trl==1.5.1 trl/trainer/rloo_trainer.py, RLOOTrainer.
    # _generate_and_score_completions, lines 1273-1302: clip, subtract beta * summed k1 KL,
    # leave-one-out baseline, optional batch normalisation.
    g = torch.Generator().manual_seed(5)
    rewards = 3 * torch.randn(8, generator=g, dtype=torch.float64)
    logps, old, ref, mask, _ = rollout(seed=11, batch=8)
    k, beta, clip = 4, 0.05, (-2.0, 2.5)
    r = rewards.clamp(min=clip[0], max=clip[1])
    r = r - beta * ((old - ref) * mask).sum(-1)
    grouped = r.view(-1, k)
    baselines = ((grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)).view(-1)
    expected = r - baselines
    if normalize:
        expected = (expected - expected.mean()) / (expected.std() + 1e-4)

    ours = kl_penalized_rewards(clip_rewards(rewards, clip), old, ref, mask, beta=beta)
    adv, _ = rloo_advantages(ours, k, normalize_advantages=normalize)
    assert close(adv, expected, 1e-12)


def test_rloo_loss_matches_trl(trl):
    logps, old, _, mask, adv = rollout(seed=13)
    old_seq = (old * mask).sum(1)
    batch, width = logps.shape
    ours_in = logps.clone().requires_grad_()
    theirs_in = logps.clone().requires_grad_()
    inputs = {"prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
              "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
              "completion_ids": torch.zeros(batch, width, dtype=torch.long),
              "completion_mask": mask, "advantages": adv, "old_logps": old_seq}
    trainer = bare(
        trl.RLOOTrainer, model=SimpleNamespace(training=False), accelerator=CPU,
        _get_per_token_logps_and_entropies=lambda *a, **k: (theirs_in,
                                                             torch.zeros_like(theirs_in)),
        epsilon_low=0.2, epsilon_high=0.28,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trl_loss = trl.RLOOTrainer._compute_loss(trainer, None, inputs)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    losses, metrics = rloo_loss((ours_in * mask).sum(1), old_seq, adv, epsilon_high=0.28)
    assert abs(losses.mean().item() - trl_loss.item()) < TOL
    losses.mean().backward()
    trl_loss.backward()
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=0, atol=TOL)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert abs(metrics[key].item() - trl_metrics[key]) < TOL, key


def test_empty_batch_and_all_padding():
    empty = torch.zeros(0, 4, dtype=torch.float64)
    losses, metrics = policy_loss(empty, None, torch.zeros(0), empty, loss_type="grpo")
    assert losses.shape == (0,) and metrics == {}
    padded = torch.zeros(2, 3, dtype=torch.float64)
    losses, metrics = policy_loss(padded, None, t(1.0, -1.0), padded, loss_type="dapo")
    assert close(losses, [0.0, 0.0]) and close(metrics["clip_ratio/region_mean"], 0.0)
    adv, metrics = group_advantages(t(), 4)
    assert adv.shape == (0,) and "reward" not in metrics
