"""hcx.stages.losses: hand-computed values, gradient flow, edge cases, and agreement with TRL.

The hand-computed tests spell out the arithmetic with math.log/math.exp so a reader can
check each number. The TRL tests call TRL's own loss code (pinned as trl==1.5.1 in the test
extras: the last release that still has KTO's and BCO's loss methods) on identical inputs.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from hcx.stages.losses import (RunningMean, bco_loss, bco_udm_weights, bradley_terry_loss, dpo_loss,
                        ipo_loss, kto_loss, kto_reference_point, log1mexp, orpo_loss)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(tensor: torch.Tensor, expected: list[float] | float, tol: float = 1e-9) -> bool:
    return torch.allclose(tensor.double(), torch.tensor(expected, dtype=torch.float64),
                          rtol=0, atol=tol)


# Two preference pairs, summed log-probs (policy and reference).
#   pair 0: chosen log-ratio  -10 - (-10.5) =  0.5, rejected  -11 - (-10) = -1  ->  h =  1.5
#   pair 1: chosen log-ratio  -12 - (-11)   = -1,   rejected   -9 - (-10) =  1  ->  h = -2
PC, PR, RC, RR = t(-10.0, -12.0), t(-11.0, -9.0), t(-10.5, -11.0), t(-10.0, -10.0)


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------

def test_dpo_hand_computed():
    losses, metrics = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert close(losses, [-math.log(sigmoid(0.1 * 1.5)), -math.log(sigmoid(0.1 * -2.0))])
    # rewards = beta * log-ratio
    assert close(metrics["rewards/chosen"], (0.05 + -0.1) / 2, 1e-7)
    assert close(metrics["rewards/rejected"], (-0.1 + 0.1) / 2, 1e-7)
    assert close(metrics["rewards/accuracies"], 0.5)  # pair 0 right, pair 1 wrong
    assert close(metrics["rewards/margins"], (0.15 + -0.2) / 2, 1e-7)
    assert close(metrics["logps/chosen"], -11.0) and close(metrics["logps/rejected"], -10.0)
    assert "kl" not in metrics

    # Conservative DPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    eps = 0.2
    losses, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=eps)
    assert close(losses, [
        -(1 - eps) * math.log(sigmoid(0.15)) - eps * math.log(sigmoid(-0.15)),
        -(1 - eps) * math.log(sigmoid(-0.2)) - eps * math.log(sigmoid(0.2)),
    ])


def test_ipo_hand_computed():
    # Log-ratios averaged over completion tokens: pair 0 has 5 chosen / 2 rejected tokens,
    # pair 1 has 4 / 4.  h0 = 0.5/5 - (-1)/2 = 0.6,  h1 = -1/4 - 1/4 = -0.5.
    beta = 0.5  # target 1 / (2 beta) = 1
    losses, metrics = ipo_loss(PC, PR, RC, RR, chosen_lengths=t(5, 4), rejected_lengths=t(2, 4),
                               beta=beta)
    assert close(losses, [(0.6 - 1.0) ** 2, (-0.5 - 1.0) ** 2])
    assert close(metrics["rewards/chosen"], (0.5 * 0.5 + 0.5 * -1.0) / 2)  # summed log-ratios

    # Lengths of one give the paper's Eq. 17 on summed log-probs.
    losses, _ = ipo_loss(PC, PR, RC, RR, chosen_lengths=t(1, 1), rejected_lengths=t(1, 1),
                         beta=beta)
    assert close(losses, [(1.5 - 1.0) ** 2, (-2.0 - 1.0) ** 2])


def test_kto_hand_computed():
    # Mismatched pairs: log-ratios 0.3, -0.1, 0.4 -> z0 = mean = 0.2 (positive, kept).
    z0 = kto_reference_point(t(-5.0, -6.0, -7.0), t(-5.3, -5.9, -7.4))
    assert close(z0, 0.2)
    # Three completions, log-ratios r = 1.0, -0.5, 2.0; rows 0 and 2 desirable.
    policy, ref, desirable = t(-9.0, -10.5, -8.0), t(-10.0, -10.0, -10.0), torch.tensor([1, 0, 1])
    beta, lam_d, lam_u = 0.5, 1.0, 1.5
    losses, metrics = kto_loss(policy, ref, desirable, z0, beta=beta, desirable_weight=lam_d,
                               undesirable_weight=lam_u)
    assert close(losses, [
        lam_d * (1 - sigmoid(beta * (1.0 - 0.2))),
        lam_u * (1 - sigmoid(beta * (0.2 - -0.5))),
        lam_d * (1 - sigmoid(beta * (2.0 - 0.2))),
    ])
    assert close(metrics["kl"], 0.2, 1e-7)
    assert close(metrics["rewards/chosen"], beta * (1.0 + 2.0) / 2, 1e-7)
    assert close(metrics["rewards/rejected"], beta * -0.5, 1e-7)
    assert close(metrics["rewards/margins"], beta * 1.5 + beta * 0.5, 1e-7)
    # accurate: desirable reward above beta*z0 (both), undesirable below it (yes)
    assert close(metrics["rewards/accuracies"], 1.0)


def test_kto_reference_point_is_detached_clamped_and_reducible():
    policy_kl = t(-5.0, -6.0).requires_grad_()
    z0 = kto_reference_point(policy_kl, t(-4.0, -5.0))  # mean log-ratio -1 -> clamped to 0
    assert z0.item() == 0.0 and not z0.requires_grad
    # `reduce` sees the local mean before the clamp (e.g. an all-reduce average across ranks)
    z0 = kto_reference_point(policy_kl, t(-4.0, -5.0), reduce=lambda kl: kl + 3.0)
    assert close(z0, 2.0)
    assert kto_reference_point(t(), t()).item() == 0.0  # empty batch


def test_bco_hand_computed():
    # rewards = beta * log-ratio = 0.5 * (1.0, -0.5, 2.0) = (0.5, -0.25, 1.0); row 1 undesirable
    policy, ref, desirable = t(-9.0, -10.5, -8.0), t(-10.0, -10.0, -10.0), torch.tensor([1, 0, 1])
    running = RunningMean()
    delta = running.update(0.5 * (policy - ref))
    assert delta == pytest.approx((0.5 - 0.25 + 1.0) / 3)
    losses, metrics = bco_loss(policy, ref, desirable, delta, beta=0.5)
    assert close(losses, [
        -math.log(sigmoid(0.5 - delta)),
        -math.log(sigmoid(-(-0.25 - delta))),
        -math.log(sigmoid(1.0 - delta)),
    ])
    assert close(metrics["delta"], delta, 1e-7)
    # accurate: 0.5 and 1.0 (desirable) lie above delta = 0.4167, -0.25 (undesirable) below
    assert close(metrics["rewards/accuracies"], 1.0)

    # UDM: the undesirable row is weighted by p/(1-p) of its prompt, clamped to [0.5, 10]
    weights = bco_udm_weights(t(0.99, 0.8, 0.1), desirable)
    assert close(weights, [1.0, 0.8 / (0.2 + 1e-8), 1.0])
    assert close(bco_udm_weights(t(0.99, 0.01), torch.tensor([0, 0])), [10.0, 0.5])  # clamped
    weighted, _ = bco_loss(policy, ref, desirable, delta, beta=0.5, udm_weights=weights)
    assert close(weighted, losses * weights)


def test_running_mean_accumulates_and_round_trips_through_a_checkpoint():
    running = RunningMean()
    assert running.update(t(1.0, 2.0, 3.0)) == pytest.approx(2.0)
    assert running.update(t(10.0)) == pytest.approx((1 + 2 + 3 + 10) / 4)  # count-weighted
    assert running.update(t()) == pytest.approx(4.0)  # empty batch changes nothing
    state = json.loads(json.dumps(running.state_dict()))  # plain JSON-able numbers
    restored = RunningMean()
    restored.load_state_dict(state)
    assert restored.mean == running.mean and restored.count == 4
    assert restored.update(t(-4.0)) == pytest.approx((16 - 4) / 5)


def test_orpo_hand_computed():
    # Average per-token log-probs: chosen -2/2 = -1, rejected -6/3 = -2.
    # log odds(p) = log p - log(1 - p):  with p = e^-1 and e^-2
    chosen, rejected = t(-2.0), t(-6.0)
    log_odds = (-1.0 - math.log(1 - math.exp(-1.0))) - (-2.0 - math.log(1 - math.exp(-2.0)))
    beta = 0.1
    losses, metrics = orpo_loss(chosen, rejected, chosen_lengths=t(2), rejected_lengths=t(3),
                                beta=beta)
    nll = 2.0 / 2  # -(-2) / 2 tokens
    assert close(losses, [nll - beta * math.log(sigmoid(log_odds))])
    assert close(metrics["log_odds_chosen"], log_odds, 1e-6)
    assert close(metrics["rewards/chosen"], beta * -1.0, 1e-7)

    # Two pairs: "token" averages the SFT term over all chosen tokens of the batch,
    # "sequence" averages each sequence first.
    chosen, lengths = t(-2.0, -9.0), t(2, 3)  # 5 tokens, total log-prob -11
    kw = dict(chosen_lengths=lengths, rejected_lengths=t(3, 3), beta=0.0)
    token, _ = orpo_loss(chosen, t(-6.0, -6.0), sft_reduction="token", **kw)
    sequence, _ = orpo_loss(chosen, t(-6.0, -6.0), sft_reduction="sequence", **kw)
    assert close(token.mean(), 11.0 / 5)
    assert close(sequence, [1.0, 3.0])
    # The SFT term can be taken on other log-probs (TRL: prompt + completion).
    sft, _ = orpo_loss(chosen, t(-6.0, -6.0), sft_logps=t(-3.0, -1.0), sft_lengths=t(4, 4), **kw)
    assert close(sft.mean(), 4.0 / 8)


def test_log1mexp_is_accurate_at_both_ends_with_finite_gradients():
    x = t(-1e-10, -1e-3, -0.5, -math.log(2.0), -1.0, -30.0).requires_grad_()
    y = log1mexp(x)
    expected = [math.log(-math.expm1(v)) if v > -math.log(2) else math.log1p(-math.exp(v))
                for v in x.tolist()]
    assert torch.allclose(y, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_orpo_certain_completion_stays_finite():
    # A one-token completion with log-prob 0 would have infinite log odds.
    chosen = t(0.0).requires_grad_()
    losses, _ = orpo_loss(chosen, t(-3.0), chosen_lengths=t(1), rejected_lengths=t(1))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()


def test_bradley_terry_hand_computed():
    chosen, rejected = t(1.0, -0.5), t(0.2, 0.5)
    losses, metrics = bradley_terry_loss(chosen, rejected)
    assert close(losses, [-math.log(sigmoid(0.8)), -math.log(sigmoid(-1.0))])
    assert close(metrics["rewards/accuracies"], 0.5)
    assert close(metrics["rewards/margins"], (0.8 - 1.0) / 2, 1e-7)
    losses, _ = bradley_terry_loss(chosen, rejected, margin=t(0.5, 0.0),
                                   center_rewards_coefficient=0.01)
    assert close(losses, [-math.log(sigmoid(0.8 - 0.5)) + 0.01 * 1.2 ** 2,
                          -math.log(sigmoid(-1.0)) + 0.01 * 0.0 ** 2])


# ---------------------------------------------------------------------------------------------
# Gradients, dtypes and edge cases, for every loss
# ---------------------------------------------------------------------------------------------

DESIRABLE = torch.tensor([True, False])


def call(name: str, policy: list[torch.Tensor], ref: list[torch.Tensor]):
    """Run one loss on two examples; `policy` gets gradients, `ref` must not."""
    n2 = torch.full((len(policy[0]),), 2.0)
    if name == "dpo":
        return dpo_loss(*policy, *ref, label_smoothing=0.1)
    if name == "ipo":
        return ipo_loss(*policy, *ref, chosen_lengths=n2, rejected_lengths=n2)
    if name == "kto":
        z0 = kto_reference_point(policy[0], ref[1])
        return kto_loss(policy[0], ref[0], DESIRABLE[: len(policy[0])], z0)
    if name == "bco":
        return bco_loss(policy[0], ref[0], DESIRABLE[: len(policy[0])], 0.1)
    if name == "orpo":
        return orpo_loss(*policy, chosen_lengths=n2, rejected_lengths=n2)
    if name == "bradley_terry":
        return bradley_terry_loss(*policy)
    raise AssertionError(name)


LOSSES = ["dpo", "ipo", "kto", "bco", "orpo", "bradley_terry"]


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_reach_the_policy_only(name):
    policy = [t(-10.0, -12.0).requires_grad_(), t(-11.0, -9.0).requires_grad_()]
    # The reference is marked as requiring grad on purpose: the losses must detach it.
    ref = [t(-10.5, -11.0).requires_grad_(), t(-10.0, -10.0).requires_grad_()]
    losses, metrics = call(name, policy, ref)
    assert losses.shape == (2,)
    losses.mean().backward()
    used = policy[:1] if name in ("kto", "bco") else policy
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in used)
    assert all(r.grad is None for r in ref)
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


@pytest.mark.parametrize("name", LOSSES)
def test_bfloat16_inputs_are_computed_in_float32(name):
    policy = [t(-10.0, -12.0).bfloat16(), t(-11.0, -9.0).bfloat16()]
    ref = [t(-10.5, -11.0).bfloat16(), t(-10.0, -10.0).bfloat16()]
    losses, _ = call(name, policy, ref)
    assert losses.dtype == torch.float32


@pytest.mark.parametrize("name", LOSSES)
def test_empty_batch(name):
    empty = [torch.zeros(0, requires_grad=True), torch.zeros(0, requires_grad=True)]
    losses, metrics = call(name, empty, [torch.zeros(0), torch.zeros(0)])
    assert losses.shape == (0,)
    assert not any(key.startswith(("rewards/", "logps/")) for key in metrics)
    losses.sum().backward()  # still differentiable


def test_kto_and_bco_with_only_desirable_examples():
    policy, ref, desirable = t(-9.0, -8.0), t(-10.0, -10.0), torch.tensor([True, True])
    losses, metrics = kto_loss(policy, ref, desirable, 0.0, beta=0.1)
    assert close(losses, [1 - sigmoid(0.1 * 1.0), 1 - sigmoid(0.1 * 2.0)])
    assert "rewards/rejected" not in metrics and "rewards/margins" not in metrics
    assert "rewards/chosen" in metrics
    losses, metrics = bco_loss(policy, ref, desirable, 0.0, beta=0.1)
    assert close(losses, [-math.log(sigmoid(0.1)), -math.log(sigmoid(0.2))])
    assert "logps/rejected" not in metrics


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(t(-1.0, -2.0), t(-1.0, -2.0), torch.tensor([True]), 0.0)
    with pytest.raises(ValueError, match="sft_reduction"):
        orpo_loss(t(-1.0), t(-2.0), chosen_lengths=t(1), rejected_lengths=t(1),
                  sft_reduction="mean")
    with pytest.raises(ValueError, match="sft_logps"):
        orpo_loss(t(-1.0), t(-2.0), chosen_lengths=t(1), rejected_lengths=t(1), sft_logps=t(-1.0))


# ---------------------------------------------------------------------------------------------
# Agreement with TRL
# ---------------------------------------------------------------------------------------------
# TRL's losses are methods of its trainers. We build trainer objects with `cls.__new__` (no
# __init__: no model, no dataset) and set only the attributes the loss code reads; when the
# loss lives inside `_compute_loss`, a fake model supplies logits whose log-probs are ours.

TOL = 1e-6
CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                      gather_for_metrics=lambda x: x, use_distributed=False,
                      is_main_process=True)


@pytest.fixture(scope="module")
def trl():
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.5.1":
        pytest.skip(f"TRL comparisons are written against trl==1.5.1 (the test extras pin); "
                    f"found {trl.__version__}")
    return trl


def bare(cls, **attrs):
    """An instance of a TRL trainer class without running __init__, holding `attrs`."""
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


def random_logps(n: int, seed: int, low: float = 5.0, high: float = 60.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -(low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64))


def random_lengths(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 30, (n,), generator=g).double()


def fake_logits(logps: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Logits over a 2-token vocabulary in which label token 0 at each of the first
    `lengths[i]` predicted positions has log-prob logps[i] / lengths[i]: the two logits
    [a, log(1 - e^a)] are the log-probs of a distribution already (they sum to one)."""
    per_token = (logps / lengths).unsqueeze(1).expand(-1, width)
    per_token = torch.where(torch.arange(width) < lengths.unsqueeze(1), per_token, -1.0)
    logits = torch.stack([per_token, log1mexp(per_token)], dim=-1)
    # position p predicts token p+1, so the last position's logits are never read
    return torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)


