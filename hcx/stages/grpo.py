"""``hcx align`` with ``align.method: grpo`` or ``rloo``: on-policy policy gradient.

Each rollout, on every DP rank (``align.online``, docs/alignment.md "GRPO and RLOO"):

1. this rank's share of the step's prompts (``train.global_batch_size /
   samples_per_prompt`` prompts per step over all DP ranks) gets K =
   ``samples_per_prompt`` completions each from the current policy
   (:class:`hcx.stages.rollouts.PolicyRollouts`: the engine's own model, sampled with
   ``temperature``/``top_p`` from a seed of (step, DP rank));
2. the reward (:mod:`hcx.stages.rewards`) scores them; a sample without a verdict takes
   its group's mean reward (advantage 0) and is counted (``reward/unparsed``);
3. rewards are clipped (``reward_clip``) and whitened with running statistics
   (``normalize_rewards``), then turned into advantages over the whole step's rewards
   (gathered from every DP rank, so any DP size gives the same numbers): GRPO's
   group-standardised ones (:func:`~hcx.stages.online_losses.group_advantages`) or RLOO's
   leave-one-out ones (:func:`~hcx.stages.online_losses.rloo_advantages`, after the KL
   penalty :func:`~hcx.stages.online_losses.kl_penalized_rewards` when ``beta > 0``);
4. one no-grad pass keeps the rollout policy's per-token log-probs when later passes need
   them (``passes > 1``, or RLOO's KL-in-reward), and the frozen reference model's when
   ``beta > 0`` (:func:`hcx.engine.scoring.token_scores`);
5. the shared training loop steps ``passes`` times on the rollout with the clipped loss:
   :func:`~hcx.stages.online_losses.policy_loss` (GRPO; token-level, ``loss_type``, KL
   in the loss) or :func:`~hcx.stages.online_losses.rloo_loss` (sequence-level), plus
   ``unlikelihood_weight`` times :func:`~hcx.stages.online_losses.repetition_unlikelihood_loss`.

Log-probs are those of the sampling distribution, softmax(logits / temperature), for
the policy, the rollout policy and the reference alike (as TRL). With one pass the
ratio is pi / pi_old = 1 with pi's gradient (TRL's shortcut), so no
scoring pass is run for it. The task's checkpoint state holds the reward normaliser and,
between passes, the rollout (every DP rank's, gathered): a run stopped anywhere resumes
exactly. Sampling seeds depend on the step only, so no generator state is needed.

The generation engine runs at pipeline size 1 (the rules refuse ``parallel.pp > 1``);
TP and DP work. In memory: the policy (it also samples), and the reference when
``beta > 0``.
"""

from __future__ import annotations

from functools import partial

import torch

from hcx.data.sources import raw_source_errors
from hcx.engine.batches import EpochOrder
from hcx.engine.loop import log_rank0
from hcx.engine.parallel import device, dp_gather
from hcx.engine.scoring import frozen_model, token_logps_output, token_scores
from hcx.engine.stage import Stage
from hcx.stages import online_losses as ol
from hcx.stages import preference
from hcx.stages.align import reference_checkpoint, reference_errors
from hcx.stages.loss_helpers import loop_output, put_mean
from hcx.stages.prompts import Prompt, read_prompts, room_errors
from hcx.stages.rewards import RewardError, Sample, load_reward, parse_spec, rewards_on_tp
from hcx.stages.rollouts import (PolicyRollouts, Rollout, completion_index, completion_mask,
                                 to_completion_tokens)

# Per-rollout numbers reported with every step's metrics (constants of the step).
STATS = ("reward", "reward/std", "reward/unparsed", "reward/group_std",
         "frac_reward_zero_std", "completions/clipped_ratio")


# align.online keys that only GRPO / RLOO read: set under another on-policy method
# (jbond, self_judge), they would be ignored, so its rules refuse them.
GRPO_ONLY = ("samples_per_prompt", "epsilon", "epsilon_high", "beta", "kl_estimator",
             "loss_type", "scale_rewards", "normalize_advantages", "reward_clip",
             "normalize_rewards", "normalize_clip", "passes", "unlikelihood_weight",
             "unlikelihood_ngram")


