"""``hcx plan``: what a recipe costs on N GPUs, before any GPU is asked for.

Parameters (total, per GPU, per pipeline stage), training FLOPs per token, memory per
GPU (weights, gradients, optimizer state, activations with and without recomputation)
and the time to train at an assumed MFU; layouts that do not fit are flagged with the
component that dominates and the smallest layouts that would fit.

Sources of the formulas (each function's docstring gives its own):

- FLOPs: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM" (SC'21), Appendix: training = 3 x forward,
  ``6 * N_matmul + 12 * L * h * s`` per token (``hcx.engine.metrics.training_flops_per_token``,
  the same figure the engine's logged MFU uses).
- Weights, gradients, optimizer: Megatron-LM's distributed-optimizer note
  (docs/source/api-guide/dist_optimizer.md): bf16 parameters with fp32 gradients cost
  ``6 + 12/d`` bytes per parameter with the distributed optimizer (``18`` without),
  fp32 ``8 + 8/d`` (``16``), d = data-parallel size. hcx's DDP reduces gradients in
  fp32 (``hcx/engine/optim.py``: ``grad_reduce_in_fp32=True``).
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (arXiv 2205.05198), Sec. 4: ``s*b*h*(34 + 5*a*s/h)`` bytes per
  layer, divided by t with tensor + sequence parallelism; full recomputation keeps
  ``2*s*b*h`` per layer; 1F1B keeps ``p`` micro-batches in flight on the first stage.
  hcx's layer is not their GPT layer (SwiGLU, GQA, no dropout, fused attention), so
  the same accounting is redone for it (:func:`fused_layer_activation_bytes`, which
  gives their 34 + 5as/h back for their layer) and for megatron's local layers
  (:func:`local_layer_activation_bytes`, measured exactly on CPU in tests/ops/test_plan.py).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from hcx.config import ModelConfig, Recipe, load_config
from hcx.errors import HcxError

GIB = 2**30
FIT_FRACTION = 0.9  # a layout fits when its estimate is at most 90% of the GPU's memory
DEFAULT_MFU = 0.40

EXIT_FITS = 0
EXIT_INVALID = 2  # the recipe or layout is invalid (as for every recipe error)
EXIT_DOES_NOT_FIT = 3

LayerImpl = Literal["fused", "local"]


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


# --- the layout ------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How one step is laid out on the GPUs (the recipe's ``parallel`` and ``train``)."""

    tp: int
    pp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: bool
    micro_batch: int
    global_batch: int
    seq_length: int
    precision: Literal["bf16", "fp32"]
    layer_impl: LayerImpl

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

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
        distributed_optimizer=p.distributed_optimizer, recompute=t.recompute,
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
    ]
    return [msg for ok, msg in checks if not ok]


# --- parameters ------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the whole model (tied embeddings counted once), by part."""

    embedding: int
    attention_per_layer: int  # fused QKV + output projection
    mlp_per_layer: int  # SwiGLU gate + up (one fused fc1) + down
    norms_per_layer: int  # two RMSNorm weights
    num_layers: int
    final_norm: int
    output_layer: int  # 0 with tied embeddings
    total: int

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer

    @property
    def matmul(self) -> int:
        """Weights that take part in a matrix product per token: every layer's linear
        layers and the output layer (also when tied); not the embedding lookup or norms."""
        return self.num_layers * (self.attention_per_layer + self.mlp_per_layer) + \
            self.embedding


def parameter_counts(model: ModelConfig, padded_vocab: int) -> ParamCounts:
    """Exact counts for hcx's decoder: per layer ``h*(h + 2*kv) + h*h`` attention
    (kv = query groups x head size), ``3*h*f`` SwiGLU, ``2*h`` norms; ``V*h``
    embedding, ``V*h`` output layer unless tied, ``h`` final norm. V is the padded
    vocabulary (``hcx.engine.model.padded_vocab_size``)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.query_groups * (h // model.num_attention_heads)
    attention = h * (h + 2 * kv) + h * h
    mlp = 3 * h * f
    embedding = padded_vocab * h
    output = 0 if model.tie_embeddings else padded_vocab * h
    total = model.num_layers * (attention + mlp + 2 * h) + embedding + output + h
    return ParamCounts(embedding, attention, mlp, 2 * h, model.num_layers, h, output, total)


def stage_parameters(counts: ParamCounts, tie_embeddings: bool, tp: int, pp: int,
                     stage: int) -> int:
    """Parameters one GPU of pipeline stage ``stage`` holds at tensor-parallel size
    ``tp``: its ``L/pp`` layers (linear layers split over TP, norms replicated), the
    embedding on the first stage, the final norm and output layer on the last. With
    tied embeddings and ``pp > 1`` the last stage holds its own copy of the embedding
    (megatron keeps the two in sync by an all-reduce of their gradients)."""
    layers = counts.num_layers // pp
    n = layers * ((counts.attention_per_layer + counts.mlp_per_layer) // tp
                  + counts.norms_per_layer)
    vocab_shard = counts.embedding // tp
    if stage == 0:
        n += vocab_shard
    if stage == pp - 1:
        n += counts.final_norm
        if not tie_embeddings or pp > 1:
            n += vocab_shard
    return n


# --- weights, gradients, optimizer -----------------------------------------------


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each kind of state on one GPU."""

    weights: float  # model parameters in the compute dtype
    main_weights: float  # fp32 master copy (bf16 only), sharded over DP
    grads: float  # megatron DDP's contiguous gradient buffer
    moments: float  # Adam's exp_avg and exp_avg_sq, sharded over DP

    @property
    def total(self) -> float:
        return self.weights + self.main_weights + self.grads + self.moments