class FakeLM:
    """A stand-in policy: returns fixed logits whatever the input."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, *args, **kwargs):
        return SimpleNamespace(logits=self.logits)


def trl_dpo(trl, loss_type, pc, pr, rc, rr, n_chosen, n_rejected, beta, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on precomputed reference log-probs. Returns the batch
    loss and TRL's logged metrics."""
    width = int(max(n_chosen.max(), n_rejected.max()))
    lengths = torch.cat([n_chosen, n_rejected])
    logits = fake_logits(torch.cat([pc, pr]), lengths, width)
    completion_mask = torch.cat([torch.zeros(len(lengths), 1),
                                 (torch.arange(width) < lengths.unsqueeze(1)).double()], dim=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask, dtype=torch.long),
              "attention_mask": torch.ones_like(completion_mask, dtype=torch.long),
              "completion_mask": completion_mask.long(),
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    trainer = bare(trl.DPOTrainer, model=SimpleNamespace(training=False), accelerator=CPU,
                   ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                   loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                   label_smoothing=label_smoothing, use_weighting=False,
                   _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                   _total_train_tokens=0, args=SimpleNamespace())
    loss = trl.DPOTrainer._compute_loss(trainer, FakeLM(logits), inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def test_fake_logits_reproduce_the_summed_logps():
    logps, lengths = random_logps(4, 0), random_lengths(4, 1)
    logits = fake_logits(logps, lengths, int(lengths.max()))
    per_token = torch.log_softmax(logits, -1)[:, :-1, 0]
    mask = torch.arange(per_token.shape[1]) < lengths.unsqueeze(1)
    assert torch.allclose((per_token * mask).sum(1), logps, atol=1e-9)


def test_dpo_matches_trl(trl):
    pc, pr, rc, rr = (random_logps(6, s) for s in range(4))
    nc, nr = random_lengths(6, 10), random_lengths(6, 11)
    losses, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
    trl_loss, trl_metrics = trl_dpo(trl, "sigmoid", pc, pr, rc, rr, nc, nr, beta=0.1)
    assert abs(losses.mean().item() - trl_loss.item()) < TOL
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert abs(metrics[key].item() - trl_metrics[key]) < TOL, key
    # per example too: TRL on one pair at a time
    for i in range(6):
        one = slice(i, i + 1)
        trl_loss, _ = trl_dpo(trl, "sigmoid", pc[one], pr[one], rc[one], rr[one], nc[one],
                              nr[one], beta=0.1)
        assert abs(losses[i].item() - trl_loss.item()) < TOL


def test_conservative_dpo_matches_trl(trl):
    # TRL 1.x dropped label smoothing from "sigmoid"; its "aot" loss keeps the cDPO formula on
    # h computed from *sorted* batch log-ratios. On one pair sorting changes nothing, so TRL's
    # "aot" on each pair alone is exactly cDPO.
    pc, pr, rc, rr = (random_logps(5, s) for s in range(20, 24))
    n = torch.full((5,), 4.0)
    losses, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.15)
    for i in range(5):
        one = slice(i, i + 1)
        trl_loss, _ = trl_dpo(trl, "aot", pc[one], pr[one], rc[one], rr[one], n[one], n[one],
                              beta=0.2, label_smoothing=0.15)
        assert abs(losses[i].item() - trl_loss.item()) < TOL


