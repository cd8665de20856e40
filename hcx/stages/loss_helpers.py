"""What every loss shares: upcasting, inputs that take no gradient, metric means, and the
``(loss_sum, count, report)`` triple the training loop takes from a per-example loss."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Upcast to at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def constant(x: Tensor) -> Tensor:
    """An input that must not receive a gradient (a reference or proposal model's
    log-probs): detached and upcast."""
    return upcast(x.detach())


def put_mean(metrics: dict[str, Tensor], name: str, values: Tensor) -> None:
    """metrics[name] = mean of values, detached; skipped when there are no values."""
    if values.numel() > 0:
        metrics[name] = values.detach().float().mean()


def loop_output(losses: Tensor, metrics: dict[str, Tensor],
                counts: dict[str, int] | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """What a task's ``loss_func`` returns for per-example ``losses``: their sum, their
    count as megatron's "tokens" (so a step's gradient is the mean over the global batch's
    examples whatever the micro-batching and DP size), and a report of ``[sum, count]``
    pairs the loop averages over micro-batches and ranks. A metric is weighted by its
    entry in ``counts`` (default: every example); a counted metric missing from
    ``metrics`` (that side is absent from this micro-batch) reports ``[0, 0]``."""
    dev = losses.device
    n = losses.numel()
    one = torch.ones((), dtype=torch.float64, device=dev)
    counts = dict(counts or {})
    report = {"loss": torch.stack([losses.sum().detach().double(), n * one])}
    metrics = dict(metrics)
    for name in counts:
        if name not in metrics:
            metrics[name], counts[name] = torch.zeros((), device=dev), 0
    for name, value in metrics.items():
        c = counts.get(name, n)
        report[name] = torch.stack([value.to(dev).double() * c, c * one])
    return losses.sum(), torch.tensor(n, dtype=torch.int, device=dev), report
