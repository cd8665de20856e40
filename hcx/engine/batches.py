"""Which samples a rank trains on: megatron's sampler order and epoch orders.

Every stage feeds the loop the same way: optimizer step ``k`` consumes the global batch
of samples ``[first, first + G)`` (``first`` = the run's data position, or ``k * G`` for a
fixed validation pass), taken ``micro_batch * dp`` at a time with each DP rank getting its
slice, so any DP size sees the same global batch (megatron's pretraining sampler). Stages
that visit a finite list of rows (SFT, alignment, f-DPG prompts) map a data position to a
row through :class:`EpochOrder`.
"""

from __future__ import annotations

import random


def rank_microbatches(first_sample: int, global_batch: int, micro_batch: int, dp: int,
                      dp_rank: int) -> list[range]:
    """The data positions of each of this DP rank's micro-batches for the global batch
    that starts at ``first_sample``."""
    out = []
    for k in range(global_batch // (micro_batch * dp)):
        start = first_sample + k * micro_batch * dp + dp_rank * micro_batch
        out.append(range(start, start + micro_batch))
    return out


def epoch_order(n: int, epoch: int, seed: int, lengths: list[int] | None = None,
                group: int = 0) -> list[int]:
    """The order rows are visited in an epoch: shuffled with (seed, epoch). With
    ``lengths`` and ``group``, rows are first sorted into groups of ``group`` similar
    lengths and whole groups are shuffled (length-grouped batches)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    if lengths is None or group <= 1:
        rng.shuffle(order)
        return order
    rng.shuffle(order)  # break ties between equal lengths differently per epoch
    order.sort(key=lambda i: lengths[i])
    groups = [order[i:i + group] for i in range(0, n, group)]
    rng.shuffle(groups)
    return [i for g in groups for i in g]


class EpochOrder:
    """The training loop's data position ``i`` -> row index: rows visited epoch after
    epoch, each epoch in its :func:`epoch_order` (the current epoch's order is cached)."""

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, group: int = 0):
        self.n, self.seed, self.lengths, self.group = n, seed, lengths, group
        self._epoch, self._order = -1, []

    def __call__(self, i: int) -> int:
        epoch, k = divmod(i, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_order(self.n, epoch, self.seed, self.lengths, self.group)
        return self._order[k]


def context_parallel_part(batch: dict, cp: int, cp_rank: int, seq_dim: int = 1) -> dict:
    """This context-parallel rank's part of every ``[batch, seq]`` tensor in ``batch``
    (megatron's load-balanced split, as Megatron-LM's ``get_batch_on_this_cp_rank``):
    the sequence is cut into ``2 * cp`` chunks and rank ``r`` keeps chunks ``r`` and
    ``2*cp - 1 - r``, so every rank gets an equal share of causal attention's work.
    Tensors without the sequence dimension are left as they are."""
    if cp == 1:
        return batch
    import torch

    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() <= seq_dim:
            out[key] = value
            continue
        s = value.shape[seq_dim]
        chunks = value.view(*value.shape[:seq_dim], 2 * cp, s // (2 * cp),
                            *value.shape[seq_dim + 1:])
        index = torch.tensor([cp_rank, 2 * cp - 1 - cp_rank], device=value.device)
        part = chunks.index_select(seq_dim, index)
        out[key] = part.reshape(*value.shape[:seq_dim], -1, *value.shape[seq_dim + 1:])
    return out