def test_ipo_matches_trl(trl):
    # Small log-prob gaps keep the squared loss O(1), where a 1e-6 tolerance means something.
    pc, pr, rc, rr = (random_logps(6, s, 10.0, 14.0) for s in range(30, 34))
    nc, nr = random_lengths(6, 40), random_lengths(6, 41)
    losses, metrics = ipo_loss(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr, beta=0.1)
    trl_loss, trl_metrics = trl_dpo(trl, "ipo", pc, pr, rc, rr, nc, nr, beta=0.1)
    assert abs(losses.mean().item() - trl_loss.item()) < TOL
    assert abs(metrics["rewards/margins"].item() - trl_metrics["rewards/margins"]) < TOL
    for i in range(6):
        one = slice(i, i + 1)
        trl_loss, _ = trl_dpo(trl, "ipo", pc[one], pr[one], rc[one], rr[one], nc[one], nr[one],
                              beta=0.1)
        assert abs(losses[i].item() - trl_loss.item()) < TOL


@pytest.mark.parametrize("labels", [[1, 0, 0, 1, 1, 0, 1], [1, 1, 1, 1]],
                         ids=["mixed", "all-desirable"])
@pytest.mark.parametrize("kl_shift", [-3.0, 3.0], ids=["z0-clamped", "z0-positive"])
def test_kto_matches_trl(trl, labels, kl_shift):
    from trl.experimental.kto import KTOTrainer

    desirable = torch.tensor(labels, dtype=torch.bool)
    n = len(labels)
    policy, ref = random_logps(n, 50), random_logps(n, 51)
    # Mismatched-pair log-probs; kl_shift > 0 makes the policy likelier than the reference
    # there (z0 > 0), kl_shift < 0 less likely (mean log-ratio < 0, so z0 is clamped to 0).
    policy_kl, ref_kl = random_logps(n, 52, 20, 21) + kl_shift, random_logps(n, 53, 20, 21)
    trainer = bare(KTOTrainer, calculate_KL=True, accelerator=CPU, loss_type="kto", beta=0.1,
                   desirable_weight=1.0, undesirable_weight=1.33)

    trl_losses, trl_chosen_rewards, trl_rejected_rewards, trl_kl = trainer.kto_loss(
        policy[desirable], policy[~desirable], policy_kl, ref[desirable], ref[~desirable], ref_kl)

    z0 = kto_reference_point(policy_kl, ref_kl)
    losses, metrics = kto_loss(policy, ref, desirable, z0, beta=0.1, desirable_weight=1.0,
                               undesirable_weight=1.33)
    assert abs(z0.item() - trl_kl.item()) < TOL and (z0.item() > 0) == (kl_shift > 0)
    # TRL orders the losses desirable-first; the batch mean is what both optimise
    assert torch.allclose(torch.cat([losses[desirable], losses[~desirable]]), trl_losses,
                          rtol=0, atol=TOL)
    assert abs(losses.mean().item() - trl_losses.nanmean().item()) < TOL
    assert abs(metrics["rewards/chosen"].item() - trl_chosen_rewards.mean().item()) < TOL
    if (~desirable).any():
        assert abs(metrics["rewards/rejected"].item() - trl_rejected_rewards.mean().item()) < TOL


