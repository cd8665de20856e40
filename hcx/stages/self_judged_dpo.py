r"""``hcx align`` with ``align.method: self_judge``: on-policy DPO on the policy's own
pairwise judgments (SELF-JUDGE, Lee et al. 2024, arXiv:2402.11253, Section 3.2).

The model starts from a JSFT checkpoint (``hcx data jsft`` + ``hcx sft``: one model that
answers and judges; :mod:`hcx.stages.self_judge`). Each optimizer step, on every DP rank
(docs/alignment.md, "SELF-JUDGE"):

1. this rank's share of the step's prompts (``train.global_batch_size`` prompts per step
   over all DP ranks) gets two completions each from the current policy
   (:class:`hcx.stages.rollouts.PolicyRollouts`; ``align.online``'s temperature, top-p and
   ``max_new_tokens``, a seed of (step, DP rank));
2. the judge (``align.self_judge.judge``) compares each pair in both orders, with the
   pairwise prompt JSFT trained it on (``pair-v2`` by default):

   - ``self``: the policy itself, with its current weights, greedily through the same
     generation engine: SELF-JUDGE's on-policy self-judgment (no second model);
   - an hcx checkpoint, a Hugging Face directory or an ``http(s)://`` endpoint: a fixed
     judge (the paper's "separate judge" baseline, or a stronger model);
   - ``reward``: ``align.online.reward``'s scores, the higher wins (online DPO with a
     reward model or a verifiable reward);

   each order gives a point to the completion it prefers
   (:func:`hcx.stages.candidate_selection.match_points`, the rule of self-rejection's
   tournament); more points is chosen. An undecided pair (a tie, two orders that
   disagree, unreadable verdicts) teaches nothing: its loss has weight 0, and it is
   counted (``judge/undecided``, ``judge/inconsistent``, ``judge/unparsed``);
3. the frozen reference model (``align.reference``, default ``checkpoint.init_from``)
   scores both completions;
4. the shared training loop steps on DPO's loss (:func:`hcx.stages.losses.dpo_loss`,
   ``align.beta`` and ``align.label_smoothing``) over the step's pairs.

Reported with every step: the judge's counts; ``judge/first`` (the share of decided
pairs won by the completion sampled first: near 0.5 unless the sampler or judge is
biased); ``kl``, the mean over both samples of log pi(y) - log pi_ref(y) (a k1 estimate
of KL(pi || pi_ref) at temperature 1, the DPO implicit rewards' scale), and, when
``align.online.reward`` is set, ``reward``: its mean over the policy's samples (with a
judge other than ``reward``, a measure the training does not see).

Sampling seeds depend on the step only and the judge is the policy's own weights (or a
frozen model), so a resumed run continues exactly; there is no task state to save. The
generation engine runs at pipeline size 1 (the rules refuse ``parallel.pp > 1``); TP and
DP work. In memory: the policy (it samples and judges) and the reference.
"""

from __future__ import annotations

from functools import partial

import torch

from hcx.config import SelfJudgeConfig
from hcx.data.sources import raw_source_errors
from hcx.engine.loop import log_rank0
from hcx.engine.parallel import device, dp_gather
from hcx.engine.scoring import frozen_model, score, sequence_logps, token_logps_output
from hcx.engine.stage import Stage
from hcx.stages import preference
from hcx.stages.align import reference_checkpoint, reference_errors
from hcx.stages.candidate_selection import match_points
from hcx.stages.grpo import (OnlineTask, load_prompts, prompt_room_errors, reward_errors,
                             sampling_errors)
from hcx.stages.loss_helpers import loop_output
from hcx.stages.losses import dpo_loss
from hcx.stages.rewards import (Sample, load_reward, open_judge_model, rewards_on_tp,
                                same_on_tp)

# Per-step numbers reported with every step's metrics (constants of the step).
STATS = ("judge/decided", "judge/undecided", "judge/inconsistent", "judge/unparsed",
         "judge/first", "reward", "completions/clipped_ratio")
JUDGE_KEY = "align.self_judge.judge"


class PairJudge:
    """A pairwise judge of completion pairs: ``points(questions, firsts, seconds)`` ->
    ``[pairs, 3]`` (points of the first, points of the second, unreadable replies), each
    pair judged in both orders (:func:`hcx.stages.candidate_selection.match_points`)."""

    def __init__(self, model, prompt, max_new_tokens: int, collective: bool):
        from hcx.stages.self_judge import pair_judge

        self.judge = pair_judge(model, prompt, max_new_tokens)
        self.collective = collective  # every TP rank runs it (hcx weights)

    def points(self, questions: list[str], firsts: list[str],
               seconds: list[str]) -> torch.Tensor:
        from hcx.evaluation.judges import PairCase
        from hcx.stages.self_judge import read_verdict

        cases = [PairCase([q], [a], [b]) for q, a, b in zip(questions, firsts, seconds)]
        out = [match_points(read_verdict(v.orders[0].judgment), read_verdict(v.orders[1].judgment))
               for v in self.judge.pairwise_many(cases, desc="self-judge")]
        return torch.tensor(out, dtype=torch.float64).view(-1, 3)


