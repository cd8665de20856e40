"""Hugging Face interoperability, both ways.

Export: an hcx checkpoint of any TP/PP layout becomes a Llama directory that
``transformers`` loads without remote code. Import: a Llama/Mistral directory becomes
an hcx checkpoint (weights only) plus a recipe stub to continue pretraining from.

Either way the weights pass through a single-process model (megatron's
dist_checkpointing reshards any saved layout, and a checkpoint saved by one process
loads at any TP/PP), and each megatron tensor is renamed or split:

- ``linear_qkv`` holds, per query group, that group's query heads, then its key head,
  then its value head (``[groups * (heads/groups + 2) * head_dim, hidden]``);
- ``linear_fc1`` is SwiGLU's gate then up projection (megatron chunks it in two and
  applies SiLU to the first half);
- RMSNorm weights, ``linear_proj`` (o_proj), ``linear_fc2`` (down_proj), embeddings
  and the output layer map one to one. RoPE is the rotate-half form in both.
- megatron pads the vocabulary (``hcx.engine.model.padded_vocab_size``); export keeps the
  padding rows, import adds zero rows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from hcx.config import ModelConfig, Recipe
from hcx.errors import HcxError


class InteropError(HcxError, ValueError):
    pass


# --- the tensor mapping ------------------------------------------------------------


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


def hf_to_megatron(tensors: dict[str, torch.Tensor], model: ModelConfig,
                   padded_vocab: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`megatron_to_hf`: a single-process GPTModel state dict (local
    layer names) from HF Llama tensors. The embedding and output layer get zero rows
    from the HF vocabulary size up to ``padded_vocab`` (megatron's padding): the padded
    ids never occur in data, and their logits start at 0."""
    heads, groups = model.num_attention_heads, model.query_groups
    hidden, head_dim = model.hidden_size, model.hidden_size // heads
    per_group = heads // groups

    def pad_vocab(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(padded_vocab, t.shape[1])
        out[:t.shape[0]] = t
        return out

    state = {"embedding.word_embeddings.weight": pad_vocab(tensors["model.embed_tokens.weight"]),
             "decoder.final_layernorm.weight": tensors["model.norm.weight"]}
    if not model.tie_embeddings:
        state["output_layer.weight"] = pad_vocab(tensors["lm_head.weight"])
    for i in range(model.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = tensors[h + "self_attn.q_proj.weight"].view(groups, per_group, head_dim, hidden)
        k = tensors[h + "self_attn.k_proj.weight"].view(groups, 1, head_dim, hidden)
        v = tensors[h + "self_attn.v_proj.weight"].view(groups, 1, head_dim, hidden)
        state.update({
            m + "input_layernorm.weight": tensors[h + "input_layernorm.weight"],
            m + "pre_mlp_layernorm.weight": tensors[h + "post_attention_layernorm.weight"],
            m + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, hidden),
            m + "self_attention.linear_proj.weight": tensors[h + "self_attn.o_proj.weight"],
            m + "mlp.linear_fc1.weight": torch.cat([tensors[h + "mlp.gate_proj.weight"],
                                                    tensors[h + "mlp.up_proj.weight"]]),
            m + "mlp.linear_fc2.weight": tensors[h + "mlp.down_proj.weight"],
        })
    return {k: v.contiguous() for k, v in state.items()}


def hf_tensor_shapes(model: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF Llama directory of this shape holds, with its shape."""
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.query_groups * (h // model.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (vocab_size, h), "model.norm.weight": (h,)}
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = (vocab_size, h)
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
    return shapes


# --- shared by export and import -----------------------------------------------------

# The files of a Hugging Face tokenizer (whichever a directory has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "tokenizer.model",
                   "vocab.json", "merges.txt")


@contextmanager
def _building(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write into. When the block succeeds it
    becomes ``out`` (replacing what was there) by a rename, so readers never see a half
    written ``out``; when it fails it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        # mkdtemp and safetensors make them private; these are artifacts to share.
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- export ------------------------------------------------------------------------


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


def generation_config(tokenizer) -> dict:
    """transformers' generate stops at any of ``eos_token_id``: the end of document and,
    for an hcx chat tokenizer, the end of an assistant turn (as Llama 3 lists both), so
    hcx's and transformers' generations end at the same tokens."""
    from hcx.tokenizer.special_tokens import END_OF_TURN

    eos = [tokenizer.eod]
    turn = tokenizer.special_id(END_OF_TURN)
    if turn is not None and turn not in eos:
        eos.append(turn)
    return {"bos_token_id": tokenizer.special_id("<s>"), "eos_token_id": eos,
            "pad_token_id": tokenizer.pad}


@dataclass
class HfWeights:
    """A checkpoint's weights as HF Llama tensors, with what describes them."""

    path: Path  # the step directory
    recipe: Recipe
    tokenizer: Any
    vocab_size: int  # the model's, padded
    tensors: dict[str, torch.Tensor]


def read_checkpoint(ckpt: Path, log=print) -> HfWeights:
    """The weights of an hcx checkpoint (a step directory or a checkpoints directory) of
    any layout, loaded in one process with the recipe the checkpoint records."""
    from hcx.engine import parallel
    from hcx.engine.checkpoint import checkpoint_path
    from hcx.engine.inference import open_checkpoint

    ckpt = checkpoint_path(Path(ckpt))
    try:
        engine, tokenizer = open_checkpoint(ckpt, tp=1, log=log)
        state = {k.removeprefix("module."): v for k, v in engine.model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        return HfWeights(ckpt, engine.recipe, tokenizer, engine.vocab_size,
                         megatron_to_hf(state, engine.recipe.model))
    finally:
        parallel.shutdown()


def export_hf(ckpt: Path, out: Path, log=print) -> Path:
    """Write ``out`` (config.json, model.safetensors, tokenizer files) atomically."""
    from safetensors.torch import save_file

    w = read_checkpoint(ckpt, log)
    config = hf_config(w.recipe, w.vocab_size, w.tokenizer, next(iter(w.tensors.values())).dtype)
    out = Path(out)
    with _building(out) as tmp:
        save_file(w.tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(w.tokenizer), indent=2) + "\n")
        _write_tokenizer(w.recipe, tmp)
    log(f"exported {w.path} to {out} ({sum(t.numel() for t in w.tensors.values()):,} parameters)")
    return out


def _write_tokenizer(recipe: Recipe, out: Path) -> None:
    from hcx.tokenizer.hf import write_hf_tokenizer
    from hcx.paths import resolve

    t = recipe.data.tokenizer
    if t.kind == "sentencepiece":
        write_hf_tokenizer(resolve(t.path), out)
        shutil.copy(resolve(t.path), out / "tokenizer.model")
    elif t.kind == "hf":
        src = resolve(t.path)
        for f in ([src / n for n in TOKENIZER_FILES] if src.is_dir() else [src]):
            if f.is_file():
                shutil.copy(f, out / f.name)
    # bytes: no tokenizer file exists for it; the model directory is weights only


# --- import ------------------------------------------------------------------------

# What ``hcx import`` writes into OUT, beside recipe.yaml.
CHECKPOINT_DIR, TOKENIZER_DIR, STUB = "checkpoint", "tokenizer", "recipe.yaml"

# transformers' defaults for the keys a config.json may leave out (LlamaConfig,
# MistralConfig); the model types hcx's decoder can represent.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "sliding_window": None},
    "mistral": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "max_position_embeddings": 131072, "tie_word_embeddings": False,
                "num_key_value_heads": 8, "sliding_window": 4096},
}

