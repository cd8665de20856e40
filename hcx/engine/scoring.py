"""Scoring with a model that is not being trained: per-sequence log-probabilities of
completions, frozen copies of a model (a reference, a base, an f-DPG proposal).

A row is a prompt and a completion; ``loss_mask[j] = 1`` where label ``j`` is a
completion token. Megatron's GPTModel with ``labels`` returns the per-token
cross-entropy (identical on every TP rank), whose masked sum is the completion's negated
log-probability.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hcx.engine.parallel import device


def sequence_logps(output: torch.Tensor, loss_mask: torch.Tensor):
    """Summed log-probs of each row's completion and its token count, from megatron's
    per-token cross-entropy ``output`` [rows, seq] (identical on every TP rank)."""
    mask = loss_mask.float()
    return -(output.float() * mask).sum(1), mask.sum(1)


def freeze(model, path: Path | None, dtype: torch.dtype, log):
    """A built model stage for scoring only: on the device, ``path``'s weights (None: the
    caller fills them), no gradients, eval mode, wrapped for bf16."""
    from hcx.engine import checkpoint as ckpt

    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if path is not None:
        ckpt.load(path, model, restore_rng=False, log=log)
    model.requires_grad_(False)
    model.eval()
    if dtype == torch.bfloat16:
        from megatron.core.transformer.module import Float16Module

        return Float16Module(model.config, model)
    return model


def frozen_model(recipe, vocab_size: int, topo, path: Path | None, log):
    """This rank's stage of a model with ``path``'s weights, for scoring only."""
    from hcx.engine.model import build_gpt, compute_dtype, padded_vocab_size

    dtype = compute_dtype(recipe.train.precision)
    model = build_gpt(recipe.model, recipe.parallel,
                      padded_vocab_size(vocab_size, recipe.parallel.tp), recipe.data.seq_length,
                      dtype, pre_process=topo.is_first_stage, post_process=topo.is_last_stage)
    return freeze(model, path, dtype, log)


def token_logps_output(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """The model's output for a batch of rows with ``labels``: megatron's per-token
    cross-entropy (the negated log-probs :func:`sequence_logps` sums), on the last
    pipeline stage; the hidden states elsewhere. ``temperature``: of the softmax the
    log-probs are taken from (logits / T, the distribution sampling at T draws from, as
    TRL's GRPO and RLOO score their samples)."""
    dev = device()
    tokens = batch["tokens"].to(dev)
    pos = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    labels = batch["labels"].to(dev)
    if temperature == 1.0:
        return model(tokens, pos, None, labels=labels)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = model(tokens, pos, None)  # [b, s, vocab / tp] on the last stage
    return vocab_parallel_cross_entropy(logits.float() / temperature, labels)


@torch.no_grad()
def score(model, batches: list[dict], seq_length: int) -> list[torch.Tensor]:
    """Summed completion log-probs per row of each batch (a forward-only pipeline pass).
    On the last pipeline stage; an empty list elsewhere."""
    return _forward_only(model, batches, seq_length,
                         lambda output, mask: sequence_logps(output, mask)[0])


@torch.no_grad()
def token_scores(model, batches: list[dict], seq_length: int,
                 temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token log-probs ``[rows, seq_length]`` of each batch's labels, 0 outside
    ``loss_mask`` (a forward-only pipeline pass; the on-policy methods keep the rollout
    policy's and the reference's). On the last pipeline stage; an empty list elsewhere."""
    return _forward_only(model, batches, seq_length,
                         lambda output, mask: -output.float() * mask.float(), temperature)


def _forward_only(model, batches: list[dict], seq_length: int, reduce,
                  temperature: float = 1.0) -> list[torch.Tensor]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []
    dev = device()

    def forward_step(it, m):
        b = next(it)
        out = token_logps_output(m, b, temperature)
        mask = b["loss_mask"].to(dev)

        def collect(output, non_loss_data=False):
            return reduce(output, mask).detach().to("cpu", torch.float64)

        return out, collect

    training = model.training
    model.eval()  # a policy scored between its training steps: no dropout
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=seq_length,
            micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True,
            collect_non_loss_data=True)
    finally:
        model.train(training)
    return list(outputs) if outputs else []