def reward_errors(recipe, required: bool = True) -> list[tuple[str, str]]:
    """``(key, message)`` when ``align.online.reward`` is missing (and ``required``) or
    cannot be parsed."""
    spec = recipe.align.online.reward
    if spec is None:
        return [("align.online.reward", f"align.method={recipe.align.method} needs "
                 "align.online.reward: what scores a completion")] if required else []
    try:
        parse_spec(spec)
    except RewardError as e:
        return [("align.online.reward", str(e))]
    return []


def sampling_errors(recipe, also: str = "", grpo_only: bool = True) -> list[tuple[str, str]]:
    """What every on-policy stage refuses: pipeline parallelism (the generation engine
    runs at pipeline size 1), a validation pass (metrics come from every step's samples)
    and, with ``grpo_only``, GRPO/RLOO-only ``align.online`` keys (``also`` says where the
    method's own settings are)."""
    m, problems = recipe.align.method, []
    if grpo_only:
        problems += [(f"align.online.{key}", f"align.online.{key} is a GRPO/RLOO setting that "
                      f"align.method={m} ignores: remove it{also}")
                     for key in GRPO_ONLY if key in recipe.align.online.model_fields_set]
    if recipe.parallel.pp != 1:
        problems.append(("parallel.pp", f"align.method={m} samples through the generation "
                         "engine, which runs at pipeline size 1: set parallel.pp=1 (use "
                         "parallel.tp to split the model)"))
    if recipe.data.eval_every:
        problems.append(("data.eval_every", f"align.method={m} reports its metrics on every "
                         "step's samples; set data.eval_every=0"))
    return problems


# --- prompts -----------------------------------------------------------------------------


def prompt_room_errors(recipe) -> list[tuple[str, str]]:
    return room_errors("align.online", recipe.data.seq_length, recipe.align.online.max_new_tokens)


def load_prompts(recipe, tokenizer, log) -> list[Prompt]:
    """Every source's prompts (weighted as SFT weights sources), the answer of chat SFT
    data in the record's ``align.online.answer_field`` (:mod:`hcx.stages.prompts`)."""
    cfg = recipe.align.online
    return read_prompts(recipe, tokenizer, log, section="align.online", field=cfg.prompts_field,
                        chat=cfg.chat, max_new_tokens=cfg.max_new_tokens,
                        answer_field=cfg.answer_field)


# --- the task ----------------------------------------------------------------------------


def _gather(values: torch.Tensor, topo) -> torch.Tensor:
    """Every DP rank's values (same shape on each), in rank order, on the CPU."""
    return dp_gather(values.to(device()), topo).cpu()