# recipe model key <- config.json key (errors about a model key name the HF key)
MODEL_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
              "ffn_hidden_size": "intermediate_size",
              "num_attention_heads": "num_attention_heads",
              "num_query_groups": "num_key_value_heads", "vocab_size": "vocab_size",
              "max_position_embeddings": "max_position_embeddings",
              "rope_base": "rope_theta", "norm_epsilon": "rms_norm_eps",
              "tie_embeddings": "tie_word_embeddings"}

# The training part of the stub: continued pretraining wants a lower peak learning rate
# than training from scratch. Users adjust it; it makes the stub a complete recipe.
STUB_TRAIN = {"steps": 1000, "global_batch_size": 32, "micro_batch_size": 1, "lr": 3.0e-5,
              "min_lr": 3.0e-6, "warmup_steps": 100}
# A recipe needs data.sources; an import has none. The recipe recorded in the imported
# checkpoint (which 'hcx export' and inference read for the model and tokenizer) names
# this placeholder; recipe.yaml leaves data.sources out for the user to add.
NO_SOURCES = [{"name": "none-add-data-sources", "prefix": "none"}]


def model_from_hf(config: dict, source: str = "config.json") -> dict:
    """The recipe's model section for a HF Llama/Mistral ``config.json``. Refuses, naming
    the config key, whatever hcx's decoder (RMSNorm, SwiGLU, RoPE without scaling, GQA,
    no biases, full causal attention) would compute differently."""

    def refuse(key: str, value, why: str):
        raise InteropError(f"{source}: {key}={value!r} is not supported: {why}")

    model_type = config.get("model_type")
    if model_type not in HF_DEFAULTS:
        refuse("model_type", model_type, f"hcx imports Llama-style decoders only "
               f"({', '.join(HF_DEFAULTS)})")
    defaults = HF_DEFAULTS[model_type]

    def get(key: str):
        value = config.get(key)
        return defaults.get(key) if value is None else value

    def need(key: str):
        if config.get(key) is None:
            raise InteropError(f"{source}: no {key}")
        return config[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    if get("hidden_act") != "silu":
        refuse("hidden_act", get("hidden_act"), "hcx's MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            refuse(key, config[key], "hcx's linear layers have no biases")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        refuse("head_dim", head_dim, f"hcx's head size is hidden_size / num_attention_heads "
                                     f"= {hidden / heads:g}")
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling.
    rope = config.get("rope_parameters") or {}
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            refuse(f"{key}.rope_type", kind, "hcx's RoPE has no scaling (only 'default')")
    theta = rope.get("rope_theta", get("rope_theta"))
    if float(theta) != int(theta):
        refuse("rope_theta", theta, "hcx's megatron model takes an integer RoPE base")
    # absent means transformers' default (Mistral: 4096); null turns the window off
    window = config.get("sliding_window", defaults["sliding_window"])
    if window is not None:
        refuse("sliding_window", window, "hcx attends to the whole context (set it to null "
               "if the model was trained without a window)")
    return {
        "num_layers": need("num_hidden_layers"),
        "hidden_size": hidden,
        "ffn_hidden_size": need("intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": get("num_key_value_heads") or heads,
        "vocab_size": need("vocab_size"),
        "max_position_embeddings": get("max_position_embeddings"),
        "rope_base": float(theta),
        "norm_epsilon": float(get("rms_norm_eps")),
        "tie_embeddings": bool(get("tie_word_embeddings")),
    }


def recipe_from_hf(config: dict, *, name: str, tp: int, pp: int, tokenizer: dict,
                   init_from: str, source: str = "config.json") -> tuple[dict, Recipe]:
    """The recipe stub for an imported model, and the same stub validated as a recipe by
    the code that validates recipe files (so an impossible ``--tp``/``--pp`` fails here,
    naming the flag; model errors name the config.json key). The validated recipe has
    the placeholder data source :data:`NO_SOURCES`; the stub has no sources."""
    from hcx.config import validate_recipe

    model = model_from_hf(config, source)
    stub = {
        "name": name,
        "output_dir": f"runs/{name}",
        "model": model,
        "parallel": {"tp": tp, "pp": pp},
        "data": {"tokenizer": tokenizer,
                 "seq_length": min(model["max_position_embeddings"], 2048)},
        "train": dict(STUB_TRAIN),
        "checkpoint": {"init_from": init_from},
    }
    origins = {"parallel.tp": f"--tp {tp}", "parallel.pp": f"--pp {pp}",
               **{f"model.{k}": f"{source}: {hf}" for k, hf in MODEL_KEYS.items()}}
    data = {**stub, "data": {**stub["data"], "sources": NO_SOURCES}}
    return stub, validate_recipe(data, origins, source)


def _tensor_files(hf_dir: Path) -> tuple[dict[str, Path], Path]:
    """Which safetensors file holds each tensor, and the file that says so: the index of
    a sharded checkpoint, or ``model.safetensors`` itself."""
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise InteropError(f"{index}: not a safetensors index ({e})") from None
        return {name: hf_dir / file for name, file in weight_map.items()}, index
    single = hf_dir / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}, single
    raise InteropError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                       "(hcx imports safetensors weights only)")


