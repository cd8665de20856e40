"""Hugging Face interoperability: an hcx checkpoint of any TP/PP layout as a Llama
directory that ``transformers`` loads without remote code.

The checkpoint is loaded into a single-process model (megatron's dist_checkpointing
reshards any saved layout), then each megatron tensor is renamed or split:

- ``linear_qkv`` holds, per query group, that group's query heads, then its key head,
  then its value head (``[groups * (heads/groups + 2) * head_dim, hidden]``);
- ``linear_fc1`` is SwiGLU's gate then up projection (megatron chunks it in two and
  applies SiLU to the first half);
- RMSNorm weights, ``linear_proj`` (o_proj), ``linear_fc2`` (down_proj), embeddings
  and the output layer map one to one. RoPE is the rotate-half form in both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from hcx.config import ModelConfig, Recipe
from hcx.errors import HcxError


class InteropError(HcxError, ValueError):
    pass


def megatron_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors from a single-process megatron GPTModel state dict."""
    heads, groups = model.num_attention_heads, model.query_groups
    head_dim = model.hidden_size // heads
    per_group = heads // groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(model.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        # Local layers name the norms apart; Transformer Engine fuses them into the linears.
        attn_norm = state.get(m + "input_layernorm.weight",
                              state.get(m + "self_attention.linear_qkv.layer_norm_weight"))
        mlp_norm = state.get(m + "pre_mlp_layernorm.weight",
                             state.get(m + "mlp.linear_fc1.layer_norm_weight"))
        qkv = state[m + "self_attention.linear_qkv.weight"].view(
            groups, per_group + 2, head_dim, model.hidden_size)
        gate, up = state[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            h + "input_layernorm.weight": attn_norm,
            h + "post_attention_layernorm.weight": mlp_norm,
            h + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(heads * head_dim, -1),
            h + "self_attn.k_proj.weight": qkv[:, per_group].reshape(groups * head_dim, -1),
            h + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(groups * head_dim, -1),
            h + "self_attn.o_proj.weight": state[m + "self_attention.linear_proj.weight"],
            h + "mlp.gate_proj.weight": gate,
            h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": state[m + "mlp.linear_fc2.weight"],
        })
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_config(recipe: Recipe, vocab_size: int, tokenizer, dtype: torch.dtype) -> dict:
    m = recipe.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.query_groups,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rope_base,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.special_id("<s>"),
        "eos_token_id": tokenizer.eod,
        "pad_token_id": tokenizer.pad,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def checkpoint_path(path: Path) -> Path:
    """A step directory, or a checkpoints directory (its ``latest``)."""
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip()
    return path


def export_hf(ckpt: Path, out: Path, log=print) -> Path:
    """Write ``out`` (config.json, model.safetensors, tokenizer files) atomically."""
    from safetensors.torch import save_file

    from hcx import checkpoint, parallel
    from hcx.pretrain import model_vocab_size
    from hcx.tokenization import load_tokenizer
    from hcx.train import build_engine

    ckpt = checkpoint_path(Path(ckpt))
    meta_file = ckpt / checkpoint.META
    if not meta_file.is_file():
        raise InteropError(f"{ckpt}: not an hcx checkpoint (no {checkpoint.META})")
    saved = json.loads(meta_file.read_text()).get("recipe")
    if not saved:
        raise InteropError(f"{ckpt}: the checkpoint does not record its recipe")
    recipe = Recipe.model_validate(saved)
    # One process holds the whole model: dist_checkpointing reshards any saved layout.
    recipe = recipe.model_copy(update={"parallel": recipe.parallel.model_copy(
        update={"tp": 1, "pp": 1, "dp": 1, "sequence_parallel": False})})
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    vocab = model_vocab_size(recipe, tokenizer.vocab_size)
    engine = build_engine(recipe, vocab, with_optimizer=False)
    try:
        checkpoint.load(ckpt, engine.model, restore_rng=False, log=log)
        state = {k.removeprefix("module."): v for k, v in engine.model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        tensors = megatron_to_hf(state, recipe.model)
        config = hf_config(recipe, engine.vocab_size, tokenizer,
                           next(iter(tensors.values())).dtype)
    finally:
        parallel.shutdown()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_tokenizer(recipe, tmp)
        tmp.chmod(0o755)  # mkdtemp and safetensors make them private; this is an artifact
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"exported {ckpt} to {out} ({sum(t.numel() for t in tensors.values()):,} parameters)")
    return out


def _write_tokenizer(recipe: Recipe, out: Path) -> None:
    from hcx.hf_tokenizer import write_hf_tokenizer
    from hcx.paths import resolve

    t = recipe.data.tokenizer
    if t.kind == "sentencepiece":
        write_hf_tokenizer(resolve(t.path), out)
        shutil.copy(resolve(t.path), out / "tokenizer.model")
    elif t.kind == "hf":
        src = resolve(t.path)
        for f in (src.glob("*.json") if src.is_dir() else [src]):
            shutil.copy(f, out / f.name)
    # bytes: no tokenizer file exists for it; the model directory is weights only
