"""The model calls the server makes, as plain data: a :class:`Generate` or a
:class:`Score` is what the engine thread runs, and under tensor parallelism what rank 0
broadcasts so that every rank makes the very same call (the ranks' collectives pair up).

Requests that may share a batch have the same :meth:`key`; :func:`merge` joins them
into one call and :func:`split` hands each its part of the results. A batch never
changes a request's answer:

- greedy generation batches prompts of the same ``max_new_tokens`` and stop strings
  (left padding is masked, so each row decodes as it would alone);
- a sampled generation runs alone (its rows are drawn from one seeded generator, so
  another request in the batch would change the draws);
- scoring batches right-padded sequences (attention is causal: the padding after a
  sequence never reaches its positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hcx.evaluation.models import HcxModel, Sampling


@dataclass(frozen=True)
class Generate:
    """Continue each prompt (token ids) as ``HcxModel.generate`` does."""

    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    stops: tuple[str, ...] = ()
    sampling: Sampling | None = None  # None: greedy

    def key(self):
        return None if self.sampling else ("generate", self.max_new_tokens, self.stops)

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass(frozen=True)
class Score:
    """Per-token log-probabilities of whole sequences (one forward pass each) and the
    ``top`` most likely tokens at every position."""

    sequences: tuple[tuple[int, ...], ...]
    top: int

    def key(self):
        return ("score", self.top)

    @property
    def size(self) -> int:
        return len(self.sequences)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass(frozen=True)
class Ping:
    """Nothing to run: keeps the other ranks' wait for work from timing out."""


@dataclass(frozen=True)
class Stop:
    """The server stopped: the other ranks leave their loop."""


Work = Generate | Score


@dataclass
class SequenceScores:
    """A sequence's scores: for each token after the first, its log-probability and the
    ``top`` most likely tokens there (ids and log-probabilities, best first)."""

    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def merge(works: list[Work]) -> Work:
    """One call for works of the same key."""
    first = works[0]
    if len(works) == 1:
        return first
    if isinstance(first, Generate):
        return Generate(tuple(p for w in works for p in w.prompts), first.max_new_tokens,
                        first.stops, first.sampling)
    return Score(tuple(s for w in works for s in w.sequences), first.top)


def split(results: list, works: list[Work]) -> list[list]:
    """Each work's results, from the results of :func:`merge` (in the same order)."""
    out, k = [], 0
    for w in works:
        out.append(results[k:k + w.size])
        k += w.size
    return out


def run(model: HcxModel, work: Work | Ping) -> list:
    """Run one call on this rank (every TP rank runs the same)."""
    if isinstance(work, Ping):
        return []
    if isinstance(work, Generate):
        return model.generations([list(p) for p in work.prompts], work.max_new_tokens,
                                 work.stops, work.sampling)
    return score(model, [list(s) for s in work.sequences], work.top)


@torch.no_grad()
def score(model: HcxModel, sequences: list[list[int]], top: int) -> list[SequenceScores]:
    """Log-probabilities of every token of every sequence given the tokens before it,
    from one full forward pass (log-softmax in float32 over the tokenizer's vocabulary,
    not megatron's padded one)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from hcx.engine.generate import forward_logits

    longest = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), longest), model.tokenizer.pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s)
    engine = model.engine
    was_training = engine.ddp.training
    engine.ddp.eval()
    try:  # causal attention (no mask): the right padding never reaches a real position
        out = forward_logits(engine, tokens, None, StaticInferenceContext(len(sequences), longest),
                             model.vocab, all_positions=True).cpu()
    finally:
        engine.ddp.train(was_training)
    results = []
    for i, s in enumerate(sequences):
        lp = torch.log_softmax(out[i, : len(s) - 1].float(), dim=-1)
        target = torch.tensor(s[1:], dtype=torch.long)
        chosen = lp.gather(1, target[:, None])[:, 0] if len(s) > 1 else torch.empty(0)
        best = lp.topk(top, dim=-1) if top and len(s) > 1 else None
        results.append(SequenceScores(
            logprobs=chosen.tolist(),
            top_ids=best.indices.tolist() if best is not None else [[] for _ in s[1:]],
            top_logprobs=best.values.tolist() if best is not None else [[] for _ in s[1:]]))
    return results