def state_bytes_per_parameter(precision: str, distributed_optimizer: bool, dp: int) -> StateBytes:
    """Megatron's accounting (Megatron-LM dist_optimizer.md), for hcx's settings:

    - weights: 2 bytes (bf16) or 4 (fp32), replicated over DP;
    - gradients: 4 bytes, fp32 in both precisions (``grad_reduce_in_fp32=True``); the
      buffer is whole on every DP rank (the distributed optimizer reduce-scatters into
      it, ZeRO-1);
    - fp32 main weights: 4 bytes for bf16 (none for fp32: the optimizer steps the
      parameters themselves) and Adam's two fp32 moments: 8 bytes, both divided by
      d = dp with the distributed optimizer, else by 1.

    bf16: 6 + 12/d (18 without the distributed optimizer); fp32: 8 + 8/d (16).
    """
    d = dp if distributed_optimizer else 1
    bf16 = precision == "bf16"
    return StateBytes(weights=2.0 if bf16 else 4.0, main_weights=(4.0 if bf16 else 0.0) / d,
                      grads=4.0, moments=8.0 / d)


# --- activations -----------------------------------------------------------------


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1,
                            sequence_parallel: bool = False, selective: bool = False) -> float:
    """Korthikanti et al. 2022, Sec. 4 (Table 2), their GPT layer (4h GeLU MLP,
    dropout, 16-bit activations): ``s*b*h*(34 + 5*a*s/h)`` bytes per layer; with TP
    alone ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``; with TP + SP everything over t;
    selective recomputation drops the ``5*a*s/h`` term (attention scores)."""
    scores = 0.0 if selective else 5.0 * a * s / h
    if sequence_parallel:
        return s * b * h * (34.0 + scores) / t
    return s * b * h * (10.0 + 24.0 / t + scores / t)


