"""Forward passes without training: full-vocabulary logits on any TP/PP layout."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hcx.parallel import device
from hcx.train import Engine


@torch.no_grad()
def logits(engine: Engine, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` for ``tokens`` ``[batch, seq]``, on every rank.

    Runs megatron's forward-only pipeline schedule (so PP works), gathers the
    vocabulary shards over TP and broadcasts the result from the last stage.
    ``vocab_size`` trims megatron's vocabulary padding.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    dev = device()
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)

    def forward_step(it, model):
        batch = next(it)
        out = model(batch.to(dev), position_ids.to(dev), None)

        def collect(output, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output).float()

        return out, collect

    engine.ddp.eval()
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[engine.ddp],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
            collect_non_loss_data=True,
        )
    finally:
        engine.ddp.train()
    if engine.topo.is_last_stage:
        result = outputs[0].contiguous()
    else:
        result = torch.empty(b, s, engine.vocab_size, device=dev)
    if engine.topo.pp > 1:  # on the device: NCCL broadcasts GPU tensors only
        dist.broadcast(result, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    result = result.to("cpu")
    return result[..., :vocab_size] if vocab_size else result
