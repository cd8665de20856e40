"""The Llama-style decoder of the HyperCLOVA X family, built with megatron-core.

RMSNorm pre-norm, SwiGLU MLP, RoPE (configurable base), grouped-query attention,
optional tied input/output embeddings, no biases. Transformer Engine layers are
used when the package is installed (GPU clusters), megatron-core's local layers
otherwise (CPU, tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hcx.config import ModelConfig, ParallelConfig, RecipeError
from hcx.errors import MachineError


class RMSNorm(torch.nn.Module):
    """RMSNorm for megatron-core's local layer spec.

    megatron's own torch-norm wrapper refuses sequence parallelism because its weight
    is not marked: with SP each TP rank normalizes a different slice of the sequence,
    so the weight's gradient must be all-reduced over TP. Marking the weight
    ``sequence_parallel`` makes megatron's ``finalize_model_grads`` do exactly that
    (the same attribute Transformer Engine's and apex's norms set).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _sdpa_attention_class():
    """megatron's local core attention, computed by torch's fused
    ``scaled_dot_product_attention`` in the common cases.

    megatron's ``DotProductAttention`` materializes the full score matrix
    (baddbmm, masked_fill, softmax, bmm), which costs memory and time on CPUs and
    on GPUs without Transformer Engine. The same math runs in one fused kernel for:

    - causal self-attention (training, and the prompt pass of generation);
    - a boolean ``attention_mask`` in megatron's convention (True = masked), as the
      generation loop passes for left-padded batches;
    - ``no_mask`` (decoding steps with a KV cache: one new query sees every cached key).

    Anything else (dropout, windows, attention bias, packed sequences) takes
    megatron's path unchanged.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SDPAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            causal = (mask_type == AttnMaskType.causal and attention_mask is None
                      and query.shape[0] == key.shape[0])
            explicit = attention_mask is not None and attention_mask.dtype == torch.bool
            unmasked = mask_type == AttnMaskType.no_mask and attention_mask is None
            simple = (
                (causal or explicit or unmasked)
                and attention_bias is None and packed_seq_params is None
                and self.config.window_size is None and self.softmax_offset is None
                and not self.config.apply_query_key_layer_scaling
                and (self.config.attention_dropout == 0.0 or not self.training)
            )
            if not simple:
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias, packed_seq_params)
            sq, b = query.shape[0], query.shape[1]
            # [s, b, heads, d] -> [b, heads, s, d]; GQA: repeat each KV group for its queries.
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            keep = ~attention_mask if explicit else None  # torch: True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal,
                                                 scale=self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    return SDPAttention


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return torch.cuda.is_available()


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise MachineError(
                "model.transformer_impl=transformer_engine but Transformer Engine is not "
                "installed (or no GPU); use 'auto' or 'local'"
            )
        return True
    return model.transformer_impl == "auto" and have_transformer_engine()


def compute_dtype(precision: str) -> torch.dtype:
    """'auto' is bf16 where a GPU is present and fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def recompute_settings(recompute: str | bool, method: str | None = None,
                       num_layers: int | None = None, layers_per_stage: int = 1) -> dict:
    """megatron's three recomputation keys for ``train.recompute`` (``none``, ``selective``:
    core attention, ``full``: whole layers; a bool is full/none). Full recomputation
    defaults to uniform chunks of one layer; ``block`` defaults to every layer of the stage."""
    if isinstance(recompute, bool):
        recompute = "full" if recompute else "none"
    if recompute == "none":
        return {"recompute_granularity": None}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    method = method or "uniform"
    if num_layers is None:
        num_layers = 1 if method == "uniform" else layers_per_stage
    return {"recompute_granularity": "full", "recompute_method": method,
            "recompute_num_layers": num_layers}


def fp8_settings(fp8) -> dict:
    """megatron's FP8 keys for ``train.fp8`` (an :class:`hcx.config.FP8Config`, or None)."""
    if fp8 is None:
        return {}
    out = {"fp8": fp8.format, "fp8_recipe": fp8.recipe}
    if fp8.recipe == "delayed":
        out |= {"fp8_amax_history_len": fp8.amax_history_len,
                "fp8_amax_compute_algo": fp8.amax_compute_algo}
    return out


def check_machine(recipe) -> None:
    """Refuse options this machine cannot run, saying what they need: FP8 and context
    parallelism run in Transformer Engine's kernels on NVIDIA GPUs (FP8: compute
    capability 8.9+, MXFP8 10.0+). Raises MachineError."""
    t, p = recipe.train, recipe.parallel
    wants = []
    if t.fp8 is not None:
        wants.append(f"train.fp8 (recipe {t.fp8.recipe})")
    if p.cp > 1:
        wants.append(f"parallel.cp={p.cp}")
    if not wants:
        return
    what = " and ".join(wants)
    if not torch.cuda.is_available():
        raise MachineError(
            f"{what} needs NVIDIA GPUs with Transformer Engine (CUDA kernels: FP8 GEMMs, "
            "ring attention); this machine has no CUDA device. Remove it to train here "
            + ("(train.fp8=null" if t.fp8 is not None else "(")
            + (", " if t.fp8 is not None and p.cp > 1 else "")
            + ("parallel.cp=1" if p.cp > 1 else "") + ")")
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA install
        raise MachineError(
            f"{what} needs Transformer Engine, which does not import here ({e}); install it "
            "with `pip install --no-build-isolation transformer_engine[pytorch]` (matching "
            "your CUDA and torch)") from None
    if t.fp8 is not None:
        need = (10, 0) if t.fp8.recipe == "mxfp8" else (9, 0) if t.fp8.recipe == "blockwise" \
            else (8, 9)
        cc = torch.cuda.get_device_capability()
        if cc < need:
            raise MachineError(
                f"train.fp8.recipe={t.fp8.recipe} needs GPUs of compute capability "
                f"{need[0]}.{need[1]} or newer ({'Blackwell' if need[0] == 10 else 'Hopper' if need[0] == 9 else 'Ada/Hopper'}); "
                f"{torch.cuda.get_device_name()} is {cc[0]}.{cc[1]}")


