"""megatron-core optimizer (AdamW; distributed optimizer by default) and LR/WD schedule."""

from __future__ import annotations

import torch

from hcx.config import Recipe


def use_distributed_optimizer(recipe: Recipe) -> bool:
    return recipe.parallel.distributed_optimizer


def wrap_ddp(recipe: Recipe, module: torch.nn.Module, config):
    """megatron DDP: contiguous fp32 grad buffers that the megatron optimizer reads
    (and reduce-scatters into its shards with the distributed optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer(recipe),
        check_for_nan_in_grad=False,  # hcx checks the loss itself and names the step
        bucket_size=None,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)


def build_optimizer(recipe: Recipe, model_chunks: list, dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = recipe.train
    config = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay = AdamW
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.grad_clip,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=use_distributed_optimizer(recipe),
    )
    overrides = None
    if recipe.train.trainable != ["all"]:
        from megatron.core.optimizer import ParamKey, get_standard_config_overrides

        from hcx.engine.trainable import ROW_MASKED

        # A matrix that trains only some rows takes no weight decay: decay would move its
        # frozen rows (hcx.engine.trainable).
        overrides = get_standard_config_overrides(config)
        overrides[ParamKey(attr=ROW_MASKED)] = {"wd_mult": 0.0}
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)


def build_scheduler(recipe: Recipe, optimizer):
    """Linear warmup from 0, then cosine/linear decay to min_lr (or constant).
    Steps are optimizer steps; megatron counts samples, so we scale by the global batch."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = recipe.train
    gbs = t.global_batch_size
    decay_steps = t.decay_steps or t.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps * gbs,
        lr_decay_steps=decay_steps * gbs,
        lr_decay_style=t.decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_steps * gbs,
        wd_incr_style="constant",
        # The recipe defines the schedule; a checkpoint only restores the position in it
        # (so raising train.steps on resume stretches the decay, as users expect).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
