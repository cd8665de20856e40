"""``hcx pretrain``: next-token prediction on blended megatron GPT samples."""

from __future__ import annotations

from functools import partial

import torch

from hcx.data.indexed import build_datasets, materialize_sources, stack_samples
from hcx.engine.batches import context_parallel_part, rank_microbatches
from hcx.engine.loop import Engine
from hcx.engine.parallel import device
from hcx.engine.stage import Stage


def lm_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Masked next-token cross-entropy: the schedule divides ``loss_sum`` by
    ``num_tokens`` and by the number of micro-batches (Megatron-LM's convention)."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"loss": report}


def microbatches(dataset, first_sample: int, global_batch: int, micro_batch: int, dp: int,
                 dp_rank: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of ``dataset`` for the global batch starting at
    ``first_sample``, in megatron's sampler order (:mod:`hcx.engine.batches`): any DP size
    sees the same global batch."""
    return [stack_samples(dataset, positions) for positions in
            rank_microbatches(first_sample, global_batch, micro_batch, dp, dp_rank)]


class PretrainTask:
    """Next-token prediction on blended megatron GPT samples. Training batches follow
    the run's data position; ``held_out`` (validation) batches always start at 0."""

    def __init__(self, engine: Engine, dataset, held_out: bool = False):
        self.engine = engine
        self.dataset = dataset
        self.held_out = held_out
        self.rows_per_microbatch = engine.recipe.train.micro_batch_size

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        return [stack_samples(self.dataset, positions)
                for positions in self.engine.microbatch_positions(step, self.held_out)]

    def forward_step(self, model, batch):
        dev = device()
        topo = self.engine.topo
        # Context parallelism: this rank's two chunks of every sequence (position ids
        # included, so RoPE sees the true positions).
        batch = context_parallel_part(batch, topo.cp, topo.cp_rank)
        tokens = batch["tokens"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        output = model(tokens, batch["position_ids"].to(dev), None, labels=labels)
        return output, partial(lm_loss, batch["loss_mask"].to(dev))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PretrainStage(Stage):
    name = "pretrain"
    per_token_loss = False  # equal token counts per micro-batch: Megatron-LM's mean of means
    context_parallel = True

    def read(self, recipe, tokenizer, log):
        # Before the process group exists: tokenizing a large raw source can take longer
        # than any collective timeout (processes coordinate through a file lock instead).
        return materialize_sources(recipe, tokenizer)

    def tasks(self, engine, tokenizer, prefixes):
        datasets = build_datasets(engine.recipe, prefixes, tokenizer)
        valid = None
        if datasets.valid is not None:
            valid = PretrainTask(engine, datasets.valid, held_out=True)
        return PretrainTask(engine, datasets.train), valid