class OnlineTask:
    """Rollouts, rewards and the GRPO / RLOO loss on the shared training loop."""

    def __init__(self, engine, tokenizer, prompts: list[Prompt], reward, reference=None,
                 rollouts=None):
        from hcx.engine.generate import chat_stop_ids

        self.engine, self.tokenizer, self.prompts = engine, tokenizer, prompts
        self.reward, self.reference = reward, reference
        r = engine.recipe
        self.method = r.align.method
        self.cfg = r.align.online
        self.rows_per_microbatch = r.train.micro_batch_size
        self.rollouts = rollouts or PolicyRollouts(engine, tokenizer,
                                                   self.cfg.generation_batch_size)
        self.stop_ids = chat_stop_ids(tokenizer)
        self.normalizer = (ol.RewardNormalizer(clip=self.cfg.normalize_clip)
                           if self.cfg.normalize_rewards else None)
        self.rollout: Rollout | None = None
        self._order = EpochOrder(len(prompts), r.train.seed)
        self.keeps_old = self.cfg.passes > 1 or (self.method == "rloo" and self.cfg.beta > 0)

    # -- rollouts -----------------------------------------------------------------------

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        number = step // self.cfg.passes
        if self.rollout is None or self.rollout.number != number:
            self.rollout = self._roll_out(number)
        return self._batches(self.rollout)

    def _roll_out(self, number: int) -> Rollout:
        from hcx.engine.generate import SamplingParams

        e, cfg = self.engine, self.cfg
        r, topo, k = e.recipe, e.topo, cfg.samples_per_prompt
        local = r.train.global_batch_size // topo.dp
        # The data position counts completions: a rollout serves `passes` steps.
        first = (e.first_sample(number * cfg.passes) // (k * cfg.passes)
                 + topo.dp_rank * (local // k))
        picked = [self.prompts[self._order(i)] for i in range(first, first + local // k)]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, stop_ids=self.stop_ids,
                                seed=r.train.seed * 1_000_003 + number * topo.dp + topo.dp_rank)
        completions = self.rollouts.generate([p.ids for p in picked], k, params)
        samples = [Sample(p.prompt, c.text, p.record)
                   for p, c in zip([p for p in picked for _ in range(k)], completions)]
        values, parsed = rewards_on_tp(self.reward, samples)
        rollout = Rollout(number, [p.ids for p in picked for _ in range(k)],
                          [c.ids for c in completions], values, parsed, [],
                          [c.finish_reason == "stop" for c in completions])
        self._score(rollout)
        self._advantages(rollout)
        return rollout

    def _score(self, rollout: Rollout) -> None:
        """The rollout policy's and the reference's per-token log-probs, where needed."""
        if not (self.keeps_old or self.reference is not None):
            return
        r = self.engine.recipe
        width = self.cfg.max_new_tokens
        batches = self._row_batches(rollout)
        index = completion_index([len(p) for p in rollout.prompt_ids], width)
        mask = completion_mask(rollout.lengths, width).double()

        def per_token(model) -> list[list[float]]:
            scores = torch.cat(token_scores(model, batches, r.data.seq_length,
                                            self.cfg.temperature))
            return (to_completion_tokens(scores, index) * mask).tolist()

        if self.keeps_old:
            rollout.old_logps = per_token(self.engine.ddp)
        if self.reference is not None:
            rollout.ref_logps = per_token(self.reference)

    def _advantages(self, rollout: Rollout) -> None:
        """Rewards -> advantages over the whole step (every DP rank's rewards), this
        rank's share kept; the step's reward statistics in ``rollout.stats``."""
        cfg, topo, k = self.cfg, self.engine.topo, self.cfg.samples_per_prompt
        raw = torch.tensor(rollout.rewards, dtype=torch.float64).view(-1, k)
        ok = torch.tensor(rollout.parsed, dtype=torch.bool).view(-1, k)
        # No verdict: the group's mean verdict (advantage 0, group mean unchanged).
        counts = ok.sum(1, keepdim=True)
        means = (raw * ok).sum(1, keepdim=True) / counts.clamp(min=1)
        filled = torch.where(ok, raw, means.expand_as(raw)).reshape(-1)
        rollout.rewards = filled.tolist()

        everything = _gather(torch.stack([filled, ok.reshape(-1).double(), torch.tensor(
            [float(not f) for f in rollout.finished], dtype=torch.float64)], 1), topo)
        rewards, parsed = everything[:, 0], everything[:, 1] > 0
        seen = rewards[parsed]
        stats = {"reward": seen.mean().item() if seen.numel() else 0.0,
                 "reward/std": seen.std().item() if seen.numel() > 1 else 0.0,
                 "reward/unparsed": 1.0 - parsed.double().mean().item(),
                 "completions/clipped_ratio": everything[:, 2].mean().item()}

        x = ol.clip_rewards(filled, cfg.reward_clip)
        if self.normalizer is not None:
            self.normalizer.update(_gather(x, topo))
            x = self.normalizer(x).double()
        if self.method == "rloo" and cfg.beta > 0:
            mask = completion_mask(rollout.lengths, cfg.max_new_tokens)
            x = ol.kl_penalized_rewards(x, torch.tensor(rollout.old_logps),
                                        torch.tensor(rollout.ref_logps), mask,
                                        beta=cfg.beta).double()
        x = _gather(x, topo)
        if self.method == "grpo":
            advantages, metrics = ol.group_advantages(x, k, scale_rewards=cfg.scale_rewards)
        else:
            advantages, metrics = ol.rloo_advantages(
                x, k, normalize_advantages=cfg.normalize_advantages)
        local = len(rollout.rewards)
        mine = advantages[topo.dp_rank * local:(topo.dp_rank + 1) * local]
        rollout.advantages = mine.double().tolist()
        stats["reward/group_std"] = float(metrics["reward_std"])
        stats["frac_reward_zero_std"] = float(metrics["frac_reward_zero_std"])
        lengths = _gather(torch.tensor(rollout.lengths, dtype=torch.float64), topo)
        stats["mean_tokens"] = lengths.mean().item()  # dapo's per-completion token share
        rollout.stats = stats

    # -- batches ------------------------------------------------------------------------

    def _row_batches(self, rollout: Rollout) -> list[dict[str, torch.Tensor]]:
        r, mb = self.engine.recipe, self.rows_per_microbatch
        rows = list(zip(rollout.prompt_ids, rollout.completion_ids))
        return [preference.rows_to_batch(rows[i:i + mb], r.data.seq_length, self.tokenizer.pad)
                for i in range(0, len(rows), mb)]

    def _batches(self, rollout: Rollout) -> list[dict[str, torch.Tensor]]:
        mb, width = self.rows_per_microbatch, self.cfg.max_new_tokens
        stats = torch.tensor([rollout.stats[name] for name in STATS], dtype=torch.float64)
        out = []
        for k, batch in enumerate(self._row_batches(rollout)):
            part = slice(k * mb, (k + 1) * mb)
            lengths = rollout.lengths[part]
            batch.update(
                index=completion_index([len(p) for p in rollout.prompt_ids[part]], width),
                mask=completion_mask(lengths, width),
                advantages=torch.tensor(rollout.advantages[part], dtype=torch.float64),
                mean_tokens=torch.tensor(rollout.stats["mean_tokens"], dtype=torch.float64),
                stats=stats)
            if rollout.old_logps is not None:
                batch["old_logps"] = torch.tensor(rollout.old_logps[part], dtype=torch.float64)
            if rollout.ref_logps is not None:
                batch["ref_logps"] = torch.tensor(rollout.ref_logps[part], dtype=torch.float64)
            if self.cfg.unlikelihood_weight:
                ids = [c + [0] * (width - len(c)) for c in rollout.completion_ids[part]]
                batch["repeated"] = ol.repeated_ngram_mask(ids, batch["mask"],
                                                           n=self.cfg.unlikelihood_ngram)
            out.append(batch)
        return out

    # -- the loss -----------------------------------------------------------------------

    def forward_step(self, model, batch):
        return token_logps_output(model, batch, self.cfg.temperature), partial(self.loss, batch)

    def loss(self, batch, output):
        cfg, dev = self.cfg, output.device
        # megatron's per-token cross-entropy, negated: log pi of each label
        logps = to_completion_tokens(-output.float(), batch["index"].to(dev))
        mask = batch["mask"].to(dev)
        advantages = batch["advantages"].to(dev)
        old = batch["old_logps"].to(dev) if "old_logps" in batch else None
        ref = batch["ref_logps"].to(dev) if "ref_logps" in batch else None
        if self.method == "grpo":
            losses, metrics = ol.policy_loss(
                logps, old, advantages, mask, ref_logps=ref, beta=cfg.beta,
                epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                kl_estimator=cfg.kl_estimator, loss_type=cfg.loss_type,
                max_completion_length=cfg.max_new_tokens,
                mean_completion_tokens=batch["mean_tokens"].to(dev))
        else:
            sequence = (logps * mask).sum(-1)
            old_sequence = sequence.detach() if old is None else (old * mask).sum(-1)
            losses, metrics = ol.rloo_loss(sequence, old_sequence, advantages,
                                           epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high)
            if ref is not None:  # reported; the penalty itself is in the reward
                kl = ol.per_token_kl(logps.detach(), ref, estimator=cfg.kl_estimator)
                metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).float()
            put_mean(metrics, "completions/mean_length", mask.sum(-1))
        if cfg.unlikelihood_weight:
            unlikely, more = ol.repetition_unlikelihood_loss(logps, batch["repeated"].to(dev),
                                                             mask)
            losses = losses + cfg.unlikelihood_weight * unlikely
            metrics.update(more)
        for name, value in zip(STATS, batch["stats"]):
            metrics[name] = value.to(dev)
        return loop_output(losses, metrics)

    # -- resuming -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The reward normaliser and, with several passes, every DP rank's rollout (a
        collective over the DP group: every rank calls it)."""
        state: dict = {}
        if self.normalizer is not None:
            state["normalizer"] = self.normalizer.state_dict()
        if self.cfg.passes > 1 and self.rollout is not None:
            topo = self.engine.topo
            parts = [self.rollout.state_dict()]
            if topo.dp > 1:
                import torch.distributed as dist
                from megatron.core import parallel_state as ps

                parts = [None] * topo.dp
                dist.all_gather_object(parts, self.rollout.state_dict(),
                                       group=ps.get_data_parallel_group())
            state["rollout"] = {"dp": topo.dp, "parts": parts}
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.normalizer is not None and "normalizer" in state:
            self.normalizer.load_state_dict(state["normalizer"])
        saved = state.get("rollout")
        if saved is None:
            return
        topo = self.engine.topo
        if saved["dp"] != topo.dp:
            log_rank0(f"{self.method}: the saved rollout was split over {saved['dp']} DP "
                      f"ranks, this run has {topo.dp}: its remaining passes are skipped "
                      "(the next rollout is sampled now)")
            return
        self.rollout = Rollout.from_state(saved["parts"][topo.dp_rank])


# --- the stages --------------------------------------------------------------------------


class OnlineStage(Stage):
    """``hcx align`` with ``align.method: grpo`` or ``rloo`` (see the module docstring)."""

    section = "align"

    def rules(self, recipe):
        a, p, t = recipe.align, recipe.parallel, recipe.train
        m = a.method
        if a.online is None:
            return [("align.online", f"align.method={m} needs align.online (at least "
                     "align.online.reward)")]
        cfg = a.online
        problems = (raw_source_errors(recipe.data.sources, "prompts")
                    + prompt_room_errors(recipe) + reward_errors(recipe)
                    + sampling_errors(recipe, grpo_only=False))
        if cfg.beta > 0:
            problems += [(key, f"{msg} (align.online.beta > 0 needs it)")
                         for key, msg in reference_errors(recipe)]
        k = cfg.samples_per_prompt
        if t.global_batch_size % (k * p.dp):
            problems.append(("train.global_batch_size", f"train.global_batch_size="
                             f"{t.global_batch_size} must be a multiple of "
                             f"align.online.samples_per_prompt * parallel.dp = {k} * {p.dp} "
                             "(each DP rank samples whole groups)"))
        if cfg.epsilon_high is not None and cfg.epsilon_high < cfg.epsilon:
            problems.append(("align.online.epsilon_high", f"align.online.epsilon_high="
                             f"{cfg.epsilon_high} is below align.online.epsilon={cfg.epsilon}"))
        if cfg.reward_clip is not None and cfg.reward_clip[0] > cfg.reward_clip[1]:
            problems.append(("align.online.reward_clip", "align.online.reward_clip is "
                             "[low, high] with low <= high"))
        return problems

    def read(self, recipe, tokenizer, log):
        return load_prompts(recipe, tokenizer, log)

    def tasks(self, engine, tokenizer, prompts):
        recipe = engine.recipe
        cfg = recipe.align.online
        reference = None
        if cfg.beta > 0:
            reference = frozen_model(recipe, engine.vocab_size, engine.topo,
                                     reference_checkpoint(recipe), log_rank0)
        reward = load_reward(cfg.reward, cfg, recipe=recipe, engine=engine, tokenizer=tokenizer,
                             log=log_rank0)
        return OnlineTask(engine, tokenizer, prompts, reward, reference), None


class GRPOStage(OnlineStage):
    name = "grpo"


class RLOOStage(OnlineStage):
    name = "rloo"
