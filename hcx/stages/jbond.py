"""``hcx align`` with ``align.method: jbond``: J-BOND, Best-of-N distillation against a
moving anchor (Sessa et al. 2024, arXiv:2407.14622; the math is :mod:`hcx.stages.bond_loss`).

Each optimizer step, on every DP rank (docs/alignment.md, "J-BOND"):

1. the anchor catches up with the policy: ``anchor <- (1 - eta) anchor + eta policy``
   (:func:`~hcx.stages.bond_loss.ema_update`), once per optimizer step taken since the
   anchor last moved (so the move of step t happens just before step t + 1 samples: the
   same sequence of weights as a move right after the optimizer step, without a hook in
   the training loop);
2. this rank's share of the step's prompts (``train.global_batch_size`` prompts per step
   over all DP ranks) gets one completion from the policy and ``align.jbond.anchor_samples``
   (N, 2 by default) from the anchor (:class:`hcx.stages.rollouts.PolicyRollouts` on each
   model; sampling settings from ``align.online``);
3. the reward (``align.online.reward``, :mod:`hcx.stages.rewards`) scores all of them; the
   policy sample's J-BOND reward is ``-penalty`` when it is worse than every anchor sample,
   0 otherwise (:func:`~hcx.stages.bond_loss.jbond_reward`); the anchor's best sample is the
   Best-of-N sample of the forward term;
4. one no-grad pass scores the policy samples under the anchor (and under the frozen
   initial model when ``reference_kl``);
5. the loss :func:`~hcx.stages.bond_loss.jbond_loss` on two rows per prompt (the policy's
   sample: backward KL as policy gradient with a KL(policy || anchor) penalty; the anchor's
   best sample: its negative log-likelihood, the forward KL), mixed by ``beta``.

A sample without a verdict from the reward: an anchor sample never beats anything (reward
-inf), a policy sample gets J-BOND reward 0 (no information); both are counted
(``reward/unparsed``). Log-probs are those of softmax(logits / temperature), as the
on-policy stages of :mod:`hcx.stages.grpo` take them.

In memory: the policy, the anchor (a second full copy of the weights: the EMA of the
policy's past weights cannot be recomputed from the policy) and, with ``reference_kl``,
the frozen initial model. The anchor is kept in the compute dtype; with bf16 an EMA rate
below bf16's relative precision (~0.4%) rounds most updates away, so keep ``eta`` above
~0.01 there. Resuming: the anchor's weights are saved with every checkpoint as a
weights-only checkpoint ``<checkpoint dir>/anchor/step_N`` (named by the task state in
``hcx.json``) and loaded back exactly; sampling seeds depend on the step only.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import torch

from hcx.data.sources import raw_source_errors
from hcx.engine import checkpoint as ckpt
from hcx.engine.loop import log_rank0
from hcx.engine.parallel import device, dp_gather
from hcx.engine.scoring import frozen_model, token_logps_output, token_scores
from hcx.engine.stage import Stage
from hcx.errors import HcxError
from hcx.stages import bond_loss, preference
from hcx.stages.align import reference_checkpoint, reference_errors
from hcx.stages.grpo import (OnlineTask, load_prompts, prompt_room_errors, reward_errors,
                             sampling_errors)
from hcx.stages.loss_helpers import loop_output, put_mean
from hcx.stages.rewards import Sample, load_reward, rewards_on_tp
from hcx.stages.rollouts import (PolicyRollouts, completion_index, completion_mask,
                                 to_completion_tokens)

# Per-step numbers reported with every step's metrics (constants of the step).
STATS = ("reward", "reward/anchor", "reward/unparsed", "jbond/quantile",
         "jbond/log_quantile", "completions/clipped_ratio")
ANCHOR_DIR = "anchor"  # under the checkpoint directory

class JBondError(HcxError):
    """A J-BOND run cannot go on (its anchor checkpoint is missing)."""


def unwrapped(model):
    """The model inside a bf16 wrapper (whose parameter names carry a ``module.`` prefix)."""
    from megatron.core.transformer.module import Float16Module

    return model.module if isinstance(model, Float16Module) else model


class JBondTask(OnlineTask):
    """Policy and anchor samples, the J-BOND loss, the anchor's EMA (module docstring)."""

    def __init__(self, engine, tokenizer, prompts, reward, anchor, reference=None):
        super().__init__(engine, tokenizer, prompts, reward, reference)
        r = engine.recipe
        self.jcfg = r.align.jbond
        self.anchor = anchor
        self.anchor_rollouts = PolicyRollouts(SimpleNamespace(ddp=anchor, recipe=r), tokenizer,
                                              self.cfg.generation_batch_size)
        # Two rows per prompt: the policy's sample and the anchor's best one.
        self.prompts_per_microbatch = r.train.micro_batch_size
        self.rows_per_microbatch = 2 * r.train.micro_batch_size
        # A fresh run starts with anchor = policy (the initial model). A run resumed from
        # a checkpoint with J-BOND state gets its saved anchor in load_state_dict.
        self.anchor_updates = engine.start_step
        bond_loss.ema_update(self._anchor_params(), self._policy_params(), eta=1.0)
        self.last_step: int | None = None

    def _anchor_params(self) -> dict[str, torch.Tensor]:
        return dict(unwrapped(self.anchor).named_parameters())

    def _policy_params(self) -> dict[str, torch.Tensor]:
        return dict(self.engine.model.named_parameters())

    # -- the anchor ---------------------------------------------------------------------

    def _catch_up(self, step: int) -> None:
        """Move the anchor once for every optimizer step since it last moved."""
        while self.anchor_updates < step:
            bond_loss.ema_update(self._anchor_params(), self._policy_params(),
                                 eta=self.jcfg.eta)
            self.anchor_updates += 1

    # -- rollouts -----------------------------------------------------------------------

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        self._catch_up(step)
        self.last_step = step
        return self._jbond_batches(step)

    def _jbond_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        from hcx.engine.generate import SamplingParams

        e, cfg, j = self.engine, self.cfg, self.jcfg
        r, topo, n = e.recipe, e.topo, j.anchor_samples
        local = r.train.global_batch_size // topo.dp
        first = e.first_sample(step) + topo.dp_rank * local
        picked = [self.prompts[self._order(i)] for i in range(first, first + local)]
        ids = [p.ids for p in picked]
        seed = r.train.seed * 1_000_003 + step * topo.dp + topo.dp_rank
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, stop_ids=self.stop_ids, seed=seed)
        mine = self.rollouts.generate(ids, 1, params)
        # the anchor's own stream: its seeds never meet the policy's (parts add < 2^20)
        theirs = self.anchor_rollouts.generate(ids, n, replace(params, seed=seed + (1 << 40)))

        samples = ([Sample(p.prompt, c.text, p.record) for p, c in zip(picked, mine)]
                   + [Sample(p.prompt, c.text, p.record)
                      for p, c in zip([p for p in picked for _ in range(n)], theirs)])
        values, parsed = rewards_on_tp(self.reward, samples)
        values_t = torch.tensor(values, dtype=torch.float64)
        parsed_t = torch.tensor(parsed, dtype=torch.bool)
        rewards, anchor_rewards = values_t[:local], values_t[local:].view(local, n)
        ok, anchor_ok = parsed_t[:local], parsed_t[local:].view(local, n)
        # an anchor sample without a verdict beats nothing
        ranked = torch.where(anchor_ok, anchor_rewards, torch.full_like(anchor_rewards,
                                                                        -float("inf")))
        j_rewards = torch.where(ok, bond_loss.jbond_reward(rewards, ranked, penalty=j.penalty),
                                torch.zeros_like(rewards))
        best = ranked.argmax(dim=1)  # the first best: Theorem 1's tie rule
        best_ids = [theirs[i * n + int(b)].ids for i, b in enumerate(best)]
        quantile = bond_loss.quantile_estimate(rewards, ranked)
        log_quantile = bond_loss.log_quantile_reward(rewards, ranked)

        # the policy samples' log-probs under the anchor (and the initial model)
        rows = [(p, c.ids) for p, c in zip(ids, mine)]
        mb = self.prompts_per_microbatch
        scoring = [preference.rows_to_batch(rows[i:i + mb], r.data.seq_length, self.tokenizer.pad)
                   for i in range(0, local, mb)]

        def sequence(model) -> torch.Tensor:
            return torch.cat(token_scores(model, scoring, r.data.seq_length,
                                          cfg.temperature)).sum(1)

        anchor_logps = sequence(self.anchor)
        ref_logps = sequence(self.reference) if self.reference is not None else None

        # the step's statistics over every DP rank's samples
        finished = torch.tensor([float(c.finish_reason != "stop") for c in mine],
                                dtype=torch.float64)
        everything = dp_gather(torch.cat([
            torch.stack([rewards, ok.double(), quantile, log_quantile, finished], 1),
            torch.stack([anchor_rewards.reshape(-1), anchor_ok.reshape(-1).double()], 1)
            .reshape(local, 2 * n)], 1).to(device()), topo).cpu()
        pol, pol_ok = everything[:, 0], everything[:, 1] > 0
        anc = everything[:, 5:].reshape(-1, 2)
        anc_values, anc_ok = anc[:, 0], anc[:, 1] > 0
        stats = {"reward": pol[pol_ok].mean().item() if pol_ok.any() else 0.0,
                 "reward/anchor": anc_values[anc_ok].mean().item() if anc_ok.any() else 0.0,
                 "reward/unparsed": 1.0 - torch.cat([pol_ok, anc_ok]).double().mean().item(),
                 "jbond/quantile": everything[:, 2].mean().item(),
                 "jbond/log_quantile": everything[:, 3].mean().item(),
                 "completions/clipped_ratio": everything[:, 4].mean().item()}
        stats_t = torch.tensor([stats[name] for name in STATS], dtype=torch.float64)

        width = cfg.max_new_tokens
        out = []
        for i in range(0, local, mb):
            pair_rows = [row for k in range(i, min(i + mb, local))
                         for row in ((ids[k], mine[k].ids), (ids[k], best_ids[k]))]
            batch = preference.rows_to_batch(pair_rows, r.data.seq_length, self.tokenizer.pad)
            batch.update(index=completion_index([len(p) for p, _ in pair_rows], width),
                         mask=completion_mask([len(c) for _, c in pair_rows], width),
                         rewards=j_rewards[i:i + mb].clone(),
                         anchor_logps=anchor_logps[i:i + mb].clone(), stats=stats_t)
            if ref_logps is not None:
                batch["ref_logps"] = ref_logps[i:i + mb].clone()
            out.append(batch)
        return out

    # -- the loss -----------------------------------------------------------------------

    def forward_step(self, model, batch):
        return token_logps_output(model, batch, self.cfg.temperature), partial(self.loss, batch)

    def loss(self, batch, output):
        j, dev = self.jcfg, output.device
        logps = to_completion_tokens(-output.float(), batch["index"].to(dev))
        mask = batch["mask"].to(dev)
        pairs = (logps * mask).sum(-1).view(-1, 2)  # [policy sample, anchor's best] per prompt
        ref = batch["ref_logps"].to(dev) if "ref_logps" in batch else None
        losses, metrics = bond_loss.jbond_loss(
            pairs[:, 0], batch["anchor_logps"].to(dev), batch["rewards"].to(dev), pairs[:, 1],
            beta=j.beta, kl_coef=j.kl_coef, ref_logps=ref, gamma=j.gamma)
        put_mean(metrics, "completions/mean_length", mask.view(-1, 2, mask.shape[-1])[:, 0].sum(-1))
        for name, value in zip(STATS, batch["stats"]):
            metrics[name] = value.to(dev)
        return loop_output(losses, metrics)

    # -- resuming -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Saves the anchor's weights as ``<checkpoint dir>/anchor/step_N`` (a collective:
        every rank writes its shards) and names it; anchors of checkpoints that no longer
        exist are removed."""
        r = self.engine.recipe
        done = 0 if self.last_step is None else self.last_step + 1
        folder = r.checkpoint_dir / ANCHOR_DIR
        path = folder / ckpt.step_dir_name(done)

        def clear():
            keep = {p.name for p in ckpt.complete_checkpoints(r.checkpoint_dir)} | {path.name}
            for old in ckpt.complete_checkpoints(folder):
                if old.name not in keep or old == path:
                    shutil.rmtree(old, ignore_errors=True)
            for old in folder.glob(f"*{ckpt.INCOMPLETE}"):
                shutil.rmtree(old, ignore_errors=True)

        ckpt.on_rank0(clear, f"cannot clear {folder}")
        ckpt.save_weights(path, unwrapped(self.anchor), {"anchor_updates": self.anchor_updates})
        return {"anchor": {"path": f"{ANCHOR_DIR}/{path.name}", "updates": self.anchor_updates}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("anchor")
        if saved is None:
            log_rank0("jbond: the checkpoint has no anchor; the anchor restarts at the policy")
            return
        path = self.engine.recipe.checkpoint_dir / saved["path"]
        if not path.is_dir():
            raise JBondError(f"jbond: the checkpoint's anchor {path} is missing; restore it, or "
                             "start a new run with checkpoint.init_from the checkpoint")
        ckpt.load(path, unwrapped(self.anchor), restore_rng=False, log=log_rank0)
        self.anchor_updates = saved["updates"]


class JBondStage(Stage):
    """``hcx align`` with ``align.method: jbond`` (see the module docstring)."""

    name = "jbond"
    section = "align"

    def rules(self, recipe):
        a = recipe.align
        problems: list[tuple[str, str]] = []
        if a.online is None:
            return [("align.online", "align.method=jbond needs align.online (at least "
                     "align.online.reward: the samples' reward)")]
        if a.jbond is None:
            problems.append(("align.jbond", "align.method=jbond needs align.jbond (an empty "
                             "section takes the defaults: eta 0.02, beta 0.5, 2 anchor samples)"))
        cfg = a.online
        problems += raw_source_errors(recipe.data.sources, "prompts") + prompt_room_errors(recipe)
        problems += reward_errors(recipe)
        problems += sampling_errors(recipe, " (J-BOND's own settings are under align.jbond)")
        j = a.jbond
        if j is not None and (j.reference_kl or j.gamma > 0):
            problems += [(key, f"{msg} (align.jbond.reference_kl needs it)")
                         for key, msg in reference_errors(recipe)]
        if j is not None and j.gamma > 0 and not j.reference_kl:
            problems.append(("align.jbond.gamma", "align.jbond.gamma > 0 pulls towards the "
                             "initial model: set align.jbond.reference_kl=true"))
        return problems

    def read(self, recipe, tokenizer, log):
        return load_prompts(recipe, tokenizer, log)

    def tasks(self, engine, tokenizer, prompts):
        recipe = engine.recipe
        j = recipe.align.jbond
        # weights: a copy of the policy's, filled by the task (or from a checkpoint)
        anchor = frozen_model(recipe, engine.vocab_size, engine.topo, None, log_rank0)
        reference = None
        if j.reference_kl:
            reference = frozen_model(recipe, engine.vocab_size, engine.topo,
                                     reference_checkpoint(recipe), log_rank0)
        cfg = recipe.align.online
        reward = load_reward(cfg.reward, cfg, recipe=recipe, engine=engine, tokenizer=tokenizer,
                             log=log_rank0)
        return JBondTask(engine, tokenizer, prompts, reward, anchor, reference), None
