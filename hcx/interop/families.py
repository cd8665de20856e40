"""The Hugging Face model families hcx imports and exports, and how each one's
``config.json`` maps onto the recipe's model section (``hcx.config.ModelConfig``, which
builds megatron-core's GPTModel) and back.

Every family here is a Llama-style decoder (RMSNorm pre-norm, SwiGLU, rotate-half RoPE,
grouped-query attention). What differs, and the GPTModel option it maps to:

========  =====================================================  =========================
family    differs from Llama                                      recipe model key
========  =====================================================  =========================
llama     Llama 3.x: ``rope_scaling`` of type ``llama3``          ``rope_scaling``
mistral   ``sliding_window`` (must be null: full attention)       (refused when set)
qwen2     biases on q/k/v (not o), tied or untied embeddings      ``qkv_bias``
qwen3     RMSNorm of each query/key head before RoPE, head size   ``qk_norm``, ``head_dim``
exaone    EXAONE 3.x: other names (``num_layers``,                (names only)
          ``layer_norm_epsilon``, ``transformer.h.N.attn...``)
========  =====================================================  =========================

Anything else a ``config.json`` asks for that the engine cannot compute is refused by
:func:`model_from_hf`, naming the key. Tensor names are handled in Llama's spelling
(``model.layers.N.self_attn.q_proj.weight``) everywhere in hcx; :meth:`Family.tensor_name`
spells one the family's way where it differs (EXAONE's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hcx.errors import HcxError


class InteropError(HcxError, ValueError):
    pass


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    architecture: str  # config.json's architectures[0]
    # transformers' defaults for the keys a config.json may leave out
    defaults: dict[str, Any]
    qkv_bias: bool = False  # q/k/v projections always have biases (o_proj none)
    qk_norm: bool = False  # q_norm/k_norm per-head RMSNorm
    # config.json key names where the family's differ from Llama's (Llama's -> its own)
    keys: dict[str, str] = field(default_factory=dict)
    # tensor renames, applied in order to a Llama name (regex, replacement)
    renames: tuple[tuple[str, str], ...] = ()
    # what config.json says besides the shape (attention windows off, ...)
    extra_config: dict[str, Any] = field(default_factory=dict)

    def key(self, llama_key: str) -> str:
        """The family's name for a Llama config.json key."""
        return self.keys.get(llama_key, llama_key)

    def tensor_name(self, llama_name: str) -> str:
        """The family's name for a tensor named the Llama way."""
        for pattern, replacement in self.renames:
            llama_name = re.sub(pattern, replacement, llama_name)
        return llama_name


_LLAMA_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                   "max_position_embeddings": 2048, "tie_word_embeddings": False,
                   "sliding_window": None, "head_dim": None}

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", _LLAMA_DEFAULTS,
           extra_config={"attention_bias": False, "mlp_bias": False}),
    Family("mistral", "MistralForCausalLM",
           {**_LLAMA_DEFAULTS, "max_position_embeddings": 131072, "num_key_value_heads": 8,
            "sliding_window": 4096},
           extra_config={"sliding_window": None}),
    Family("qwen2", "Qwen2ForCausalLM",
           {**_LLAMA_DEFAULTS, "max_position_embeddings": 32768}, qkv_bias=True,
           extra_config={"use_sliding_window": False, "sliding_window": None}),
    Family("qwen3", "Qwen3ForCausalLM",
           {**_LLAMA_DEFAULTS, "max_position_embeddings": 32768, "head_dim": 128}, qk_norm=True,
           extra_config={"attention_bias": False, "use_sliding_window": False,
                         "sliding_window": None}),
    # EXAONE 3.0/3.5 (LG AI Research): Llama's computation under GPT-2-like names, as its
    # own checkpoints on the Hub spell them (transformers >= 5 maps model_type exaone onto
    # its Llama classes with these renames; earlier versions need trust_remote_code).
    Family("exaone", "ExaoneForCausalLM",
           {**_LLAMA_DEFAULTS, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 4096},
           keys={"num_hidden_layers": "num_layers", "rms_norm_eps": "layer_norm_epsilon",
                 "hidden_act": "activation_function"},
           renames=((r"^model\.embed_tokens\.", "transformer.wte."),
                    (r"^model\.norm\.", "transformer.ln_f."),
                    (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
                    (r"\.self_attn\.o_proj\.", ".attn.attention.out_proj."),
                    (r"\.self_attn\.", ".attn.attention."),
                    (r"\.input_layernorm\.", ".ln_1."),
                    (r"\.post_attention_layernorm\.", ".ln_2."),
                    (r"\.mlp\.gate_proj\.", ".mlp.c_fc_0."),
                    (r"\.mlp\.up_proj\.", ".mlp.c_fc_1."),
                    (r"\.mlp\.down_proj\.", ".mlp.c_proj.")),
           extra_config={"attention_bias": False, "mlp_bias": False}),
)}

