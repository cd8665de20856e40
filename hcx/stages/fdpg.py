"""``hcx align`` with ``align.method: fdpg``: f-DPG on a language model.

The target is an energy-based model over completions x of a prompt c, built from the
base model a (``align.reference``, default ``checkpoint.init_from``) and a scorer
(:mod:`hcx.stages.fdpg_loss` has the math):

- ``target: constraint``: P(x) = a(x|c) b(x), b in {0, 1} (GDC's pointwise constraint);
- ``target: reward``: P(x) = a(x|c) exp(r(x) / align.beta) (the RLHF optimum).

Each step, on every DP rank:

1. the proposal q, a frozen lagged copy of the policy, samples completions of this step's
   prompts through the generation engine (:mod:`hcx.engine.generate`, temperature 1, nothing
   cut, so q(x|c) is exactly the model's probability);
2. the base and the proposal score the samples (forward-only passes) and the scorer gives
   b(x) or r(x); log P = log a + log b (or r / beta);
3. the partition function's importance-sampling estimate Z ≈ mean P/q takes in the
   step's samples of every DP rank (a running estimate over the whole run);
4. the shared training loop runs the policy on the samples and :func:`hcx.stages.fdpg_loss.fdpg_loss`
   gives the f-DPG gradient with the moving-average baseline;
5. when the policy's estimated divergence to the target is below the proposal's, the
   proposal takes the policy's weights (checked at the next step, on the last samples).

Completions end at ``<|endofturn|>`` or after ``max_new_tokens``; a cut completion is
scored as it stands (probabilities of that prefix), as GDC implementations do with
fixed-length samples. The generation engine runs at pipeline size 1 (the recipe
validator says so); TP and DP work. Three models are in memory: policy, proposal, base.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Callable

import torch

from hcx.data.sources import raw_source_errors
from hcx.engine.batches import EpochOrder
from hcx.engine.loop import log_rank0
from hcx.engine.parallel import device, dp_gather, dp_mean
from hcx.engine.scoring import frozen_model, score, sequence_logps, token_logps_output
from hcx.engine.stage import Stage
from hcx.stages import fdpg_loss
from hcx.stages.loss_helpers import loop_output
from hcx.stages import preference
from hcx.stages.prompts import Prompt, read_prompts, room_errors
from hcx.stages.align import AlignError, reference_checkpoint, reference_errors


def load_prompts(recipe, tokenizer, log) -> list[Prompt]:
    """Every source's prompts, each once per epoch whatever the source's weight
    (:mod:`hcx.stages.prompts`)."""
    cfg = recipe.align.fdpg
    return read_prompts(recipe, tokenizer, log, section="align.fdpg", field=cfg.prompts_field,
                        chat=cfg.chat, max_new_tokens=cfg.max_new_tokens, weighted=False)


def prompt_room_errors(recipe) -> list[tuple[str, str]]:
    return room_errors("align.fdpg", recipe.data.seq_length, recipe.align.fdpg.max_new_tokens)


def load_scorer(spec: str, recipe, topo, log) -> Callable:
    """``module:function`` (any importable callable) or ``reward-model:PATH``, loaded as
    :mod:`hcx.stages.rewards` loads every reward."""
    from hcx.stages.rewards import load_scorer as load

    return load(spec, recipe, log, "align.fdpg.scorer")


class FDPGTask:
    """Samples, scores and the f-DPG loss on the shared training loop."""

    def __init__(self, engine, tokenizer, prompts, base, proposal, scorer):
        self.engine, self.tokenizer, self.prompts = engine, tokenizer, prompts
        self.base, self.proposal, self.scorer = base, proposal, scorer
        self.cfg = engine.recipe.align.fdpg
        self.beta = engine.recipe.align.beta
        self.rows_per_microbatch = engine.recipe.train.micro_batch_size
        self.partition = fdpg_loss.PartitionEstimate()
        self.baseline = fdpg_loss.MovingAverageBaseline(self.cfg.baseline_decay)
        self.proposal_updates = 0
        self._divergences: list[tuple[float, float]] = []  # (policy, proposal) per batch
        self._prompt = EpochOrder(len(prompts), engine.recipe.train.seed)
        from hcx.engine.generate import Generator, chat_stop_ids

        self.generator = Generator(SimpleNamespace(ddp=proposal, recipe=engine.recipe), tokenizer)
        self.stop_ids = chat_stop_ids(tokenizer)
        self._copy_policy_to_proposal()  # start (or resume) with q = the current policy

    # -- the proposal -------------------------------------------------------------------

    def _copy_policy_to_proposal(self) -> None:
        inner = getattr(self.proposal, "module", self.proposal)
        with torch.no_grad():
            for dst, src in zip(inner.parameters(), self.engine.model.parameters()):
                dst.copy_(src)

    def _maybe_update_proposal(self) -> None:
        if not self._divergences:
            return
        sums = torch.tensor(self._divergences, dtype=torch.float64).mean(0)
        self._divergences = []
        sums = dp_mean(sums.to(device()), self.engine.topo).cpu()
        if fdpg_loss.should_update_proposal(float(sums[0]), float(sums[1])):
            self._copy_policy_to_proposal()
            self.proposal_updates += 1

    # -- data ---------------------------------------------------------------------------

    def _scores(self, prompts: list[str], completions: list[str], rows) -> torch.Tensor:
        if hasattr(self.scorer, "score_rows"):
            values = self.scorer.score_rows(rows)
        else:
            values = self.scorer(prompts, completions)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if values.numel() != len(rows):
            raise AlignError(f"the scorer returned {values.numel()} values for "
                             f"{len(rows)} samples")
        if self.engine.recipe.align.fdpg.target == "constraint" and \
                not bool(((values == 0) | (values == 1)).all()):
            raise AlignError("align.fdpg.target=constraint needs a scorer returning 0 or 1 "
                             "(use target: reward for real-valued scores)")
        return values

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        from hcx.engine.generate import SamplingParams

        self._maybe_update_proposal()
        e = self.engine
        r = e.recipe
        g, mb, s = r.train.global_batch_size, r.train.micro_batch_size, self.cfg.samples_per_prompt
        local = g // e.topo.dp
        first = (e.first_sample(step) + e.topo.dp_rank * local) // s
        picked = [self._prompt(i) for i in range(first, first + local // s)]
        prompt_ids = [self.prompts[i].ids for i in picked for _ in range(s)]
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=1.0,
                                stop_ids=self.stop_ids,
                                seed=r.train.seed * 1_000_003 + step * e.topo.dp + e.topo.dp_rank)
        samples = self.generator.generate(prompt_ids, params)
        rows = [(p, gen.ids) for p, gen in zip(prompt_ids, samples)]
        texts = [self.tokenizer.decode([t for t in gen.ids if t not in self.stop_ids])
                 for gen in samples]
        prompt_texts = [self.prompts[i].text for i in picked for _ in range(s)]
        scores = self._scores(prompt_texts, texts, rows)
        batches = [preference.rows_to_batch(rows[k:k + mb], r.data.seq_length, self.tokenizer.pad)
                   for k in range(0, len(rows), mb)]
        base = torch.cat(score(self.base, batches, r.data.seq_length))
        proposal = torch.cat(score(self.proposal, batches, r.data.seq_length))
        if self.cfg.target == "constraint":
            target = fdpg_loss.target_logp(base, constraint=scores)
        else:
            target = fdpg_loss.target_logp(base, reward=scores, beta=self.beta)
        topo = self.engine.topo
        self.partition.update(dp_gather(target.to(device()), topo).cpu(),
                              dp_gather(proposal.to(device()), topo).cpu())
        log_z = self.partition.log_z
        for k, batch in enumerate(batches):
            part = slice(k * mb, (k + 1) * mb)
            batch.update(base_logps=base[part], proposal_logps=proposal[part],
                         target_logps=target[part], scores=scores[part],
                         log_z=torch.tensor(log_z, dtype=torch.float64),
                         baseline=torch.tensor(self.baseline.value, dtype=torch.float64),
                         lengths=torch.tensor([len(x[1]) for x in rows[part]], dtype=torch.float64))
            ids = [x[1] for x in rows[part]]
            batch["distinct"] = torch.tensor([fdpg_loss.distinct_n(ids, 1), fdpg_loss.distinct_n(ids, 2)],
                                             dtype=torch.float64)
        return batches

    # -- the loss -----------------------------------------------------------------------

    def forward_step(self, model, batch):
        return token_logps_output(model, batch), partial(self.loss, batch)

    def loss(self, batch, output):
        dev = output.device
        logps, _ = sequence_logps(output, batch["loss_mask"].to(dev))
        proposal = batch["proposal_logps"].to(dev)
        target = batch["target_logps"].to(dev)
        log_z = batch["log_z"].to(dev)
        div = self.cfg.divergence
        losses, metrics = fdpg_loss.fdpg_loss(logps, proposal, target, log_z, divergence=div,
                                      baseline=float(batch["baseline"]))
        with torch.no_grad():
            q_div = fdpg_loss.divergence_estimate(proposal, proposal, target, log_z, div)
            self._divergences.append((float(metrics["fdpg/divergence"]), float(q_div)))
            self.baseline.update(dp_mean(metrics["fdpg/weighted_pseudo_reward"].double(),
                                         self.engine.topo))
            metrics["kl"] = fdpg_loss.kl_estimate(logps, proposal, batch["base_logps"].to(dev))
            scores = batch["scores"].to(dev)
            name = "fdpg/constraint" if self.cfg.target == "constraint" else "fdpg/reward"
            metrics[name] = scores.mean()
            metrics["fdpg/distinct_1"], metrics["fdpg/distinct_2"] = batch["distinct"]
            metrics["fdpg/length"] = batch["lengths"].mean()
            metrics["fdpg/proposal_updates"] = torch.tensor(float(self.proposal_updates))
        return loop_output(losses, metrics)

    def load_state_dict(self, state: dict) -> None:
        self.partition.load_state_dict(state["partition"])
        self.baseline.load_state_dict(state["baseline"])
        self.proposal_updates = state.get("proposal_updates", 0)

    def state_dict(self) -> dict:
        return {"partition": self.partition.state_dict(), "baseline": self.baseline.state_dict(),
                "proposal_updates": self.proposal_updates}


class FDPGStage(Stage):
    """``hcx align`` with ``align.method: fdpg`` (see the module docstring)."""

    name = "fdpg"
    section = "align"

    def rules(self, recipe):
        a, p, t = recipe.align, recipe.parallel, recipe.train
        if a.fdpg is None:
            return [("align.fdpg", "align.method=fdpg needs align.fdpg (at least "
                     "align.fdpg.scorer)")]
        problems = raw_source_errors(recipe.data.sources, "prompts")
        problems += reference_errors(recipe) + prompt_room_errors(recipe)
        if p.pp != 1:
            problems.append(("parallel.pp", "align.method=fdpg samples through the generation "
                             "engine, which runs at pipeline size 1: set parallel.pp=1 (use "
                             "parallel.tp to split the model)"))
        s = a.fdpg.samples_per_prompt
        if t.micro_batch_size % s or t.global_batch_size % s:
            problems.append(("align.fdpg.samples_per_prompt", f"align.fdpg.samples_per_prompt={s}"
                             f" must divide train.micro_batch_size={t.micro_batch_size} and "
                             f"train.global_batch_size={t.global_batch_size}"))
        if recipe.data.eval_every:
            problems.append(("data.eval_every", "f-DPG reports its metrics on every step's "
                             "samples; set data.eval_every=0"))
        return problems

    def read(self, recipe, tokenizer, log):
        return load_prompts(recipe, tokenizer, log)

    def tasks(self, engine, tokenizer, prompts):
        recipe = engine.recipe
        base = frozen_model(recipe, engine.vocab_size, engine.topo,
                            reference_checkpoint(recipe), log_rank0)
        # No weights loaded: the task starts it as a copy of the policy.
        proposal = frozen_model(recipe, engine.vocab_size, engine.topo, None, log_rank0)
        scorer = load_scorer(recipe.align.fdpg.scorer, recipe, engine.topo, log_rank0)
        return FDPGTask(engine, tokenizer, prompts, base, proposal, scorer), None