def reward_points(values: list[float], parsed: list[bool]) -> torch.Tensor:
    """``[pairs, 3]`` as :meth:`PairJudge.points` gives them, from the rewards of
    consecutive samples (first, second): the higher reward gets both orders' points
    (a reward has no position bias); equal rewards none; a sample without a reward makes
    its pair unreadable."""
    v = torch.tensor(values, dtype=torch.float64).view(-1, 2)
    ok = torch.tensor(parsed, dtype=torch.bool).view(-1, 2).all(1)
    first = ((v[:, 0] > v[:, 1]) & ok).double() * 2
    second = ((v[:, 1] > v[:, 0]) & ok).double() * 2
    return torch.stack([first, second, (~ok).double() * 2], 1)


class SelfJudgeTask(OnlineTask):
    """Pairs sampled from the policy, judged, and DPO's loss (see the module docstring)."""

    def __init__(self, engine, tokenizer, prompts, judge: PairJudge | None, reward, reference):
        super().__init__(engine, tokenizer, prompts, reward, reference)
        r = engine.recipe
        self.judge = judge  # None: align.online.reward decides
        self.pairs_per_microbatch = r.train.micro_batch_size
        self.beta, self.label_smoothing = r.align.beta, r.align.label_smoothing

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        from hcx.engine.generate import SamplingParams
        from hcx.stages.self_judge import judge_question

        e, cfg = self.engine, self.cfg
        r, topo = e.recipe, e.topo
        local = r.train.global_batch_size // topo.dp
        first = e.first_sample(step) + topo.dp_rank * local
        picked = [self.prompts[self._order(i)] for i in range(first, first + local)]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, stop_ids=self.stop_ids,
                                seed=r.train.seed * 1_000_003 + step * topo.dp + topo.dp_rank)
        sampled = self.rollouts.generate([p.ids for p in picked], 2, params)
        samples = [Sample(p.prompt, c.text, p.record)
                   for p, c in zip([p for p in picked for _ in range(2)], sampled)]

        reward = None
        if self.reward is not None:
            values, parsed = rewards_on_tp(self.reward, samples)
            reward = torch.tensor([v if ok else float("nan") for v, ok in zip(values, parsed)],
                                  dtype=torch.float64)
        if self.judge is None:
            points = reward_points(values, parsed)
        else:
            judge = self.judge
            questions = [judge_question(p.prompt) for p in picked]
            points = same_on_tp(lambda: judge.points(questions, [s.completion for s in samples[::2]],
                                                     [s.completion for s in samples[1::2]]),
                                judge.collective, (local, 3))
        first_wins = points[:, 0] > points[:, 1]
        decided = points[:, 0] != points[:, 1]

        # (chosen, rejected) rows per pair; an undecided pair keeps sample order, weight 0
        swap = (decided & ~first_wins).long().tolist()
        chosen = [sampled[2 * i + swap[i]].ids for i in range(local)]
        rejected = [sampled[2 * i + 1 - swap[i]].ids for i in range(local)]
        ids = [p.ids for p in picked]
        mb = self.pairs_per_microbatch
        batches = []
        for i in range(0, local, mb):
            rows = ([(ids[k], chosen[k]) for k in range(i, min(i + mb, local))]
                    + [(ids[k], rejected[k]) for k in range(i, min(i + mb, local))])
            batches.append(preference.rows_to_batch(rows, r.data.seq_length, self.tokenizer.pad))
        # the reference's log-probs of both rows, at temperature 1 (DPO's)
        ref = score(self.reference, batches, r.data.seq_length)

        finished = torch.tensor([float(c.finish_reason != "stop") for c in sampled],
                                dtype=torch.float64).view(-1, 2).mean(1)
        rewards = reward.view(-1, 2) if reward is not None else torch.full((local, 2), float("nan"))
        everything = dp_gather(torch.cat([points, decided.double().unsqueeze(1),
                                          first_wins.double().unsqueeze(1),
                                          finished.unsqueeze(1), rewards], 1).to(device()),
                               topo).cpu()
        stats = self.step_stats(everything)
        stats_t = torch.tensor([stats[name] for name in STATS], dtype=torch.float64)
        for k, batch in enumerate(batches):
            part = slice(k * mb, (k + 1) * mb)
            batch.update(weights=decided[part].double(), ref_logps=ref[k], stats=stats_t)
        return batches

    @staticmethod
    def step_stats(everything: torch.Tensor) -> dict[str, float]:
        """The step's :data:`STATS` from every DP rank's ``[pairs, 8]`` (points of the
        first, of the second, unreadable replies, decided, first won, unfinished share,
        the two samples' rewards)."""
        pa, pb, unread, decided, first_won, unfinished = (everything[:, i] for i in range(6))
        won = first_won[decided > 0]
        rewards = everything[:, 6:8].reshape(-1)
        rewards = rewards[~rewards.isnan()]
        return {"judge/decided": decided.mean().item(),
                "judge/undecided": 1.0 - decided.mean().item(),
                # each order picked a different completion
                "judge/inconsistent": ((pa == 1) & (pb == 1)).double().mean().item(),
                # share of judge replies that named no verdict
                "judge/unparsed": unread.sum().item() / (2 * everything.shape[0]),
                "judge/first": won.mean().item() if won.numel() else 0.5,
                "completions/clipped_ratio": unfinished.mean().item(),
                "reward": rewards.mean().item() if rewards.numel() else 0.0}

    def forward_step(self, model, batch):
        return token_logps_output(model, batch), partial(self.loss, batch)

    def loss(self, batch, output):
        dev = output.device
        logps, _ = sequence_logps(output, batch["loss_mask"].to(dev))
        ref = batch["ref_logps"].to(dev)
        n = logps.shape[0] // 2
        losses, metrics = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=self.beta,
                                   label_smoothing=self.label_smoothing)
        weights = batch["weights"].to(dev)
        metrics["kl"] = (logps.detach() - ref).float().mean()
        for name, value in zip(STATS, batch["stats"]):
            metrics[name] = value.to(dev)
        return loop_output(losses * weights, metrics)

    def state_dict(self) -> dict:
        return {}  # seeds depend on the step; the judge is the policy or a frozen model

    def load_state_dict(self, state: dict) -> None:
        pass


