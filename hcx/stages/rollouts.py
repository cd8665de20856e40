"""Rollouts: K completions of each prompt sampled from the current policy, kept with what
several optimisation passes over them need.

:class:`RolloutEngine` is the one thing the on-policy stages ask of a sampler::

    generate(prompts, k, params) -> list[Completion]   # len(prompts) * k, prompt-major

``prompts`` are token ids ending with the open assistant turn; completion ``p * k + j`` is
the j-th sample of prompt ``p`` (the layout :mod:`hcx.stages.online_losses` groups by).
``params`` is :class:`hcx.engine.generate.SamplingParams` (temperature, top-p, stop ids,
``max_new_tokens`` and the seed). Every TP rank of a DP rank must get the same tokens.

:class:`PolicyRollouts` implements it with :class:`hcx.engine.generate.Generator` on the
training engine's own model (switched to eval mode for the decoding, back to training
after): no second copy of the policy, and TP-consistent tokens (the generator draws from
one seeded generator and broadcasts TP rank 0's choice). A faster engine (vLLM, SGLang)
can implement the same protocol; it must then receive the policy's weights before each
rollout and return the sampled ids exactly (the trainer re-scores them itself, so its
log-probs need not match the engine's).

:class:`Rollout` holds one rollout batch of a DP rank: prompt and completion ids, the
rewards and advantages, and per-token log-probs of the rollout policy ("old") and of the
reference, in completion coordinates ``[B, T]`` (T = ``max_new_tokens``, right padded,
``mask`` 1 on real tokens). It survives a checkpoint (:meth:`Rollout.state_dict`), so a run
stopped between two passes over it resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Protocol

import torch

from hcx.engine.generate import Generation, SamplingParams


@dataclass
class Completion:
    """One sampled completion: its new token ids (ending with the stop id when one ended
    it), the decoded text (stop ids left out) and why it ended ("stop" or "length")."""

    ids: list[int]
    text: str
    finish_reason: str


class RolloutEngine(Protocol):
    """Samples ``k`` completions of every prompt (see the module docstring)."""

    def generate(self, prompts: list[list[int]], k: int,
                 params: SamplingParams) -> list[Completion]: ...


class PolicyRollouts:
    """:class:`RolloutEngine` on the training engine's own model (see the module docstring).
    ``batch_size``: sequences per generator call (a larger rollout is split; each part
    draws from its own seed, ``params.seed + part``)."""

    def __init__(self, engine, tokenizer, batch_size: int = 64):
        from hcx.engine.generate import Generator

        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.generator = Generator(SimpleNamespace(ddp=engine.ddp, recipe=engine.recipe),
                                   tokenizer)

    def generate(self, prompts: list[list[int]], k: int,
                 params: SamplingParams) -> list[Completion]:
        from dataclasses import replace

        rows = [p for p in prompts for _ in range(k)]
        stops = set(params.stop_ids or (self.tokenizer.eod,))
        out: list[Completion] = []
        for part, start in enumerate(range(0, len(rows), self.batch_size)):
            chunk = rows[start:start + self.batch_size]
            generated: list[Generation] = self.generator.generate(
                chunk, replace(params, seed=params.seed + part))
            out += [Completion(g.ids, self.tokenizer.decode([t for t in g.ids if t not in stops]),
                               g.finish_reason) for g in generated]
        return out


def completion_index(prompt_lengths: list[int], width: int) -> torch.Tensor:
    """``[B, width]`` positions, in a row of :func:`hcx.stages.preference.rows_to_batch`,
    of each completion's t-th label (its t-th token): ``len(prompt) - 1 + t``. Positions past
    the row are clamped (the completion mask hides them)."""
    starts = torch.tensor(prompt_lengths, dtype=torch.long).unsqueeze(1) - 1
    return starts + torch.arange(width).unsqueeze(0)


def completion_mask(lengths: list[int], width: int) -> torch.Tensor:
    """``[B, width]``: 1.0 on each completion's real tokens."""
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()


def to_completion_tokens(per_token: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row-coordinate per-token values ``[B, seq]`` -> completion coordinates ``[B, T]``."""
    return per_token.gather(1, index.clamp(max=per_token.shape[1] - 1).to(per_token.device))


@dataclass
class Rollout:
    """One DP rank's rollout batch (see the module docstring). Rows are prompt-major."""

    number: int  # the rollout's index in the run (optimizer step // passes)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rewards: list[float]  # raw rewards (a sample without a verdict: its group's mean)
    parsed: list[bool]  # False: the reward gave no verdict
    advantages: list[float]
    finished: list[bool]  # ended by a stop id (not cut at max_new_tokens)
    old_logps: list[list[float]] | None = None  # [B, T] of the rollout policy
    ref_logps: list[list[float]] | None = None  # [B, T] of the reference model
    stats: dict[str, float] = field(default_factory=dict)  # step constants for the metrics

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: dict) -> "Rollout":
        return cls(**state)
