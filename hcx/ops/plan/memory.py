"""Memory per GPU, from first principles: parameter counts (whole model and per
pipeline stage), bytes of weights, gradients and optimizer state per parameter, and the
activations a layer, the embedding and the output layer keep for the backward pass;
:func:`estimate_stage` adds them up for one GPU of a pipeline stage. The sources of the
formulas are in hcx/ops/plan/__init__.py and each function's docstring."""

from __future__ import annotations

from dataclasses import dataclass

from hcx.config import ModelConfig
from hcx.ops.plan.layout import Layout

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
                            sequence_parallel: bool = False, selective: bool = False,
                            full: bool = False) -> float:
    """Korthikanti et al. 2022, Sec. 4 (Table 2), their GPT layer (4h GeLU MLP,
    dropout, 16-bit activations): ``s*b*h*(34 + 5*a*s/h)`` bytes per layer; with TP
    alone ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``; with TP + SP everything over t;
    selective recomputation drops the ``5*a*s/h`` term (attention scores); full
    recomputation keeps only the layer's input, ``2*s*b*h`` (over t with SP)."""
    if full:
        return 2.0 * s * b * h / (t if sequence_parallel else 1)
    scores = 0.0 if selective else 5.0 * a * s / h
    if sequence_parallel:
        return s * b * h * (34.0 + scores) / t
    return s * b * h * (10.0 + 24.0 / t + scores / t)