def transformer_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                       recompute: str | bool = "none", recompute_method: str | None = None,
                       recompute_num_layers: int | None = None, fp8=None):
    from megatron.core.transformer import TransformerConfig

    bf16 = dtype == torch.bfloat16
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU = silu(x W_gate) * (x W_up)
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,  # Qwen2: biases on Q, K and V only
        # Qwen3: an RMSNorm over each query/key head (weights of head size, shared by
        # the heads) after the projection and before RoPE, as transformers' q_norm/k_norm.
        qk_layernorm=model.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        # Pipeline stages must know the full layout, else every stage numbers its
        # layers from 0 and dist_checkpointing rejects the sharding.
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        sequence_parallel=parallel.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Off: these need megatron's compiled CUDA extensions, which a pip install of
        # megatron-core does not build (attention is fused by SDPA or TE instead).
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        context_parallel_size=parallel.cp,
        **recompute_settings(recompute, recompute_method, recompute_num_layers,
                             model.num_layers // parallel.pp),
        **fp8_settings(fp8),
    )


def build_gpt(model: ModelConfig, parallel: ParallelConfig, vocab_size: int, seq_length: int,
              dtype: torch.dtype, pre_process: bool, post_process: bool,
              recompute: str | bool = "none", recompute_method: str | None = None,
              recompute_num_layers: int | None = None, fp8=None):
    """One pipeline stage of the decoder (all of it when pp == 1). ``recompute``:
    ``train.recompute`` (:func:`recompute_settings`); ``fp8``: ``train.fp8``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    config = transformer_config(model, parallel, dtype, recompute, recompute_method,
                                recompute_num_layers, fp8)
    if use_transformer_engine(model):
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_norm)
    else:
        layer = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=model.qk_norm)
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        if model.qk_norm:
            attention = layer.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = RMSNorm
        layer.submodules.self_attention.submodules.core_attention = _sdpa_attention_class()
        spec = TransformerBlockSubmodules(
            layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=RMSNorm
        )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max(seq_length, model.max_position_embeddings),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_base),
        parallel_output=True,
    )
    if model.rope_scaling is not None and hasattr(gpt, "rotary_pos_emb"):
        gpt.rotary_pos_emb.inv_freq = scaled_inv_freq(gpt.rotary_pos_emb.inv_freq, model)
    return gpt


def scaled_inv_freq(inv_freq: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies under ``model.rope_scaling`` (Llama 3.1's rule).

    megatron-core's ``GPTModel(rope_scaling=True, rope_scaling_factor=f)`` applies the
    same formula as transformers' ``llama3`` RoPE, but with the other three parameters
    fixed at Llama 3.1's values (low 1, high 4, original context 8192). EXAONE 3.5 and
    later Llama releases may set them otherwise, so the unscaled frequencies megatron
    computed are scaled here with all four (megatron's own function, given them all).
    The frequencies are not a parameter or buffer: checkpoints do not hold them.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    s = model.rope_scaling
    return RotaryEmbedding._apply_scaling(
        None, inv_freq, factor=s.factor, low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_position_embeddings)


def model_vocab_size(recipe, tokenizer_vocab: int) -> int:
    """The model's (unpadded) vocabulary: ``model.vocab_size``, or the tokenizer's when
    unset. A model smaller than its tokenizer could not embed every id."""
    if recipe.model.vocab_size is None:
        return tokenizer_vocab
    if recipe.model.vocab_size < tokenizer_vocab:
        raise RecipeError(f"{recipe.where('model.vocab_size')}: model.vocab_size="
                          f"{recipe.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab})")
    return recipe.model.vocab_size


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Pad the vocabulary to a multiple of 128 (aligned matmuls), split evenly over TP.

    Unlike Megatron-LM's ``multiple * tp``, the padding does not grow with TP (for the
    usual power-of-two TP sizes), so one checkpoint loads at any TP size.
    """
    step = math.lcm(multiple, tp)
    return ((vocab_size + step - 1) // step) * step


def count_parameters(model: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Exact parameter counts of the decoder (no parallelism), by part."""
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    head_dim = model.kv_channels
    q, kv = model.num_attention_heads * head_dim, model.query_groups * head_dim
    attn = h * (q + 2 * kv) + q * h  # fused QKV + output projection
    if model.qkv_bias:
        attn += q + 2 * kv
    mlp = 2 * h * f + f * h  # gate + up (fused fc1) + down
    norms = 2 * h + (2 * head_dim if model.qk_norm else 0)  # RMSNorm weights per layer
    per_layer = attn + mlp + norms
    embedding = vocab_size * h
    output = 0 if model.tie_embeddings else vocab_size * h
    total = L * per_layer + embedding + output + h  # + final norm
    return {"per_layer": per_layer, "embedding": embedding, "output": output,
            "non_embedding": L * per_layer + h, "total": total}
