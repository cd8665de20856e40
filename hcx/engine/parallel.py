"""Process groups: torch.distributed + megatron-core parallel state.

torchrun (or SLURM through ``hcx launch``) starts one process per device. Here each
process joins the default group (NCCL on GPU, gloo on CPU), megatron-core builds the
tensor/pipeline/data-parallel groups, and all RNGs are seeded the way Megatron-LM does.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from hcx.engine import cpu_compat
from hcx.engine import mcore_fixes
from hcx.config import ParallelConfig
from hcx.errors import MachineError


@dataclass(frozen=True)
class Topology:
    """This process's place in the TP x CP x PP x DP grid (CP ranks of one DP rank read
    the same micro-batches and each takes its part of every sequence)."""

    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp: int
    pp: int
    dp: int
    cp: int = 1
    cp_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """One process reports: global rank 0 (metrics are broadcast to it)."""
        return self.rank == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(parallel: ParallelConfig, seed: int, timeout_minutes: int = 30) -> Topology:
    """Join the process group and build megatron-core's model-parallel groups."""
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.enable()
    mcore_fixes.apply()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "WORLD_SIZE" in os.environ:  # torchrun / SLURM: env:// rendezvous
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A single process without a launcher is a world of one: an in-memory
            # store, no ports to pick or collide on.
            if torch.cuda.is_available():
                torch.cuda.set_device(0)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
    world = dist.get_world_size()
    if world != parallel.world_size:
        raise MachineError(
            f"the recipe needs tp*pp*cp*dp = {parallel.tp}*{parallel.pp}*{parallel.cp}*"
            f"{parallel.dp} = "
            f"{parallel.world_size} processes but {world} were started; set parallel.dp or "
            f"launch with --nproc-per-node {parallel.world_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.cp,
        )
    topo = Topology(
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp=parallel.tp,
        pp=parallel.pp,
        dp=parallel_state.get_data_parallel_world_size(),
        cp=parallel.cp,
        cp_rank=parallel_state.get_context_parallel_rank(),
    )
    # As Megatron-LM: each pipeline stage gets its own stream, TP ranks get distinct
    # model-parallel streams through the tracker (dropout inside TP regions).
    stage_seed = seed + 100 * topo.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    return topo


def dp_mean(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The mean of ``x`` over the data-parallel ranks (a copy; ``x`` itself if dp = 1)."""
    from megatron.core import parallel_state

    if topo.dp == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, group=parallel_state.get_data_parallel_group())
    return x / topo.dp


def dp_gather(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    """Every data-parallel rank's ``x`` (same shape on each), concatenated in rank order."""
    from megatron.core import parallel_state

    if topo.dp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(topo.dp)]
    dist.all_gather(parts, x.contiguous(), group=parallel_state.get_data_parallel_group())
    return torch.cat(parts)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