@pytest.mark.parametrize("udm", [False, True], ids=["plain", "udm"])
def test_bco_matches_trl_over_several_steps(trl, udm):
    from trl.experimental.bco import BCOTrainer
    from trl.experimental.bco.bco_trainer import RunningMoments

    # TRL turns UDM on when an embedding model and its tokenizer are given
    embedder = object() if udm else None
    trainer = bare(BCOTrainer, beta=0.1, accelerator=CPU, embedding_func=embedder,
                   embedding_tokenizer=embedder,
                   running=RunningMoments(accelerator=CPU),
                   args=SimpleNamespace(min_density_ratio=0.5, max_density_ratio=10.0))
    running = RunningMean()
    for step in range(3):  # delta moves as rewards accumulate
        desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0][: 8 - step], dtype=torch.bool)
        n = len(desirable)
        policy, ref = random_logps(n, 60 + step), random_logps(n, 70 + step)
        prob = torch.rand(n, generator=torch.Generator().manual_seed(80 + step),
                          dtype=torch.float64)
        # TRL asks its prompt classifier for P(desirable | prompt) of the undesirable rows
        trainer._get_chosen_prob = lambda embeddings, p=prob[~desirable]: p

        trl_losses, _, _, trl_delta = trainer.bco_loss(
            policy[desirable], policy[~desirable], ref[desirable], ref[~desirable],
            None, torch.zeros(int((~desirable).sum()), 4))

        delta = running.update(0.1 * (policy - ref))  # same order as TRL: update, then use
        weights = bco_udm_weights(prob, desirable) if udm else None
        losses, metrics = bco_loss(policy, ref, desirable, delta, beta=0.1, udm_weights=weights)
        assert abs(delta - trl_delta.item()) < TOL
        assert torch.allclose(torch.cat([losses[desirable], losses[~desirable]]),
                              trl_losses.double(), rtol=0, atol=TOL)
        assert abs(metrics["delta"].item() - trl_delta.item()) < TOL