class SelfJudgeStage(Stage):
    """``hcx align`` with ``align.method: self_judge`` (see the module docstring)."""

    name = "self_judge"
    section = "align"

    def rules(self, recipe):
        a = recipe.align
        if a.online is None:
            return [("align.online", "align.method=self_judge samples with align.online (an "
                     "empty section takes the defaults; set max_new_tokens, temperature, "
                     "top_p, prompts_field)")]
        sj = a.self_judge or SelfJudgeConfig()
        judge = sj.judge
        problems = (raw_source_errors(recipe.data.sources, "prompts")
                    + prompt_room_errors(recipe) + reward_errors(recipe, required=judge == "reward")
                    + [(key, f"{msg} (DPO's reference model)")
                       for key, msg in reference_errors(recipe)])
        problems += sampling_errors(recipe, " (DPO's beta is align.beta)")
        if judge != "reward":
            from hcx.errors import HcxError
            from hcx.stages.self_judge import load_pair_prompt

            try:
                load_pair_prompt(sj.judge_prompts, sj.judge_prompt)
            except (HcxError, FileNotFoundError) as e:
                problems.append(("align.self_judge.judge_prompts", str(e)))
        return problems

    def read(self, recipe, tokenizer, log):
        return load_prompts(recipe, tokenizer, log)

    def tasks(self, engine, tokenizer, prompts):
        from hcx.stages.self_judge import load_pair_prompt

        recipe = engine.recipe
        sj = recipe.align.self_judge or SelfJudgeConfig()
        cfg = recipe.align.online
        reference = frozen_model(recipe, engine.vocab_size, engine.topo,
                                 reference_checkpoint(recipe), log_rank0)
        reward = None
        if cfg.reward is not None:
            reward = load_reward(cfg.reward, cfg, recipe=recipe, engine=engine,
                                 tokenizer=tokenizer, log=log_rank0)
        judge = None
        if sj.judge != "reward":
            model, collective = open_judge_model(sj.judge, recipe, engine, tokenizer, log_rank0,
                                                 JUDGE_KEY)
            judge = PairJudge(model, load_pair_prompt(sj.judge_prompts, sj.judge_prompt),
                              sj.judge_max_new_tokens, collective)
            log_rank0(f"self_judge: pairs judged by {sj.judge} with {sj.judge_prompt}")
        return SelfJudgeTask(engine, tokenizer, prompts, judge, reward, reference), None