def read_hf_tensors(hf_dir: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors ``shapes`` names, after checking all of them (before loading any):
    each must exist with that shape, and nothing else may be there but buffers
    transformers recomputes (``rotary_emb.inv_freq``) and, for tied embeddings, a copy of
    the embedding as ``lm_head.weight``. Errors name the tensor, file and shapes."""
    from safetensors import safe_open

    located, listing = _tensor_files(hf_dir)
    for name, shape in shapes.items():
        if name not in located:
            raise InteropError(f"{listing}: tensor {name} is missing (expected shape "
                               f"{list(shape)} from config.json)")
    unexpected = sorted(n for n in located if n not in shapes and n != "lm_head.weight"
                        and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise InteropError(f"{hf_dir}: tensors hcx's model has no place for: "
                           f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(located[name], []).append(name)
    tensors = {}
    for file, names in by_file.items():
        if not file.is_file():
            raise InteropError(f"{listing} names {file.name}, which does not exist")
        with safe_open(str(file), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise InteropError(f"{file}: tensor {name} is missing (the index places it "
                                       "in this file)")
                actual = list(f.get_slice(name).get_shape())
                if actual != list(shapes[name]):
                    raise InteropError(f"{file}: tensor {name} has shape {actual}, but "
                                       f"config.json gives {list(shapes[name])}")
            for name in names:
                tensors[name] = f.get_tensor(name)
    return tensors


def _tokenizer_kind(hf_dir: Path) -> tuple[str, str]:
    """The recipe's tokenizer kind for the model's tokenizer, and the file in its folder
    that data.tokenizer.path names ("": the folder)."""
    if (hf_dir / "tokenizer.json").is_file() or \
            ((hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file()):
        return "hf", ""
    if (hf_dir / "tokenizer.model").is_file():
        return "sentencepiece", "tokenizer.model"
    raise InteropError(f"{hf_dir}: no tokenizer (tokenizer.json, vocab.json + merges.txt, or "
                       "tokenizer.model): training continues with the model's own tokenizer")


def _name_eos_token(directory: Path, config: dict) -> None:
    """hcx separates documents with the tokenizer's eos token. A bare tokenizer.json does
    not say which token that is, config.json's ``eos_token_id`` does: record it in
    tokenizer_config.json, where transformers and hcx look for it."""
    from tokenizers import Tokenizer

    from hcx.tokenizer.loading import open_tokenizer

    eos_id = config.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if (not isinstance(eos_id, int) or not (directory / "tokenizer.json").is_file()
            or open_tokenizer(str(directory)).eod is not None):
        return
    token = Tokenizer.from_file(str(directory / "tokenizer.json")).id_to_token(eos_id)
    if token is None:
        return
    path = directory / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    path.write_text(json.dumps({**settings, "eos_token": token}, indent=2, ensure_ascii=False) + "\n")


def _copy_tokenizer(hf_dir: Path, config: dict, kind: str, file: str, dest: Path):
    """Copy the model's tokenizer files to ``dest`` and open them as pretraining will
    (``kind`` and ``file`` from :func:`_tokenizer_kind`)."""
    from hcx.config import TokenizerConfig
    from hcx.tokenizer.loading import TokenizerLoadError, load_tokenizer

    dest.mkdir()
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, dest / name)
    if kind == "hf":
        _name_eos_token(dest, config)
    try:
        tokenizer = load_tokenizer(TokenizerConfig(kind=kind, path=str(dest / file)))
    except TokenizerLoadError as e:
        raise InteropError(f"{hf_dir}: its tokenizer cannot be used for pretraining: {e}") from None
    if tokenizer.vocab_size > config["vocab_size"]:
        raise InteropError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but "
                           f"config.json vocab_size is {config['vocab_size']}")
    return tokenizer


def _refuse_to_overwrite(out: Path) -> None:
    """OUT may be new, an empty directory, or an earlier import (then it is replaced as a
    whole); anything else may be someone's work and is left alone."""
    from hcx.engine import checkpoint

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        earlier = "imported_from" in json.loads((out / CHECKPOINT_DIR / checkpoint.META).read_text())
    except (OSError, ValueError):
        earlier = False
    if not earlier:
        raise InteropError(f"{out} exists and is not the output of an earlier 'hcx import': "
                           "choose a new directory or remove it")


def _stub_yaml(stub: dict, hf_dir: Path, out: Path) -> str:
    """recipe.yaml: the stub, with comments saying what to add and how to run it."""
    import yaml

    def section(key: str) -> str:
        return yaml.safe_dump({key: stub[key]}, sort_keys=False, allow_unicode=True)

    return f"""\
# Written by 'hcx import {hf_dir}': the imported model as a recipe to continue
# pretraining from. It has no training data (data.sources), so it does not run by
# itself. Write a recipe that inherits it and adds sources, e.g. my-run.yaml:
#
#   base: {out / STUB}
#   name: my-run
#   output_dir: runs/my-run
#   data:
#     sources:
#       - {{name: ko_web, language: ko, path: "data://train/pretrain/..."}}
#
# then run 'hcx pretrain my-run.yaml'. Relative paths in a recipe file (base:, the
# tokenizer, init_from) are taken from that file's folder, so the tokenizer and the
# checkpoint below are this folder's own, wherever it is moved.
{section("name")}{section("output_dir")}
# From {hf_dir / "config.json"}; the weights only load into this shape.
{section("model")}
# Any layout loads the checkpoint (dist_checkpointing reshards it): tp must divide the
# attention heads and key/value groups, pp the layers.
{section("parallel")}
# The model's own tokenizer, copied from {hf_dir}. data.seq_length is at most
# model.max_position_embeddings.
{section("data")}
# Continued pretraining: a lower peak learning rate than from scratch. Adjust.
{section("train")}
# Weights only: the optimizer and the learning-rate schedule start fresh at step 0.
{section("checkpoint")}"""


def import_hf(hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, log=print,
              tokenizer: Path | None = None, new_rows: str = "mean") -> Path:
    """Write ``out``: ``checkpoint/`` (the weights as an hcx checkpoint), ``tokenizer/``
    (the model's tokenizer files) and ``recipe.yaml`` (a stub to continue pretraining
    from at ``tp``/``pp``). The config, layout, tokenizer and every tensor are checked
    before ``out`` is touched, and ``out`` appears complete or not at all. Returns the
    stub's path. ``tokenizer``: an extension of the model's tokenizer (``hcx tokenizer
    extend``) to import with instead, new rows initialised by ``new_rows``
    (:mod:`hcx.interop.vocab`)."""
    from hcx.config import TokenizerConfig
    from hcx.engine import checkpoint
    from hcx.engine import parallel
    from hcx.engine.inference import inference_recipe
    from hcx.engine.model import padded_vocab_size
    from hcx.engine.loop import build_engine

    hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
    config_file = hf_dir / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise InteropError(f"{config_file}: cannot read a model config: {e}") from None
    hf_vocab, extension, tok_dir = config.get("vocab_size"), None, hf_dir
    if tokenizer is not None:  # an extended tokenizer: the model grows to it
        from hcx.interop import vocab as vocabulary

        extension = vocabulary.plan_extension(hf_dir, int(hf_vocab or 0), Path(tokenizer))
        config, tok_dir = {**config, "vocab_size": extension.vocab_size}, extension.directory
    kind, file = _tokenizer_kind(tok_dir)
    stub, recipe = recipe_from_hf(config, name=hf_dir.name, tp=tp, pp=pp,
                                  tokenizer={"kind": kind, "path": str(out / TOKENIZER_DIR / file)},
                                  init_from=str(out / CHECKPOINT_DIR), source=str(config_file))
    # recipe.yaml names this folder's files relatively (they resolve from its folder); the
    # recipe recorded in the checkpoint keeps the absolute paths (and the checkpoint
    # carries its tokenizer: hcx.engine.checkpoint.tokenizer_bundle).
    stub["data"]["tokenizer"] = {"kind": kind, "path": f"{TOKENIZER_DIR}/{file}".rstrip("/")}
    stub["checkpoint"] = {"init_from": CHECKPOINT_DIR}
    if extension is not None:  # rows from here are new (train.trainable: new_embeddings)
        stub["train"]["new_tokens_from"] = extension.base_vocab_size
        recipe.train.new_tokens_from = extension.base_vocab_size
    _refuse_to_overwrite(out)
    model, vocab = recipe.model, recipe.model.vocab_size
    with _building(out) as tmp:
        _copy_tokenizer(tok_dir, config, kind, file, tmp / TOKENIZER_DIR)
        tensors = read_hf_tensors(hf_dir, hf_tensor_shapes(model, hf_vocab or vocab))
        if extension is not None:
            tensors = vocabulary.resize_hf_tensors(tensors, extension, new_rows, log=log)
        log(f"import: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} "
            f"parameters from {hf_dir}")
        # The local layer spec's names are hf_to_megatron's; its dist checkpoint keys are
        # the Transformer Engine spec's too. The vocabulary is padded as pretraining at
        # the stub's TP pads it (build_engine pads for TP=1, which keeps that size).
        engine_recipe = inference_recipe(recipe, tp=1)
        try:
            engine = build_engine(engine_recipe, padded_vocab_size(vocab, tp),
                                  with_optimizer=False)
            state = hf_to_megatron(tensors, model, engine.vocab_size)
            del tensors
            extra = {k: v for k, v in engine.model.state_dict().items()
                     if not isinstance(v, torch.Tensor)}  # megatron's _extra_state entries
            engine.model.load_state_dict({**extra, **state}, strict=True)
            del state
            carried = checkpoint.tokenizer_bundle(TokenizerConfig(
                kind=kind, path=str(tmp / TOKENIZER_DIR / file)))
            checkpoint.save_weights(tmp / CHECKPOINT_DIR, engine.model, {
                "recipe": recipe.to_dict(),
                "imported_from": {"hf_dir": str(hf_dir), "model_type": config["model_type"],
                                  **({"vocab_extension": vocabulary.extension_record(
                                      extension, new_rows)} if extension else {})}},
                tokenizer=carried)
        finally:
            parallel.shutdown()
        (tmp / STUB).write_text(_stub_yaml(stub, hf_dir, out), encoding="utf-8")
    log(f"import: wrote {out / CHECKPOINT_DIR}, {out / TOKENIZER_DIR} and {out / STUB}")
    return out / STUB