def fused_layer_activation_bytes(model: ModelConfig, s: int, b: int, t: int,
                                 sequence_parallel: bool, bytes_per_value: int, *,
                                 gated: bool = True, dropout: bool = False,
                                 attention_scores: bool = False,
                                 selective: bool = False) -> float:
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

    ``selective`` (megatron's core-attention recomputation): what the attention kernel
    keeps besides its inputs and output is dropped: the scores (with
    ``attention_scores``) or the softmax statistics (``4a/t`` bytes per token, the only
    saving for fused attention). Q, K and V stay: the checkpoint keeps them as inputs.
    """
    h, f, a = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads
    kv = model.query_groups * (h // a)
    B = bytes_per_value
    sp = t if sequence_parallel else 1
    replicated = B * 4 * h + (2 if dropout else 0) * h
    fc1_out = 2 * f if gated else f
    split = B * (h + 2 * kv + h + fc1_out + f)
    if selective:
        pass  # recomputed in the backward pass
    elif attention_scores:
        split += (2 * B + (1 if dropout else 0)) * a * s
    else:
        split += 4 * a
    return s * b * (replicated / sp + split / t)


def local_layer_activation_bytes(model: ModelConfig, s: int, b: int, t: int,
                                 sequence_parallel: bool, bytes_per_value: int,
                                 selective: bool = False) -> float:
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

    ``selective`` (megatron's core-attention recomputation, measured the same way): the
    checkpoint keeps the attention's inputs Q and K after RoPE (``h + kv``) and V, a view
    of the fused QKV output that keeps all of it alive (``h + 2kv``); the output
    projection keeps the output (``h``); the logsumexp and SDPA's expanded K and V go.
    ``3h + 3kv`` against ``4h`` with GQA: *more* than without recomputation when
    ``kv > h/3``; MHA: ``4h + 2kv`` as before, less the logsumexp.
    """
    h, f, a = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads
    d = h // a
    kv = model.query_groups * d
    B = bytes_per_value
    sp = t if sequence_parallel else 1
    norms = 2 * (3 * h * B + 4)
    if selective:
        attention = (3 * h + 3 * kv) * B if model.query_groups < a else (4 * h + 2 * kv) * B
    else:
        attention = (4 * h * B if model.query_groups < a else (4 * h + 2 * kv) * B) + 4 * a
    split = attention + 5 * f * B
    return s * b * (norms / sp + split / t) + 4 * s * d * B


def layer_activation_bytes(model: ModelConfig, layout: Layout, selective: bool = False) -> float:
    """One layer, one micro-batch, for the layout's implementation: nothing recomputed,
    or (``selective``) core attention recomputed. With context parallelism each GPU
    holds ``seq_length / cp`` tokens of every sequence, so everything is over cp."""
    args = (model, layout.local_seq_length, layout.micro_batch, layout.tp,
            layout.sequence_parallel, layout.bytes_per_value)
    if layout.layer_impl == "local":
        return local_layer_activation_bytes(*args, selective=selective)
    return fused_layer_activation_bytes(*args, selective=selective)


def layer_input_bytes(model: ModelConfig, layout: Layout) -> float:
    """What full recomputation keeps of a layer: its input (``2*s*b*h`` in bf16, over t
    with sequence parallelism; Korthikanti et al. Sec. 4.2)."""
    sp = layout.tp if layout.sequence_parallel else 1
    return layout.local_seq_length * layout.micro_batch * model.hidden_size * \
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
    return layout.local_seq_length * layout.micro_batch * per_token


def input_activation_bytes(layout: Layout) -> float:
    """The first stage's embedding keeps its int64 token ids (8 bytes per token) and,
    split over TP, a bool mask of the ids outside this rank's vocabulary range (1)."""
    return layout.local_seq_length * layout.micro_batch * (8.0 + (1.0 if layout.tp > 1 else 0.0))


def microbatches_in_flight(pp: int, stage: int, num_microbatches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under megatron's
    1F1B schedule: ``pp - stage - 1`` warm-up forwards plus the one in steady state,
    at most the micro-batches of the step (Narayanan et al. 2021, Sec. 2.2.1). The
    first stage holds ``pp``, the last 1; without pipelining, 1."""
    return max(1, min(pp - stage, num_microbatches))


# --- one GPU of a pipeline stage -------------------------------------------------


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
    activations_full_recompute: float  # the layout's method and layers (default: uniform, 1)
    activations_selective_recompute: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.main_weights + self.grads + self.moments + self.activations

    def components(self) -> dict[str, float]:
        return {"weights": self.weights, "main weights": self.main_weights,
                "gradients": self.grads, "Adam moments": self.moments,
                "activations": self.activations}


def stage_activation_bytes(model: ModelConfig, padded_vocab: int, layout: Layout,
                           stage: int, recompute: str | bool) -> float:
    """Activations one GPU of ``stage`` holds at its peak: ``in_flight`` micro-batches of
    its layers, the embedding's token ids on the first stage, the output layer and loss
    on the last (one micro-batch: the last stage has one in flight). Per layer, by
    ``recompute`` (``train.recompute``; a bool is full/none), as Korthikanti et al.:

    - ``none``: everything a layer keeps; ``selective``: the same with core attention
      recomputed (:func:`layer_activation_bytes`);
    - ``full``, method ``uniform`` with N layers per chunk: each chunk's input (and
      RoPE's fp32 table, an input of every checkpointed chunk, kept once), plus one chunk
      of N layers rebuilt during the backward pass; method ``block`` with N layers: the
      first N layers keep their input, the others everything, plus one layer rebuilt."""
    if isinstance(recompute, bool):
        recompute = "full" if recompute else "none"
    layers = model.num_layers // layout.pp
    n = microbatches_in_flight(layout.pp, stage, layout.num_microbatches)
    whole = layer_activation_bytes(model, layout)
    working = 0.0
    if recompute == "full":
        method = layout.recompute_method or "uniform"
        rope = 4.0 * layout.local_seq_length * (model.hidden_size // model.num_attention_heads)
        if method == "uniform":
            chunk = min(layout.recompute_num_layers or 1, layers)
            per_mb = -(-layers // chunk) * layer_input_bytes(model, layout) + rope
            working = chunk * whole
        else:
            kept = min(layout.recompute_num_layers or layers, layers)
            per_mb = kept * layer_input_bytes(model, layout) + (layers - kept) * whole + \
                (rope if kept else 0.0)
            working = whole if kept else 0.0
    elif recompute == "selective":
        per_mb = layers * layer_activation_bytes(model, layout, selective=True)
    else:
        per_mb = layers * whole
    if stage == 0:
        per_mb += input_activation_bytes(layout)
    act = n * per_mb + working
    if stage == layout.pp - 1:
        act += output_activation_bytes(model, padded_vocab, layout)
    return act


def estimate_stage(model: ModelConfig, counts: ParamCounts, padded_vocab: int,
                   layout: Layout, stage: int) -> StageEstimate:
    params = stage_parameters(counts, model.tie_embeddings, layout.tp, layout.pp, stage)
    # The distributed optimizer shards over dp x cp (megatron's data-parallel group with
    # context parallelism): context parallelism also divides the optimizer state.
    per = state_bytes_per_parameter(layout.precision, layout.distributed_optimizer,
                                    layout.dp * layout.cp)
    act = {r: stage_activation_bytes(model, padded_vocab, layout, stage, r)
           for r in ("none", "selective", "full")}
    return StageEstimate(
        stage=stage, layers=model.num_layers // layout.pp, params=params,
        microbatches_in_flight=microbatches_in_flight(layout.pp, stage, layout.num_microbatches),
        weights=params * per.weights, main_weights=params * per.main_weights,
        grads=params * per.grads, moments=params * per.moments,
        activations=act[layout.recompute], activations_no_recompute=act["none"],
        activations_full_recompute=act["full"], activations_selective_recompute=act["selective"])
