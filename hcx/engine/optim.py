"""megatron-core optimizer (AdamW; distributed optimizer by default) and LR/WD schedule."""

from __future__ import annotations

import torch

from hcx.config import Recipe, RecipeError


def use_distributed_optimizer(recipe: Recipe) -> bool:
    return recipe.parallel.distributed_optimizer


def wrap_ddp(recipe: Recipe, module: torch.nn.Module, config):
    """megatron DDP: contiguous fp32 grad buffers that the megatron optimizer reads
    (and reduce-scatters into its shards with the distributed optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    p = recipe.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer(recipe),
        check_for_nan_in_grad=False,  # hcx checks the loss itself and names the step
        bucket_size=p.bucket_size,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    buckets = sum(len(group.buckets) for group in ddp.bucket_groups)
    if p.overlap_param_gather and buckets > 1:
        # megatron-core 0.16.1 (its issue #504): with overlapped parameter gathers the
        # bucket padding and the distributed optimizer's reshardable checkpoint disagree
        # ("param range exceeds unpadded buffer ... padded with zeros"), and a run resumed
        # from such a checkpoint trains on corrupted optimizer state (observed here: the
        # loss after resuming differed by 0.3 from the uninterrupted run's).
        raise RecipeError(
            f"{recipe.where('parallel.overlap_param_gather')}: parallel.overlap_param_gather "
            f"with {buckets} buckets writes checkpoints that megatron-core "
            "0.16 cannot resume correctly (its distributed-optimizer bucket padding bug); "
            "set parallel.overlap_param_gather=false (parallel.overlap_grad_reduce alone "
            "is safe), or parallel.bucket_size at least the parameters per GPU "
            f"({sum(x.numel() for x in module.parameters()):,}) for one bucket")
    return ddp


def sync_params(recipe: Recipe, ddp) -> None:
    """Make every rank's parameters current. With ``parallel.overlap_param_gather`` the
    optimizer step leaves the updated shards to be all-gathered during the next forward
    pass; a checkpoint or a validation pass in between must not see the old values
    (Megatron-LM's training loop does the same around saves and evaluation)."""
    if recipe.parallel.overlap_param_gather:
        ddp.disable_forward_pre_hook(param_sync=True)
        ddp.enable_forward_pre_hook()


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
        # The optimizer must know too: with it, step() leaves the all-gather to the
        # forward pre-hooks of the next step instead of gathering at once.
        overlap_param_gather=recipe.parallel.overlap_param_gather,
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
