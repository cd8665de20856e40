"""Forward passes without training: a checkpoint opened for inference, and
full-vocabulary logits on any TP/PP layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from hcx.engine.checkpoint import checkpoint_path
from hcx.config import Recipe
from hcx.errors import HcxError
from hcx.engine.parallel import device
from hcx.engine.loop import Engine


class CheckpointOpenError(HcxError, ValueError):
    pass


def checkpoint_recipe(ckpt: Path) -> Recipe:
    """The recipe a checkpoint was trained with (recorded in its metadata), its tokenizer
    the copy the checkpoint carries when it has one (so a checkpoint opens wherever it
    was moved or copied to), else the recorded path."""
    from hcx.engine import checkpoint

    ckpt = Path(ckpt)
    meta_file = ckpt / checkpoint.META
    if not meta_file.is_file():
        raise CheckpointOpenError(f"{ckpt}: not an hcx checkpoint (no {checkpoint.META})")
    meta = json.loads(meta_file.read_text())
    saved = meta.get("recipe")
    if not saved:
        raise CheckpointOpenError(f"{ckpt}: the checkpoint does not record its recipe")
    recipe = Recipe.model_validate(saved)
    carried = checkpoint.bundled_tokenizer(ckpt, meta)
    if carried is not None and recipe.data.tokenizer.kind != "bytes":
        tokenizer = recipe.data.tokenizer.model_copy(update={"path": str(carried)})
        recipe = recipe.model_copy(update={
            "data": recipe.data.model_copy(update={"tokenizer": tokenizer})})
    return recipe


def inference_recipe(recipe: Recipe, tp: int = 1, dp: int = 1) -> Recipe:
    """The recipe at tensor parallel size ``tp`` and ``dp`` replicas (each holding the
    whole model: no pipeline parallelism, no sequence parallelism), with the local layer
    spec: its attention
    takes the padding masks of batched generation (torch's fused SDPA kernels, on GPU
    too), and its dist-checkpoint keys are Transformer Engine's, so any checkpoint loads."""
    return recipe.model_copy(update={
        "parallel": recipe.parallel.model_copy(
            update={"tp": tp, "pp": 1, "dp": dp, "sequence_parallel": False}),
        "model": recipe.model.model_copy(update={"transformer_impl": "local"}),
    })


def open_checkpoint(ckpt: Path, tp: int = 1, log=print, dp: int = 1):
    """``(engine, tokenizer)`` with the checkpoint's weights, for inference at tensor
    parallel size ``tp`` (no pipeline parallelism, no optimizer); ``dp`` replicas of
    the model when ``tp * dp`` processes run this (data-parallel evaluation).

    dist_checkpointing reshards any saved layout, so a TP=2/PP=4 checkpoint opens in
    one process or at TP=8 alike (see :func:`inference_recipe`).
    """
    from hcx.engine import checkpoint
    from hcx.engine.model import model_vocab_size
    from hcx.tokenizer.loading import load_tokenizer
    from hcx.engine.loop import build_engine

    ckpt = checkpoint_path(ckpt)
    recipe = inference_recipe(checkpoint_recipe(ckpt), tp, dp)
    m = recipe.model
    if m.num_attention_heads % tp or m.query_groups % tp:
        raise CheckpointOpenError(
            f"tp={tp} must divide the attention heads ({m.num_attention_heads}) and the "
            f"key/value groups ({m.query_groups})")
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    engine = build_engine(recipe, model_vocab_size(recipe, tokenizer.vocab_size),
                          with_optimizer=False)
    checkpoint.load(ckpt, engine.model, restore_rng=False, log=log)
    return engine, tokenizer


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