def fused_layer_activation_bytes(model: ModelConfig, s: int, b: int, t: int,
                                 sequence_parallel: bool, bytes_per_value: int, *,
                                 gated: bool = True, dropout: bool = False,
                                 attention_scores: bool = False) -> float:
    """Activations one transformer layer keeps for its backward pass, counted as
    Korthikanti et al. count them, for a fused implementation (Transformer Engine:
    norm + linear and norm + MLP modules, flash/cuDNN attention). Per token, in values
    of ``B = bytes_per_value`` bytes:

    - not split by TP unless sequence parallel: the two norms' inputs and the QKV and
      MLP inputs (the norms' outputs): ``4h``;
    - split by TP: Q ``h``, K and V ``kv`` each (GQA), the attention output ``h``,
      fc1's output (``2f`` for SwiGLU's gate and up, ``f`` for GeLU) and the
      activation's output ``f``;
    - fp32 softmax statistics (logsumexp, ``4a/t`` bytes) for fused attention, or with
      ``attention_scores`` the scores themselves as in their unfused attention:
      softmax output ``B*a*s``, plus dropout mask ``a*s`` and output ``B*a*s``;
    - with ``dropout``: 1-byte masks after attention and MLP (``2h``).

    Their GPT layer (``gated=False, dropout=True, attention_scores=True``, kv = h,
    f = 4h, B = 2) gives back their ``34 + 5*a*s/h`` (tests/ops/test_plan.py checks it).
    hcx (no dropout; SDPA or TE attention never stores the scores) is at their
    "selective recomputation" point without recomputing anything.
    """
    h, f, a = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads
    kv = model.query_groups * (h // a)
    B = bytes_per_value
    sp = t if sequence_parallel else 1
    replicated = B * 4 * h + (2 if dropout else 0) * h
    fc1_out = 2 * f if gated else f
    split = B * (h + 2 * kv + h + fc1_out + f)
    if attention_scores:
        split += (2 * B + (1 if dropout else 0)) * a * s
    else:
        split += 4 * a
    return s * b * (replicated / sp + split / t)


def local_layer_activation_bytes(model: ModelConfig, s: int, b: int, t: int,
                                 sequence_parallel: bool, bytes_per_value: int) -> float:
    """What megatron-core 0.16's local layers (hcx's spec on CPUs and on GPUs without
    Transformer Engine: ``hcx.engine.model.RMSNorm``, ``SDPAttention``, megatron's MLP) keep
    for backward in eager PyTorch, counted by storage (tests/ops/test_plan.py measures it
    exactly). Per token, in values:

    - each RMSNorm: its input, the normalized input and the output (``F.rms_norm``
      saves its input and ``x*rstd``; the next linear saves the output): ``3h`` each,
      plus a fp32 ``rstd``; not split by TP unless sequence parallel;
    - attention, split by TP: Q and K after RoPE, V, the SDPA output (the output
      projection's input is a view of it): ``4h`` with GQA (SDPAttention expands K and
      V to every head), ``4h + 2kv`` without (V is a view of the fused QKV output,
      which it keeps alive), and the fp32 logsumexp (``a``);
    - SwiGLU, split by TP: fc1's output ``2f``, ``silu(gate)``, ``up + offset``
      (megatron's ``glu_linear_offset`` makes a copy) and their product: ``5f``;
    - RoPE's cos and sin for Q and K: ``4*s*d`` values per layer (not per token).
    """
    h, f, a = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads
    d = h // a
    kv = model.query_groups * d
    B = bytes_per_value
    sp = t if sequence_parallel else 1
    norms = 2 * (3 * h * B + 4)
    attention = 4 * h * B if model.query_groups < a else (4 * h + 2 * kv) * B
    split = attention + 4 * a + 5 * f * B
    return s * b * (norms / sp + split / t) + 4 * s * d * B


def layer_activation_bytes(model: ModelConfig, layout: Layout) -> float:
    """One layer, one micro-batch, no recomputation, for the layout's implementation."""
    args = (model, layout.seq_length, layout.micro_batch, layout.tp,
            layout.sequence_parallel, layout.bytes_per_value)
    if layout.layer_impl == "local":
        return local_layer_activation_bytes(*args)
    return fused_layer_activation_bytes(*args)


def layer_input_bytes(model: ModelConfig, layout: Layout) -> float:
    """What full recomputation keeps of a layer: its input (``2*s*b*h`` in bf16, over t
    with sequence parallelism; Korthikanti et al. Sec. 4.2)."""
    sp = layout.tp if layout.sequence_parallel else 1
    return layout.seq_length * layout.micro_batch * model.hidden_size * \
        layout.bytes_per_value / sp


def output_activation_bytes(model: ModelConfig, padded_vocab: int, layout: Layout,
                            transient: bool = True) -> float:
    """The last stage's part after the layers, per micro-batch and token: the final
    norm (as a layer's norm; its output is the output layer's input), megatron's
    vocab-parallel cross entropy's fp32 softmax (``4*V/t`` bytes) and its int64 target
    and bool mask (9 bytes). ``transient``: also the 16-bit logits, alive next to
    their fp32 copy while the loss is computed."""
    h, B = model.hidden_size, layout.bytes_per_value
    sp = layout.tp if layout.sequence_parallel else 1
    norm = (3 * h * B + 4) if layout.layer_impl == "local" else 2 * h * B + 4
    per_token = norm / sp + 4 * padded_vocab / layout.tp + 9
    if transient and B < 4:
        per_token += B * padded_vocab / layout.tp
    return layout.seq_length * layout.micro_batch * per_token


def input_activation_bytes(layout: Layout) -> float:
    """The first stage's embedding keeps its int64 token ids (8 bytes per token) and,
    split over TP, a bool mask of the ids outside this rank's vocabulary range (1)."""
    return layout.seq_length * layout.micro_batch * (8.0 + (1.0 if layout.tp > 1 else 0.0))


def microbatches_in_flight(pp: int, stage: int, num_microbatches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under megatron's
    1F1B schedule: ``pp - stage - 1`` warm-up forwards plus the one in steady state,
    at most the micro-batches of the step (Narayanan et al. 2021, Sec. 2.2.1). The
    first stage holds ``pp``, the last 1; without pipelining, 1."""
    return max(1, min(pp - stage, num_microbatches))


# --- the estimate ----------------------------------------------------------------


@dataclass(frozen=True)
class StageEstimate:
    """Memory of one GPU of a pipeline stage, in bytes."""

    stage: int
    layers: int
    params: int
    microbatches_in_flight: int
    weights: float
    main_weights: float
    grads: float
    moments: float
    activations: float  # with the layout's recomputation setting
    activations_no_recompute: float
    activations_full_recompute: float

    @property
    def total(self) -> float:
        return self.weights + self.main_weights + self.grads + self.moments + self.activations

    def components(self) -> dict[str, float]:
        return {"weights": self.weights, "main weights": self.main_weights,
                "gradients": self.grads, "Adam moments": self.moments,
                "activations": self.activations}


def stage_activation_bytes(model: ModelConfig, padded_vocab: int, layout: Layout,
                           stage: int, recompute: bool) -> float:
    """Activations one GPU of ``stage`` holds at its peak: ``in_flight`` micro-batches of
    its layers (each whole, or only its input under full recomputation, plus one layer
    rebuilt during the backward pass), the embedding's token ids on the first stage, the
    output layer and loss on the last (one micro-batch: the last stage has one in flight)."""
    layers = model.num_layers // layout.pp
    n = microbatches_in_flight(layout.pp, stage, layout.num_microbatches)
    full = layer_activation_bytes(model, layout)
    if recompute:  # + RoPE's fp32 table, an input of every checkpointed layer (kept once)
        per_mb = layers * layer_input_bytes(model, layout) + \
            4.0 * layout.seq_length * (model.hidden_size // model.num_attention_heads)
        working = full
    else:
        per_mb, working = layers * full, 0.0
    if stage == 0:
        per_mb += input_activation_bytes(layout)
    act = n * per_mb + working
    if stage == layout.pp - 1:
        act += output_activation_bytes(model, padded_vocab, layout)
    return act


def estimate_stage(model: ModelConfig, counts: ParamCounts, padded_vocab: int,
                   layout: Layout, stage: int) -> StageEstimate:
    params = stage_parameters(counts, model.tie_embeddings, layout.tp, layout.pp, stage)
    per = state_bytes_per_parameter(layout.precision, layout.distributed_optimizer, layout.dp)
    act = {r: stage_activation_bytes(model, padded_vocab, layout, stage, r) for r in (False, True)}
    return StageEstimate(
        stage=stage, layers=model.num_layers // layout.pp, params=params,
        microbatches_in_flight=microbatches_in_flight(layout.pp, stage, layout.num_microbatches),
        weights=params * per.weights, main_weights=params * per.main_weights,
        grads=params * per.grads, moments=params * per.moments,
        activations=act[layout.recompute], activations_no_recompute=act[False],
        activations_full_recompute=act[True])


@dataclass
class Plan:
    """Everything ``hcx plan`` reports (``to_dict`` for ``--json``)."""

    recipe: str
    gpu: GpuSpec
    layout: Layout
    mfu: float
    vocab_size: int
    padded_vocab: int
    params: ParamCounts
    stages: list[StageEstimate]
    flops_per_token: float
    attention_flops_per_token: float
    tokens: int
    tokens_from: str
    layer_activation_bytes: float  # one layer, one micro-batch, no recomputation
    korthikanti_layer_bytes: float  # the same for their GPT layer of this shape
    korthikanti_selective_bytes: float  # ... without the attention scores
    problems: list[str] = field(default_factory=list)  # the recipe/layout is invalid
    flags: list[str] = field(default_factory=list)  # warnings
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_tflops(self) -> float:
        return self.gpu.peak_tflops(self.layout.precision)

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def seconds(self) -> float:
        """Time to train: total FLOPs / (GPUs x peak x MFU)."""
        return self.total_flops / (self.layout.gpus * self.peak_tflops * 1e12 * self.mfu)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu / self.flops_per_token

    @property
    def worst(self) -> StageEstimate | None:
        return max(self.stages, key=lambda st: st.total) if self.stages else None

    @property
    def limit_bytes(self) -> float:
        return FIT_FRACTION * self.gpu.memory_gib * GIB

    @property
    def verdict(self) -> str:
        if self.problems:
            return "invalid layout"
        return "fits" if self.worst.total <= self.limit_bytes else "does not fit"

    @property
    def exit_code(self) -> int:
        return {"fits": EXIT_FITS, "does not fit": EXIT_DOES_NOT_FIT}.get(self.verdict,
                                                                          EXIT_INVALID)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        gib = lambda x: round(x / GIB, 3)  # noqa: E731
        return {
            "recipe": self.recipe,
            "verdict": self.verdict,
            "gpu": asdict(self.gpu) | {"peak_tflops_used": self.peak_tflops},
            "gpus": self.layout.gpus,
            "layout": asdict(self.layout) | {"num_microbatches": self.layout.num_microbatches},
            "mfu": self.mfu,
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab,
            "parameters": asdict(self.params) | {"per_layer": self.params.per_layer,
                                                 "matmul": self.params.matmul},
            "parameters_per_gpu": max((st.params for st in self.stages), default=None),
            "flops_per_token": self.flops_per_token,
            "attention_flops_per_token": self.attention_flops_per_token,
            "tokens": self.tokens,
            "tokens_from": self.tokens_from,
            "total_flops": self.total_flops,
            "time_to_train_s": self.seconds,
            "time_to_train_days": self.seconds / 86400,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tokens_per_s": self.tokens_per_s_per_gpu * self.layout.gpus,
            "memory_limit_gib": gib(self.limit_bytes),
            "memory_per_gpu_gib": None if worst is None else gib(worst.total),
            "headroom_gib": None if worst is None else gib(self.gpu.memory_gib * GIB - worst.total),
            "layer_activation_gib": gib(self.layer_activation_bytes),
            "korthikanti_layer_gib": gib(self.korthikanti_layer_bytes),
            "korthikanti_selective_layer_gib": gib(self.korthikanti_selective_bytes),
            "stages": [_stage_dict(st) for st in self.stages],
            "problems": self.problems,
            "flags": self.flags,
            "suggestions": self.suggestions,
            "notes": self.notes,
        }


def _stage_dict(st: StageEstimate) -> dict[str, Any]:
    counts = ("stage", "layers", "params", "microbatches_in_flight")
    d = asdict(st) | {"total": st.total}
    return {(k if k in counts else f"{k}_gib"): (v if k in counts else round(v / GIB, 3))
            for k, v in d.items()}


def estimate(model: ModelConfig, layout: Layout, vocab_size: int, gpu: GpuSpec,
             mfu: float = DEFAULT_MFU, tokens: int | None = None, recipe_name: str = "",
             steps: int | None = None, problems: list[str] | None = None) -> Plan:
    """The plan for a model and layout; ``problems`` (from the recipe checks) leave the
    per-GPU figures out. ``tokens`` defaults to ``steps * global_batch * seq_length``."""
    from hcx.engine.metrics import training_flops_per_token
    from hcx.engine.model import padded_vocab_size

    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    padded = padded_vocab_size(vocab_size, layout.tp)
    counts = parameter_counts(model, padded)
    problems = list(problems or [])
    stages = [] if problems else [estimate_stage(model, counts, padded, layout, i)
                                  for i in range(layout.pp)]
    s = layout.seq_length
    if tokens is None:
        if steps is None:
            raise PlanError("give tokens or steps")
        tokens, tokens_from = steps * layout.global_batch * s, \
            f"train.steps x global batch x seq_length = {steps} x {layout.global_batch} x {s}"
    else:
        tokens_from = "--tokens"
    plan = Plan(
        recipe=recipe_name, gpu=gpu, layout=layout, mfu=mfu, vocab_size=vocab_size,
        padded_vocab=padded, params=counts, stages=stages,
        flops_per_token=training_flops_per_token(model, padded, s),
        attention_flops_per_token=12.0 * model.num_layers * model.hidden_size * s,
        tokens=tokens, tokens_from=tokens_from,
        layer_activation_bytes=layer_activation_bytes(model, layout),
        korthikanti_layer_bytes=korthikanti_layer_bytes(
            s, layout.micro_batch, model.hidden_size, model.num_attention_heads, layout.tp,
            layout.sequence_parallel, selective=False),
        korthikanti_selective_bytes=korthikanti_layer_bytes(
            s, layout.micro_batch, model.hidden_size, model.num_attention_heads, layout.tp,
            layout.sequence_parallel, selective=True),
        problems=problems,
    )
    _annotate(plan, model)
    return plan


def _annotate(plan: Plan, model: ModelConfig) -> None:
    """Flags, suggestions and notes."""
    lo = plan.layout
    if lo.layer_impl == "fused":
        plan.notes.append("activations counted for Transformer Engine's fused layers "
                          "(model.transformer_impl=auto on a GPU with TE); "
                          "model.transformer_impl=local counts megatron's local layers, "
                          "which keep more")
    if lo.recompute:
        plan.notes.append("train.recompute=true: the backward pass runs each layer's "
                          "forward again (about 4/3 of the compute), so expect a lower "
                          "MFU for the same hardware utilization")
    if plan.problems:
        return
    if lo.tp > 1 and not lo.sequence_parallel:
        plan.flags.append(f"parallel.tp={lo.tp} without parallel.sequence_parallel: the "
                          "norms' activations are replicated on every TP rank")
    if lo.pp > 1:
        bubble = (lo.pp - 1) / lo.num_microbatches
        if bubble > 0.25:
            plan.flags.append(
                f"pipeline bubble (pp-1)/m = {lo.pp - 1}/{lo.num_microbatches} = "
                f"{bubble:.0%} of a step (Narayanan et al.): raise the global batch or "
                "lower the micro batch, or the stated MFU is out of reach")
    if lo.tp > 8:
        plan.flags.append(f"parallel.tp={lo.tp} spans more than one 8-GPU node: TP traffic "
                          "would cross the network")
    if plan.verdict == "does not fit":
        worst = plan.worst
        comps = worst.components()
        top = max(comps, key=comps.get)
        plan.flags.append(
            f"does not fit: stage {worst.stage} needs {worst.total / GIB:.1f} GiB per GPU, "
            f"over {FIT_FRACTION:.0%} of {plan.gpu.memory_gib:g} GiB; the largest part is "
            f"{top} ({comps[top] / GIB:.1f} GiB)")
        plan.suggestions.extend(suggest_layouts(model, lo, plan.vocab_size, plan.gpu))


def suggest_layouts(model: ModelConfig, layout: Layout, vocab_size: int, gpu: GpuSpec,
                    limit: int = 3) -> list[str]:
    """The smallest changes, on the same number of GPUs, that fit: first one setting
    at a time (recomputation, sequence parallelism, a smaller micro batch, the
    distributed optimizer), then layouts with more TP (up to 8, one node) or PP, least
    model parallelism and no recomputation first."""
    from hcx.engine.model import padded_vocab_size

    n = layout.gpus
    single: list[tuple[str, Layout]] = []
    if not layout.recompute:
        single.append(("train.recompute=true", layout.replace(recompute=True)))
    if layout.tp > 1 and not layout.sequence_parallel:
        single.append(("parallel.sequence_parallel=true",
                       layout.replace(sequence_parallel=True)))
    if layout.micro_batch > 1:
        single.append(("train.micro_batch_size=1", layout.replace(micro_batch=1)))
    if not layout.distributed_optimizer and layout.dp > 1:
        single.append(("parallel.distributed_optimizer=true",
                       layout.replace(distributed_optimizer=True)))
    grid: list[tuple[tuple, str, Layout]] = []
    for tp in (1, 2, 4, 8):
        for pp in [p for p in range(1, model.num_layers + 1) if model.num_layers % p == 0]:
            if n % (tp * pp) or (tp, pp) == (layout.tp, layout.pp):
                continue
            for recompute in (False, True):
                for mb in sorted({layout.micro_batch, 1}, reverse=True):
                    cand = layout.replace(tp=tp, pp=pp, dp=n // (tp * pp),
                                          sequence_parallel=tp > 1, recompute=recompute,
                                          micro_batch=mb)
                    keys = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={n // (tp * pp)}"]
                    if tp > 1:
                        keys.append("parallel.sequence_parallel=true")
                    if recompute != layout.recompute:
                        keys.append(f"train.recompute={str(recompute).lower()}")
                    if mb != layout.micro_batch:
                        keys.append(f"train.micro_batch_size={mb}")
                    grid.append(((tp * pp, recompute, -mb, pp), " ".join(keys), cand))
    out = []
    for text, cand in single + [(t, c) for _, t, c in sorted(grid, key=lambda x: x[0])]:
        if layout_problems(model, cand):
            continue
        padded = padded_vocab_size(vocab_size, cand.tp)
        counts = parameter_counts(model, padded)
        need = max(estimate_stage(model, counts, padded, cand, i).total for i in range(cand.pp))
        if need <= FIT_FRACTION * gpu.memory_gib * GIB:
            out.append(f"{text}: {need / GIB:.1f} GiB per GPU")
            if len(out) >= limit:
                break
    if not out:
        out.append(f"no layout of {n} GPUs up to tp=8 fits: use more GPUs or GPUs with more memory")
    return out


# --- from a recipe file ----------------------------------------------------------


def parse_tokens(text: str) -> int:
    """``300B``, ``1.5T``, ``2e12`` or ``123456`` -> a token count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise PlanError(f"--tokens {text!r}: expected a number, optionally with K, M, B or T "
                        "(e.g. 300B, 1.5T)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise PlanError(f"--tokens {text!r} must be positive")
    return value


def recipe_vocab_size(recipe: Recipe) -> int:
    """``model.vocab_size``, else the tokenizer's vocabulary (as ``hcx pretrain``)."""
    if recipe.model.vocab_size is not None:
        return recipe.model.vocab_size
    from hcx.tokenizer.loading import load_tokenizer

    try:
        return load_tokenizer(recipe.data.tokenizer).vocab_size
    except (HcxError, OSError) as e:
        raise PlanError(f"cannot read the vocabulary size from data.tokenizer ({e}); set "
                        "model.vocab_size=N to plan without the tokenizer") from None


def plan_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                gpus: int | None = None, gpu: GpuSpec | None = None, mfu: float = DEFAULT_MFU,
                tokens: int | None = None) -> Plan:
    """Load a recipe (``--gpus N`` sets ``parallel.dp = N / (tp * pp)``) and plan it.
    Invalid combinations (heads or groups not divisible by TP, layers by PP, batch by
    micro batch x DP, ...) become ``Plan.problems`` with the recipe's own messages."""
    from hcx.config import layout_errors, origin_of

    from hcx.resources import recipe_path

    overrides = list(overrides)
    recipe, _ = load_config(recipe_path(path), Recipe, overrides)
    notes = []
    if gpus is not None:
        if gpus <= 0:
            raise PlanError(f"--gpus must be positive, got {gpus}")
        mp = recipe.parallel.tp * recipe.parallel.pp
        if gpus % mp:
            raise PlanError(f"--gpus {gpus} is not divisible by parallel.tp * parallel.pp = "
                            f"{recipe.parallel.tp} * {recipe.parallel.pp} = {mp}")
        if gpus // mp != recipe.parallel.dp:
            notes.append(f"parallel.dp={gpus // mp} (from --gpus {gpus}; the recipe has "
                         f"{recipe.parallel.dp})")
            overrides.append(f"parallel.dp={gpus // mp}")
    recipe, origins = load_config(path, Recipe, overrides)
    problems = [f"{origin_of(key, origins, str(path))}: {msg}"
                for key, msg in layout_errors(recipe)]
    plan = estimate(recipe.model, layout_from_recipe(recipe), recipe_vocab_size(recipe),
                    gpu or gpu_spec("h100"), mfu, tokens, recipe.name, recipe.train.steps,
                    problems)
    plan.notes[:0] = notes
    return plan


# --- text ------------------------------------------------------------------------


def _rows(rows: list[tuple[str, float]]) -> list[str]:
    return [f"  {label:<80}{_n(value):>15}" for label, value in rows]


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"),
                          (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.1f} minutes"


def format_plan(plan: Plan) -> str:
    """The human-readable report."""
    lo, p, g = plan.layout, plan.params, plan.gpu
    out = [
        f"hcx plan: {plan.recipe} on {lo.gpus} x {g.name} ({plan.peak_tflops:g} {lo.precision} "
        f"TFLOP/s peak, {g.memory_gib:g} GiB), MFU {plan.mfu:.0%}"
        + (" (default; --mfu)" if plan.mfu == DEFAULT_MFU else ""),
        f"layout: tp={lo.tp} pp={lo.pp} dp={lo.dp}, sequence parallel "
        f"{'on' if lo.sequence_parallel else 'off'}, distributed optimizer "
        f"{'on' if lo.distributed_optimizer else 'off'}, recompute "
        f"{'full' if lo.recompute else 'off'}, {lo.precision}",
        f"        micro batch {lo.micro_batch} x {lo.seq_length} tokens, global batch "
        f"{lo.global_batch} ({lo.num_microbatches} micro-batch"
        f"{'es' if lo.num_microbatches > 1 else ''} per DP rank per step)",
        "",
        "parameters",
        *_rows([
            (f"embedding ({plan.padded_vocab:,} x {p.embedding // plan.padded_vocab:,}, "
             f"vocabulary {plan.vocab_size:,} padded)", p.embedding),
            (f"{p.num_layers} layers of {_n(p.per_layer)}: attention "
             f"{_n(p.attention_per_layer)}, MLP {_n(p.mlp_per_layer)}, norms "
             f"{_n(p.norms_per_layer)}", p.num_layers * p.per_layer),
            ("final norm", p.final_norm),
            ("output layer" + (" (tied: the embedding)" if p.output_layer == 0 else ""),
             p.output_layer),
            (f"total ({_si(p.total)})", p.total),
        ]),
    ]
    if plan.stages:
        out += _rows([(f"per GPU{f' of stage {st.stage}' if lo.pp > 1 else ''} (tp={lo.tp})",
                        st.params) for st in plan.stages[:4]])
        if lo.pp > 4:
            out += _rows([(f"per GPU of stage {plan.stages[-1].stage}", plan.stages[-1].params)])
    out += [
        "",
        f"FLOPs per token (training)  {_si(plan.flops_per_token, 'FLOP')}"
        f" = 6 x {_si(p.matmul)} matmul weights (layers + output layer)"
        f" + 12 x L x h x s attention ({_si(plan.attention_flops_per_token, 'FLOP')})",
        "  (Narayanan et al. 2021: forward + backward = 3 x forward; recomputation not counted)",
    ]
    if plan.stages:
        out += ["", _memory_table(plan)]
    out += [
        "",
        f"tokens      {_si(plan.tokens)}  ({plan.tokens_from})",
        f"compute     {plan.total_flops:.3g} FLOPs",
        f"time        {_duration(plan.seconds)} on {lo.gpus} GPU{'s' if lo.gpus > 1 else ''} at "
        f"{plan.mfu:.0%} MFU"
        f"  = FLOPs / (GPUs x peak x MFU)",
        f"throughput  {_n(plan.tokens_per_s_per_gpu)} tokens/s per GPU, "
        f"{_n(plan.tokens_per_s_per_gpu * lo.gpus)} tokens/s in all",
        "",
    ]
    if plan.problems:
        out.append("recipe problems (no per-GPU figures until they are fixed):")
        out += [f"  - {x}" for x in plan.problems]
    out += [f"flag: {x}" for x in plan.flags]
    if plan.suggestions:
        out.append("layouts that fit on the same GPUs:")
        out += [f"  - {x}" for x in plan.suggestions]
    out += [f"note: {x}" for x in plan.notes]
    worst = plan.worst
    if worst is not None:
        out.append(f"verdict: {plan.verdict} ({worst.total / GIB:.1f} of {g.memory_gib:g} GiB per "
                   f"GPU{f' on stage {worst.stage}' if lo.pp > 1 else ''}, "
                   f"limit {FIT_FRACTION:.0%}; headroom "
                   f"{g.memory_gib - worst.total / GIB:.1f} GiB)")
    else:
        out.append(f"verdict: {plan.verdict}")
    return "\n".join(out)


def _memory_table(plan: Plan) -> str:
    lo = plan.layout
    shown = plan.stages if lo.pp <= 4 else [plan.stages[0], plan.stages[1], plan.stages[-1]]
    per = state_bytes_per_parameter(lo.precision, lo.distributed_optimizer, lo.dp)
    shard = f"/{lo.dp} DP" if lo.distributed_optimizer and lo.dp > 1 else "whole"
    rows = [
        (f"weights ({lo.precision}, {per.weights:g} B/param)", lambda st: st.weights),
        (f"main weights (fp32, {shard})", lambda st: st.main_weights),
        ("gradients (fp32 DDP buffer)", lambda st: st.grads),
        (f"Adam moments (2 x fp32, {shard})", lambda st: st.moments),
        (f"activations ({'full recompute' if lo.recompute else 'no recompute'})",
         lambda st: st.activations),
        ("total", lambda st: st.total),
        ("  activations without recompute", lambda st: st.activations_no_recompute),
        ("  activations with full recompute", lambda st: st.activations_full_recompute),
        ("  micro-batches in flight (1F1B)", None),
    ]
    head = f"{'memory per GPU (GiB)':<40}" + "".join(
        f"{('stage ' + str(st.stage)) if lo.pp > 1 else 'per GPU':>12}" for st in shown)
    lines = [head]
    for label, get in rows:
        cells = "".join(f"{st.microbatches_in_flight:>12}" if get is None
                        else f"{get(st) / GIB:>12.2f}" for st in shown)
        lines.append(f"  {label:<38}{cells}")
    lines.append(f"  one layer, one micro-batch: {plan.layer_activation_bytes / GIB:.3f} GiB; "
                 f"Korthikanti et al.'s GPT layer of this shape: "
                 f"{plan.korthikanti_selective_bytes / GIB:.3f} GiB with selective "
                 f"recomputation, {plan.korthikanti_layer_bytes / GIB:.3f} without")
    return "\n".join(lines)
