"""``hcx align``: preference alignment on the shared training loop.

A method is a loss from :mod:`hcx.stages.losses` over per-sequence log-probabilities; the model,
parallelism, schedules, optimizer and checkpoints are the training loop's
(:mod:`hcx.engine.loop`). Per micro-batch of ``train.micro_batch_size`` examples the model
sees every example's first completion, then every example's second (chosen rows then
rejected rows; KTO: completion rows then the mismatched rows of its reference point), in
one forward pass, as TRL's concatenated forward does. The loss sums over examples and
reports their count as the "tokens" of megatron's per-token loss, so a step's gradient
is the mean over the global batch's examples whatever the micro-batching, TP, PP or DP.

Reference log-probs (DPO, IPO, KTO, BCO) come from a frozen copy of the starting
weights (``align.reference``, default ``checkpoint.init_from``), either

- ``precomputed`` (default): one forward pass over every example before training, stored
  in ``<output_dir>/reference_logps.npz`` with a fingerprint of the reference checkpoint
  and of the rows, and reused on resume; only the policy is in memory while training; or
- ``live``: the frozen model stays in memory and scores each step's micro-batches.

Both give the same losses (a test checks it).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hcx.data.sources import SourceError, raw_source_errors, read_sources, source_records
from hcx.engine.batches import EpochOrder
from hcx.engine.loop import log_rank0
from hcx.engine.parallel import dp_gather, dp_mean
from hcx.engine.scoring import frozen_model, score, sequence_logps, token_logps_output
from hcx.engine.stage import Stage
from hcx.errors import HcxError
from hcx.stages.loss_helpers import loop_output
from hcx.stages.losses import (RunningMean, bco_loss, dpo_loss, ipo_loss, kto_loss,
                               kto_reference_point, orpo_loss)
from hcx.stages import preference

NEEDS_REFERENCE = ("dpo", "ipo", "kto", "bco")
REFERENCE_FILE = "reference_logps.npz"


class AlignError(HcxError, ValueError):
    pass


def rows_per_example(cfg) -> int:
    if cfg.method in preference.PAIRED_METHODS or (cfg.method == "kto" and cfg.kto_kl):
        return 2
    return 1


# --- data --------------------------------------------------------------------------------


def load_examples(recipe, tokenizer, log) -> tuple[list[preference.PreferenceExample],
                                                   list[preference.PreferenceExample]]:
    """(training, held-out) examples of every source, weighted as in SFT (2.0 = twice,
    0.5 = a seeded half)."""
    cfg, length = recipe.align, recipe.data.seq_length + 1
    stats = preference.PreferenceStats()

    def read(source):
        return preference.read_examples(source_records(source), tokenizer, cfg.method, length,
                                        cfg.max_prompt_length, cfg.skip_bad, stats)

    try:
        examples = read_sources(recipe.data.sources, read, recipe.train.seed, "examples",
                                lambda m: log(f"align: {m}"))
    except SourceError as e:
        raise AlignError(str(e)) from None
    if not examples:
        raise AlignError(f"no examples in data.sources ({stats.summary()})")
    log(f"align: {stats.summary()}")
    if cfg.method == "kto" and cfg.kto_kl:
        preference.add_kl_completions(examples, length, recipe.train.seed)
    if cfg.method == "bco" and cfg.bco_udm:
        summary = preference.fit_udm_weights(examples, seed=recipe.train.seed)
        log(f"align: BCO UDM weights of undesirable examples: {summary}")
    return preference.split_held_out(examples, cfg.held_out, recipe.train.seed) \
        if cfg.held_out else (examples, [])


# --- the reference model -----------------------------------------------------------------


def reference_errors(recipe) -> list[tuple[str, str]]:
    """A method compared against a reference model needs one."""
    if recipe.align.reference or recipe.checkpoint.init_from:
        return []
    return [("align.reference", f"align.method={recipe.align.method} compares against a "
             "reference model: set checkpoint.init_from (the SFT checkpoint) or "
             "align.reference")]


def held_out_errors(recipe) -> list[tuple[str, str]]:
    """A validation pass needs held-out examples."""
    if recipe.data.eval_every and not recipe.align.held_out:
        return [("data.eval_every", "data.eval_every needs held-out examples: set "
                 "align.held_out (e.g. 200) or data.eval_every=0")]
    return []


def reference_checkpoint(recipe) -> Path:
    from hcx.engine.checkpoint import checkpoint_path
    from hcx.paths import resolve

    problems = reference_errors(recipe)
    if problems:
        raise AlignError(problems[0][1])
    return checkpoint_path(resolve(recipe.align.reference or recipe.checkpoint.init_from))


def _reference_key(path: Path, examples: list[preference.PreferenceExample], seq_length: int) -> str:
    from hcx.engine.checkpoint import META

    h = hashlib.sha256()
    h.update(str(path.resolve()).encode() + (path / META).read_bytes())
    h.update(f"{seq_length}:{preference.fingerprint(examples)}".encode())
    return h.hexdigest()


def precomputed_reference(recipe, vocab_size: int, topo, path: Path,
                          examples: list[preference.PreferenceExample], pad: int, log) -> np.ndarray:
    """Reference log-probs ``[examples, rows per example]``: read from
    ``<output_dir>/reference_logps.npz`` when it was computed for this reference and these
    rows, else computed now (each DP rank scores its share) and stored atomically."""
    from megatron.core import parallel_state as ps

    file = Path(recipe.output_dir) / REFERENCE_FILE
    key = _reference_key(path, examples, recipe.data.seq_length)
    found = [False]
    if topo.rank == 0 and file.is_file():
        with np.load(file) as saved:
            found[0] = str(saved["key"]) == key
    dist.broadcast_object_list(found, src=0)
    if found[0]:
        log_rank0(f"align: reference log-probs from {file}")
        with np.load(file) as saved:
            return saved["logps"]

    log_rank0(f"align: scoring {len(examples):,} examples with the reference model {path}")
    model = frozen_model(recipe, vocab_size, topo, path, log)
    mb = recipe.train.micro_batch_size
    mine = list(range(topo.dp_rank, len(examples), topo.dp))
    chunks = [mine[i:i + mb] for i in range(0, len(mine), mb)]
    if chunks and len(chunks[-1]) < mb:  # one shape for every micro-batch: repeat the last
        chunks[-1] = chunks[-1] + [chunks[-1][-1]] * (mb - len(chunks[-1]))
    values: dict[int, list[float]] = {}
    per = 8  # micro-batches per pipeline pass
    bar = None
    if topo.rank == 0 and recipe.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chunks), desc="reference log-probs", unit="batch")
    for start in range(0, len(chunks), per):
        group = chunks[start:start + per]
        batches = [preference.rows_to_batch(preference.example_rows([examples[i] for i in c]),
                                   recipe.data.seq_length, pad) for c in group]
        for c, out in zip(group, score(model, batches, recipe.data.seq_length)):
            for j, i in enumerate(c):
                values[i] = out.reshape(-1, mb)[:, j].tolist()
        if bar:
            bar.update(len(group))
    if bar:
        bar.close()
    del model
    if topo.is_last_stage and topo.dp > 1:
        parts: list = [None] * topo.dp
        dist.all_gather_object(parts, values, group=ps.get_data_parallel_group())
        values = {k: v for part in parts for k, v in part.items()}
    if topo.is_last_stage and topo.dp_rank == 0 and topo.tp_rank == 0:
        logps = np.array([values[i] for i in range(len(examples))], dtype=np.float64)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp.npz")
        np.savez(tmp, logps=logps, key=np.array(key))
        os.replace(tmp, file)
    dist.barrier()
    with np.load(file) as saved:
        return saved["logps"]


# --- the stage ---------------------------------------------------------------------------


class AlignTask:
    """A preference loss on the shared training loop (see the module docstring).
    ``held_out``: a validation task (fixed positions, no state updates)."""

    def __init__(self, engine, examples: list[preference.PreferenceExample], pad: int, *,
                 reference: np.ndarray | None = None, live=None, held_out: bool = False,
                 running: RunningMean | None = None):
        self.engine, self.examples, self.pad = engine, examples, pad
        self.cfg = engine.recipe.align
        self.reference, self.live, self.held_out = reference, live, held_out
        self.running = running
        self.slots = rows_per_example(self.cfg)
        self.rows_per_microbatch = engine.recipe.train.micro_batch_size * self.slots
        self._example = EpochOrder(len(examples), engine.recipe.train.seed)

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        r = self.engine.recipe
        out = []
        for positions in self.engine.microbatch_positions(step, self.held_out):
            idx = [self._example(i) for i in positions]
            exs = [self.examples[i] for i in idx]
            batch = preference.rows_to_batch(preference.example_rows(exs), r.data.seq_length,
                                             self.pad)
            batch["desirable"] = torch.tensor([x.desirable for x in exs])
            batch["udm_weight"] = torch.tensor([x.udm_weight for x in exs], dtype=torch.float64)
            if self.reference is not None:  # slot-major, as the rows
                batch["ref_logps"] = torch.from_numpy(self.reference[idx].T.reshape(-1).copy())
            out.append(batch)
        if self.live is not None:
            for batch, ref in zip(out, score(self.live, out, r.data.seq_length)):
                batch["ref_logps"] = ref
        return out

    def forward_step(self, model, batch):
        return token_logps_output(model, batch), partial(self.loss, batch)

    def loss(self, batch, output):
        cfg = self.cfg
        dev = output.device
        logps, lengths = sequence_logps(output, batch["loss_mask"].to(dev))
        ref = batch["ref_logps"].to(dev) if "ref_logps" in batch else None
        mb = batch["desirable"].numel()
        desirable = batch["desirable"].to(dev)
        m = cfg.method
        if m == "dpo":
            losses, metrics = dpo_loss(logps[:mb], logps[mb:], ref[:mb], ref[mb:],
                                         beta=cfg.beta, label_smoothing=cfg.label_smoothing)
        elif m == "ipo":
            losses, metrics = ipo_loss(logps[:mb], logps[mb:], ref[:mb], ref[mb:],
                                         chosen_lengths=lengths[:mb],
                                         rejected_lengths=lengths[mb:], beta=cfg.beta)
        elif m == "orpo":
            losses, metrics = orpo_loss(logps[:mb], logps[mb:], chosen_lengths=lengths[:mb],
                                          rejected_lengths=lengths[mb:], beta=cfg.beta)
        elif m == "kto":
            z0 = (kto_reference_point(logps[mb:], ref[mb:], reduce=partial(dp_mean, topo=self.engine.topo))
                  if cfg.kto_kl else 0.0)
            losses, metrics = kto_loss(logps[:mb], ref[:mb], desirable, z0, beta=cfg.beta,
                                         desirable_weight=cfg.desirable_weight,
                                         undesirable_weight=cfg.undesirable_weight)
        elif m == "bco":
            rewards = cfg.beta * (logps.detach() - ref)
            if self.held_out:
                delta = self.running.mean
            else:  # every DP rank folds in the same global batch, so all keep one delta
                delta = self.running.update(dp_gather(rewards, self.engine.topo))
            weights = batch["udm_weight"].to(dev) if cfg.bco_udm else None
            losses, metrics = bco_loss(logps, ref, desirable, delta, beta=cfg.beta,
                                         udm_weights=weights)
        else:
            raise AlignError(f"align.method={m} is not a log-prob loss")
        if ref is not None:
            # How far the policy moved from the reference on these completions (a KL
            # estimate only for samples of the policy: see docs/alignment.md).
            metrics["logratio"] = (logps[:mb].detach() - ref[:mb]).float().mean()
        return loop_output(losses, metrics, metric_counts(m, desirable, losses.numel()))

    def state_dict(self) -> dict:
        """BCO's running reward mean, from the last pipeline stage (checkpoints are
        written by rank 0); empty for the other methods. Collective."""
        from megatron.core import parallel_state as ps

        state = [self.running.state_dict() if self.running is not None else {}]
        if self.engine.topo.pp > 1:
            dist.broadcast_object_list(state, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
        return {"bco_delta": state[0]} if state[0] else {}

    def load_state_dict(self, state: dict) -> None:
        if self.running is not None and state.get("bco_delta"):
            self.running.load_state_dict(state["bco_delta"])
            log_rank0(f"align: BCO reward shift delta {self.running.mean:.6g} restored "
                      f"({self.running.count:,} rewards seen)")


def metric_counts(method: str, desirable: torch.Tensor, n: int) -> dict[str, int]:
    """Unpaired methods average chosen/rejected metrics over desirable/undesirable rows
    only: weight them by those counts when averaging over micro-batches and ranks."""
    if method not in preference.UNPAIRED_METHODS:
        return {}
    good = int(desirable.sum())
    bad = n - good
    return {"rewards/chosen": good, "logps/chosen": good,
            "rewards/rejected": bad, "logps/rejected": bad,
            "rewards/margins": n if good and bad else 0}


@dataclass
class AlignData:
    examples: list[preference.PreferenceExample]
    held_out: list[preference.PreferenceExample]
    reference: np.ndarray | None = None  # precomputed reference log-probs of both


class AlignStage(Stage):
    """``hcx align`` with a log-prob loss (``align.method`` dpo, ipo, kto, bco, orpo):
    train the policy on preference data (see the module docstring)."""

    name = "align"
    section = "align"

    def rules(self, recipe):
        problems = raw_source_errors(recipe.data.sources, "preference examples")
        problems += held_out_errors(recipe)
        if recipe.align.method in NEEDS_REFERENCE:
            problems += reference_errors(recipe)
        return problems

    def read(self, recipe, tokenizer, log):
        return AlignData(*load_examples(recipe, tokenizer, log))

    def before_engine(self, recipe, topo, vocab_size, data, tokenizer):
        cfg = recipe.align
        if cfg.method in NEEDS_REFERENCE and cfg.reference_logps == "precomputed":
            # Before the policy and its optimizer exist: the only model in memory.
            data.reference = precomputed_reference(
                recipe, vocab_size, topo, reference_checkpoint(recipe),
                data.examples + data.held_out, tokenizer.pad, log_rank0)
        return data

    def tasks(self, engine, tokenizer, data):
        recipe, cfg = engine.recipe, engine.recipe.align
        live = None
        if cfg.method in NEEDS_REFERENCE and cfg.reference_logps == "live":
            live = frozen_model(recipe, engine.vocab_size, engine.topo,
                                reference_checkpoint(recipe), log_rank0)
        running = RunningMean() if cfg.method == "bco" else None
        n, ref = len(data.examples), data.reference
        task = AlignTask(engine, data.examples, tokenizer.pad, live=live, running=running,
                         reference=ref[:n] if ref is not None else None)
        valid = None
        if data.held_out and recipe.data.eval_every:
            valid = AlignTask(engine, data.held_out, tokenizer.pad, live=live, running=running,
                              held_out=True, reference=ref[n:] if ref is not None else None)
        return task, valid