# The family 'hcx export' writes for a model trained here (model.family: hcx).
NATIVE_EXPORT = "llama"

# recipe model key <- config.json key (Llama's spelling; errors about a model key name
# the config key)
MODEL_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
              "ffn_hidden_size": "intermediate_size",
              "num_attention_heads": "num_attention_heads",
              "num_query_groups": "num_key_value_heads", "vocab_size": "vocab_size",
              "max_position_embeddings": "max_position_embeddings",
              "rope_base": "rope_theta", "norm_epsilon": "rms_norm_eps",
              "tie_embeddings": "tie_word_embeddings", "head_dim": "head_dim",
              "rope_scaling": "rope_scaling"}

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings")


def family_of(config: dict, source: str = "config.json") -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise InteropError(f"{source}: model_type={model_type!r} is not supported: hcx imports "
                           f"these Llama-style families only: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def model_from_hf(config: dict, source: str = "config.json") -> dict:
    """The recipe's model section for a ``config.json`` of one of :data:`FAMILIES`.
    Refuses, naming the config key, whatever the engine (RMSNorm, SwiGLU, RoPE unscaled or
    llama3-scaled, GQA, biases on q/k/v only, optional QK-norm, full causal attention)
    would compute differently."""
    family = family_of(config, source)

    def refuse(key: str, value, why: str):
        raise InteropError(f"{source}: {key}={value!r} is not supported: {why}")

    def name(key: str) -> str:  # the key as this config.json spells it
        alias = family.key(key)
        return alias if alias in config or key not in config else key

    def get(key: str):
        value = config.get(name(key))
        return family.defaults.get(key) if value is None else value

    def need(key: str):
        if config.get(name(key)) is None:
            raise InteropError(f"{source}: no {family.key(key)}")
        return config[name(key)]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    if get("hidden_act") != "silu":
        refuse(name("hidden_act"), get("hidden_act"), "hcx's MLP is SwiGLU (silu)")
    if config.get("attention_bias"):
        refuse("attention_bias", config["attention_bias"], "it puts biases on all four "
               "attention projections; hcx's model has biases on q/k/v only (Qwen2's)")
    if config.get("mlp_bias"):
        refuse("mlp_bias", config["mlp_bias"], "hcx's MLP has no biases")
    head_dim = get("head_dim") or hidden // heads
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", config["partial_rotary_factor"],
               "hcx rotates the whole head")
    theta, scaling = _rope(config, get("rope_theta"), refuse)
    _full_attention(config, family, refuse)
    model = {
        "num_layers": need("num_hidden_layers"),
        "hidden_size": hidden,
        "ffn_hidden_size": need("intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": get("num_key_value_heads") or heads,
        "vocab_size": need("vocab_size"),
        "max_position_embeddings": get("max_position_embeddings"),
        "rope_base": theta,
        "norm_epsilon": float(get("rms_norm_eps")),
        "tie_embeddings": bool(get("tie_word_embeddings")),
        "family": family.model_type,
    }
    # Only what differs from the Llama defaults, so a recipe stays short.
    if head_dim * heads != hidden:
        model["head_dim"] = head_dim
    if family.qkv_bias:
        model["qkv_bias"] = True
    if family.qk_norm:
        model["qk_norm"] = True
    if scaling is not None:
        model["rope_scaling"] = scaling
    return model


def _rope(config: dict, default_theta, refuse) -> tuple[float, dict | None]:
    """RoPE's base and scaling: transformers 5 writes ``rope_parameters``, earlier
    versions ``rope_theta`` and ``rope_scaling``."""
    theta = (config.get("rope_parameters") or {}).get("rope_theta", default_theta)
    scaling = None
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            continue
        if kind != "llama3":
            refuse(f"{key}.rope_type", kind, "hcx's RoPE is unscaled ('default') or Llama "
                   "3.1's 'llama3' scaling")
        missing = [k for k in LLAMA3_KEYS if k not in params]
        if missing:
            raise InteropError(f"config.json: {key} of rope_type 'llama3' has no "
                               f"{', '.join(missing)}")
        scaling = {"type": "llama3", "factor": float(params["factor"]),
                   "low_freq_factor": float(params["low_freq_factor"]),
                   "high_freq_factor": float(params["high_freq_factor"]),
                   "original_max_position_embeddings":
                       int(params["original_max_position_embeddings"])}
    if float(theta) != int(theta):
        refuse("rope_theta", theta, "hcx's megatron model takes an integer RoPE base")
    return float(theta), scaling


def _full_attention(config: dict, family: Family, refuse) -> None:
    """Refuse attention windows: hcx attends to the whole context."""
    if family.model_type == "mistral":
        # absent means transformers' default (4096); null turns the window off
        window = config.get("sliding_window", family.defaults["sliding_window"])
        if window is not None:
            refuse("sliding_window", window, "hcx attends to the whole context (set it to "
                   "null if the model was trained without a window)")
    if config.get("use_sliding_window"):
        refuse("use_sliding_window", True, "hcx attends to the whole context")
    layer_types = config.get("layer_types") or []
    windowed = sorted({t for t in layer_types if t != "full_attention"})
    if windowed:
        refuse("layer_types", windowed, "hcx's layers all attend to the whole context "
               "('full_attention')")


def export_family(model) -> Family:
    """The family 'hcx export' writes for a recipe's model section, after checking that it
    can express the model; errors name the recipe key."""
    family = FAMILIES[NATIVE_EXPORT if model.family == "hcx" else model.family]
    where = f"model.family={model.family}" + (f" (exported as {family.model_type})"
                                              if model.family == "hcx" else "")
    if model.qkv_bias and not family.qkv_bias:
        raise InteropError(f"model.qkv_bias=true cannot be exported as {where}: only Qwen2 "
                           "has biases on q/k/v alone (set model.family: qwen2)")
    if model.qk_norm and not family.qk_norm:
        raise InteropError(f"model.qk_norm=true cannot be exported as {where}: only Qwen3 "
                           "normalizes query and key heads (set model.family: qwen3)")
    if family.qk_norm and not model.qk_norm:
        raise InteropError(f"model.qk_norm=false cannot be exported as {where}: Qwen3 always "
                           "normalizes query and key heads")
    return family


def hf_config(model, family: Family, vocab_size: int, *, bos: int | None, eos: int | None,
              pad: int | None, dtype: str) -> dict:
    """``config.json`` of ``family`` for a recipe's model section (the inverse of
    :func:`model_from_hf`). RoPE is written the way transformers 4 and 5, vLLM and others
    all read: ``rope_theta`` and ``rope_scaling``."""
    m = model
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.query_groups,
        "head_dim": m.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rope_base,
        "rope_scaling": None if m.rope_scaling is None else {
            "rope_type": "llama3", **m.rope_scaling.model_dump(exclude={"type"})},
        "tie_word_embeddings": m.tie_embeddings,
        **family.extra_config,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": dtype,
    }
    if family.model_type in ("qwen2", "qwen3"):
        config["max_window_layers"] = m.num_layers
    return {family.key(k): v for k, v in config.items()}
