"""The hardware and how one training step is laid out on it: GPU specifications, the
recipe's parallel sizes and batch, and the layout rules a made-up layout must follow."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from hcx.config import ModelConfig, Recipe
from hcx.errors import HcxError

LayerImpl = Literal["fused", "local"]
Recompute = Literal["none", "selective", "full"]


class PlanError(HcxError, ValueError):
    """Arguments the plan cannot use (GPU count, MFU, token count, unknown GPU)."""


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's dense peak and memory: NVIDIA datasheets (SXM parts, no sparsity);
    memory in GiB, which is what the cards report (80 GB H100 = 79.6 GiB usable)."""

    name: str
    peak_tflops_bf16: float
    peak_tflops_fp32: float  # TF32 tensor cores
    memory_gib: float

    def peak_tflops(self, precision: str) -> float:
        return self.peak_tflops_bf16 if precision == "bf16" else self.peak_tflops_fp32


def _known_gpus() -> dict[str, GpuSpec]:
    from hcx.engine.metrics import PEAK_TFLOPS  # the table the engine's MFU uses
    import torch

    memory = {"H100": 80.0, "H200": 141.0, "A100": 80.0}
    return {name.lower(): GpuSpec(name, PEAK_TFLOPS[(name, torch.bfloat16)],
                                  PEAK_TFLOPS[(name, torch.float32)], mem)
            for name, mem in memory.items()}


def gpu_spec(name: str, peak_tflops: float | None = None,
             memory_gib: float | None = None) -> GpuSpec:
    """A known GPU (h100, h200, a100), with its peak or memory optionally replaced."""
    gpus = _known_gpus()
    if name.lower() not in gpus:
        raise PlanError(f"unknown GPU {name!r}; known: {', '.join(gpus)} "
                        "(or give --peak-tflops and --gpu-memory-gb)")
    g = gpus[name.lower()]
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise PlanError(f"--peak-tflops must be positive, got {peak_tflops}")
        g = GpuSpec(g.name, peak_tflops, peak_tflops, g.memory_gib)
    if memory_gib is not None:
        if memory_gib <= 0:
            raise PlanError(f"--gpu-memory-gb must be positive, got {memory_gib}")
        g = GpuSpec(g.name, g.peak_tflops_bf16, g.peak_tflops_fp32, memory_gib)
    return g


@dataclass(frozen=True)
class Layout:
    """How one step is laid out on the GPUs (the recipe's ``parallel`` and ``train``)."""

    tp: int
    pp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: Recompute  # a bool is read as full (True) or none (False)
    micro_batch: int
    global_batch: int
    seq_length: int
    precision: Literal["bf16", "fp32"]
    layer_impl: LayerImpl
    cp: int = 1
    recompute_method: Literal["uniform", "block"] | None = None  # full: None = uniform
    recompute_num_layers: int | None = None  # full: None = 1 (uniform) or all (block)

    def __post_init__(self):
        if isinstance(self.recompute, bool):
            object.__setattr__(self, "recompute", "full" if self.recompute else "none")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def local_seq_length(self) -> int:
        """Tokens of each sequence one GPU holds: context parallelism splits it over cp."""
        return self.seq_length // self.cp

    @property
    def optimizer_shards(self) -> int:
        """Ranks the distributed optimizer shards its state over: megatron's data-parallel
        group with context parallelism (dp x cp); 1 without the distributed optimizer."""
        return self.dp * self.cp if self.distributed_optimizer else 1

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step on each DP rank (``Recipe.num_microbatches``)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one activation or model weight in the compute dtype."""
        return 2 if self.precision == "bf16" else 4

    def replace(self, **changes: Any) -> "Layout":
        return Layout(**{**asdict(self), **changes})


def layout_from_recipe(recipe: Recipe) -> Layout:
    """``train.precision: auto`` is bf16 here: a plan is for GPUs. ``model.transformer_impl:
    auto`` counts Transformer Engine's fused layers (what ``auto`` picks where it is
    installed); ``local`` counts megatron's local layers (what CPUs and GPUs without
    Transformer Engine run)."""
    p, t = recipe.parallel, recipe.train
    return Layout(
        tp=p.tp, pp=p.pp, dp=p.dp, sequence_parallel=p.sequence_parallel,
        distributed_optimizer=p.distributed_optimizer, recompute=t.recompute, cp=p.cp,
        recompute_method=t.recompute_method, recompute_num_layers=t.recompute_num_layers,
        micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
        seq_length=recipe.data.seq_length,
        precision="fp32" if t.precision == "fp32" else "bf16",
        layer_impl="local" if recipe.model.transformer_impl == "local" else "fused",
    )


def layout_problems(model: ModelConfig, layout: Layout) -> list[str]:
    """The layout rules of ``hcx.config`` that involve the parallel sizes, for layouts
    the plan makes up itself (suggestions); recipes go through the config's own checks."""
    m, lo = model, layout
    checks = [
        (m.num_attention_heads % lo.tp == 0,
         f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={lo.tp}"),
        (m.query_groups % lo.tp == 0,
         f"model.num_query_groups={m.query_groups} is not divisible by parallel.tp={lo.tp}"),
        (m.ffn_hidden_size % lo.tp == 0,
         f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={lo.tp}"),
        (m.num_layers % lo.pp == 0,
         f"model.num_layers={m.num_layers} is not divisible by parallel.pp={lo.pp}"),
        (lo.global_batch % (lo.micro_batch * lo.dp) == 0,
         f"train.global_batch_size={lo.global_batch} is not divisible by "
         f"train.micro_batch_size * parallel.dp = {lo.micro_batch * lo.dp}"),
        (not (lo.sequence_parallel and lo.tp == 1), "parallel.sequence_parallel needs parallel.tp > 1"),
        (not (lo.sequence_parallel and lo.seq_length % lo.tp),
         f"data.seq_length={lo.seq_length} is not divisible by parallel.tp={lo.tp} "
         "(sequence parallelism)"),
        (lo.cp == 1 or lo.seq_length % (2 * lo.cp * (lo.tp if lo.sequence_parallel else 1)) == 0,
         f"data.seq_length={lo.seq_length} is not divisible by 2 x parallel.cp"
         f"{' x parallel.tp' if lo.sequence_parallel else ''} (context parallelism)"),
        (lo.cp == 1 or lo.layer_impl == "fused",
         "parallel.cp > 1 needs Transformer Engine's attention (not local layers)"),
    ]
    return [msg for ok, msg in checks if not ok]