def test_orpo_matches_trl(trl):
    """TRL's whole ORPO batch loss (get_batch_loss_metrics): NLL over the chosen prompt +
    completion, plus the odds-ratio term on average completion log-probs."""
    from trl.experimental.orpo import ORPOTrainer

    batch, prompt_len, width = 4, 3, 12
    pc, pr = random_logps(batch, 90, 2, 20), random_logps(batch, 91, 2, 20)
    nc, nr = random_lengths(batch, 92).clamp(max=width), random_lengths(batch, 93).clamp(max=width)
    prompt_logps = random_logps(batch, 94, 1, 3)  # log-prob of the 2 predicted prompt tokens

    def rows(completion_logps, completion_lengths):
        """Token ids, masks and fake logits for prompt (3 tokens) + completion rows."""
        seq = prompt_len + width
        positions = torch.arange(seq)
        attention = (positions < prompt_len + completion_lengths.unsqueeze(1)).long()
        labels = torch.where(positions >= prompt_len, 0, -100).expand(batch, -1)
        labels = torch.where(attention.bool(), labels, -100)
        # per predicted position (p predicts p+1): prompt tokens 1..2, then the completion
        prompt_part = fake_logits(prompt_logps, torch.full((batch,), 2.0), 2)[:, :-1]
        completion_part = fake_logits(completion_logps, completion_lengths, width)
        return attention, labels, torch.cat([prompt_part, completion_part], dim=1)

    chosen_attention, chosen_labels, chosen_logits = rows(pc, nc)
    rejected_attention, rejected_labels, rejected_logits = rows(pr, nr)
    ids = torch.zeros_like(chosen_attention)
    batch_inputs = {"chosen_input_ids": ids, "chosen_attention_mask": chosen_attention,
                    "chosen_labels": chosen_labels, "rejected_input_ids": ids,
                    "rejected_attention_mask": rejected_attention,
                    "rejected_labels": rejected_labels}
    trainer = bare(ORPOTrainer, beta=0.1, accelerator=CPU, is_encoder_decoder=False,
                   padding_value=0, aux_loss_enabled=False)
    model = FakeLM(torch.cat([chosen_logits, rejected_logits]))
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch_inputs)

    losses, metrics = orpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, beta=0.1,
                                sft_logps=pc + prompt_logps, sft_lengths=nc + 2)
    assert abs(losses.mean().item() - trl_loss.item()) < TOL
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen",
                "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert abs(metrics[key].item() - trl_metrics[key]) < TOL, key

    # and the odds-ratio term alone, per example, against TRL's odds_ratio_loss
    trl_ratio, *_ = trainer.odds_ratio_loss(pc / nc, pr / nr)
    no_sft, _ = orpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, beta=0.1,
                          sft_logps=torch.zeros(batch), sft_lengths=torch.ones(batch))
    assert torch.allclose(no_sft, -trl_ratio.double(), rtol=0, atol=TOL)
