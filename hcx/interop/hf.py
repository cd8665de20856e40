"""Hugging Face interoperability, both ways.

Export: an hcx checkpoint of any TP/PP layout becomes a directory of the family the
model came from (Llama, Mistral, Qwen2, Qwen3, EXAONE; Llama for models trained here:
:mod:`hcx.interop.families`) that ``transformers`` loads without remote code. It reads
the checkpoint one layer at a time (:mod:`hcx.interop.dist_reader`) and writes sharded
safetensors as it goes (:mod:`hcx.interop.safetensors_out`). Import: such a directory
becomes an hcx checkpoint (weights only) plus a recipe stub to continue pretraining from.

Each megatron tensor is renamed or split:

- ``linear_qkv`` holds, per query group, that group's query heads, then its key head,
  then its value head (``[groups * (heads/groups + 2) * head_dim, hidden]``), and so does
  its bias (Qwen2's q/k/v biases);
- ``linear_fc1`` is SwiGLU's gate then up projection (megatron chunks it in two and
  applies SiLU to the first half);
- RMSNorm weights (with Qwen3's per-head ``q_layernorm``/``k_layernorm`` as
  ``q_norm``/``k_norm``), ``linear_proj`` (o_proj), ``linear_fc2`` (down_proj),
  embeddings and the output layer map one to one. RoPE is the rotate-half form in both.
- megatron pads the vocabulary (``hcx.engine.model.padded_vocab_size``); export keeps the
  padding rows, import adds zero rows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from hcx.config import ModelConfig, Recipe
from hcx.interop.families import (FAMILIES, MODEL_KEYS, Family, InteropError, export_family,
                                  family_of, model_from_hf)
from hcx.interop import families

__all__ = ["FAMILIES", "InteropError", "export_hf", "import_hf", "model_from_hf",
           "read_checkpoint", "recipe_from_hf"]


# --- the tensor mapping ------------------------------------------------------------
# Megatron names are the local layer spec's, relative to a layer (``decoder.layers.N.``);
# HF names are Llama's (hcx.interop.families spells them another family's way).

# Transformer Engine fuses the pre-attention and pre-MLP norms into the next linear layer;
# its names are also the ones dist checkpoints use for either spec.
TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def layer_to_hf(layer: dict[str, torch.Tensor], model: ModelConfig,
                i: int) -> dict[str, torch.Tensor]:
    """HF tensors of layer ``i`` from its megatron tensors (local or TE norm names)."""
    layer = {TE_NORMS.get(k, k): v for k, v in layer.items()}
    heads, groups, head_dim = model.num_attention_heads, model.query_groups, model.kv_channels
    per_group = heads // groups
    h = f"model.layers.{i}."
    qkv = layer["self_attention.linear_qkv.weight"].view(groups, per_group + 2, head_dim, -1)
    gate, up = layer["mlp.linear_fc1.weight"].chunk(2, dim=0)
    out = {
        h + "input_layernorm.weight": layer["input_layernorm.weight"],
        h + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(heads * head_dim, -1),
        h + "self_attn.k_proj.weight": qkv[:, per_group].reshape(groups * head_dim, -1),
        h + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(groups * head_dim, -1),
    }
    if model.qkv_bias:
        bias = layer["self_attention.linear_qkv.bias"].view(groups, per_group + 2, head_dim)
        out.update({h + "self_attn.q_proj.bias": bias[:, :per_group].reshape(-1),
                    h + "self_attn.k_proj.bias": bias[:, per_group].reshape(-1),
                    h + "self_attn.v_proj.bias": bias[:, per_group + 1].reshape(-1)})
    if model.qk_norm:
        out.update({h + "self_attn.q_norm.weight": layer["self_attention.q_layernorm.weight"],
                    h + "self_attn.k_norm.weight": layer["self_attention.k_layernorm.weight"]})
    out.update({
        h + "self_attn.o_proj.weight": layer["self_attention.linear_proj.weight"],
        h + "post_attention_layernorm.weight": layer["pre_mlp_layernorm.weight"],
        h + "mlp.gate_proj.weight": gate,
        h + "mlp.up_proj.weight": up,
        h + "mlp.down_proj.weight": layer["mlp.linear_fc2.weight"],
    })
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def layer_from_hf(tensors: dict[str, torch.Tensor], model: ModelConfig,
                  i: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`layer_to_hf`: megatron tensors of layer ``i`` (local names)."""
    heads, groups, head_dim = model.num_attention_heads, model.query_groups, model.kv_channels
    per_group = heads // groups
    h = f"model.layers.{i}."

    def grouped(kind: str, n: int, *rest: int) -> torch.Tensor:
        return tensors[h + f"self_attn.{kind}"].view(groups, n, head_dim, *rest)

    hidden = model.hidden_size
    qkv = [grouped("q_proj.weight", per_group, hidden), grouped("k_proj.weight", 1, hidden),
           grouped("v_proj.weight", 1, hidden)]
    out = {
        "input_layernorm.weight": tensors[h + "input_layernorm.weight"],
        "pre_mlp_layernorm.weight": tensors[h + "post_attention_layernorm.weight"],
        "self_attention.linear_qkv.weight": torch.cat(qkv, dim=1).reshape(-1, hidden),
        "self_attention.linear_proj.weight": tensors[h + "self_attn.o_proj.weight"],
        "mlp.linear_fc1.weight": torch.cat([tensors[h + "mlp.gate_proj.weight"],
                                            tensors[h + "mlp.up_proj.weight"]]),
        "mlp.linear_fc2.weight": tensors[h + "mlp.down_proj.weight"],
    }
    if model.qkv_bias:
        bias = [grouped("q_proj.bias", per_group), grouped("k_proj.bias", 1),
                grouped("v_proj.bias", 1)]
        out["self_attention.linear_qkv.bias"] = torch.cat(bias, dim=1).reshape(-1)
    if model.qk_norm:
        out["self_attention.q_layernorm.weight"] = tensors[h + "self_attn.q_norm.weight"]
        out["self_attention.k_layernorm.weight"] = tensors[h + "self_attn.k_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def megatron_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors (Llama names) from a single-process megatron GPTModel state dict."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"]}
    for i in range(model.num_layers):
        m = f"decoder.layers.{i}."
        out.update(layer_to_hf({k[len(m):]: v for k, v in state.items() if k.startswith(m)},
                               model, i))
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    if not model.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def pad_vocab(t: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """``t`` with zero rows up to megatron's padded vocabulary."""
    out = t.new_zeros(padded_vocab, t.shape[1])
    out[:t.shape[0]] = t
    return out


def hf_to_megatron(tensors: dict[str, torch.Tensor], model: ModelConfig,
                   padded_vocab: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`megatron_to_hf`: a single-process GPTModel state dict (local
    layer names) from HF tensors (Llama names). The embedding and output layer get zero
    rows from the HF vocabulary size up to ``padded_vocab`` (megatron's padding): the
    padded ids never occur in data, and their logits start at 0."""
    state = {"embedding.word_embeddings.weight":
                 pad_vocab(tensors["model.embed_tokens.weight"], padded_vocab),
             "decoder.final_layernorm.weight": tensors["model.norm.weight"]}
    if not model.tie_embeddings:
        state["output_layer.weight"] = pad_vocab(tensors["lm_head.weight"], padded_vocab)
    for i in range(model.num_layers):
        state.update({f"decoder.layers.{i}.{k}": v
                      for k, v in layer_from_hf(tensors, model, i).items()})
    return {k: v.contiguous() for k, v in state.items()}


def layer_shapes(model: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Every HF tensor (Llama names) of layer ``i``, with its shape, in transformers'
    order."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.kv_channels
    q, kv = model.num_attention_heads * d, model.query_groups * d
    p = f"model.layers.{i}."
    shapes = {p + "input_layernorm.weight": (h,),
              p + "self_attn.q_proj.weight": (q, h),
              p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h)}
    if model.qkv_bias:
        shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)})
    if model.qk_norm:
        shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    shapes.update({p + "self_attn.o_proj.weight": (h, q),
                   p + "post_attention_layernorm.weight": (h,),
                   p + "mlp.gate_proj.weight": (f, h),
                   p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f)})
    return shapes


def hf_tensor_shapes(model: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF directory of this shape holds (Llama names), with its shape, in
    transformers' order (embedding, layers, final norm, output layer)."""
    shapes = {"model.embed_tokens.weight": (vocab_size, model.hidden_size)}
    for i in range(model.num_layers):
        shapes.update(layer_shapes(model, i))
    shapes["model.norm.weight"] = (model.hidden_size,)
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = (vocab_size, model.hidden_size)
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
    """``config.json`` for a recipe's model: its family's (Llama for hcx-native models)."""
    model = recipe.model
    return families.hf_config(model, export_family(model), vocab_size,
                              bos=tokenizer.special_id("<s>"), eos=tokenizer.eod,
                              pad=tokenizer.pad, dtype=str(dtype).removeprefix("torch."))


def generation_config(tokenizer) -> dict:
    """transformers' generate stops at any of ``eos_token_id``: the end of document and
    the end of an assistant turn (hcx's ``<|endofturn|>``, or an imported tokenizer's
    chat template's, as Llama 3 lists both), so hcx's and transformers' generations end
    at the same tokens."""
    from hcx.engine.generate import chat_stop_ids
    from hcx.tokenizer.chat import ChatError

    eos = [tokenizer.eod]
    try:
        eos += [i for i in chat_stop_ids(tokenizer) if i not in eos]
    except ChatError:  # no chat markers and no template: documents only
        pass
    return {"bos_token_id": tokenizer.special_id("<s>"), "eos_token_id": eos,
            "pad_token_id": tokenizer.pad}


@dataclass
class HfWeights:
    """A checkpoint's weights as HF tensors (Llama names), with what describes them."""

    path: Path  # the step directory
    recipe: Recipe
    tokenizer: Any
    vocab_size: int  # the model's, padded
    tensors: dict[str, torch.Tensor]


def read_checkpoint(ckpt: Path, log=print) -> HfWeights:
    """The weights of an hcx checkpoint (a step directory or a checkpoints directory) of
    any layout, loaded whole into one process's model with the recipe the checkpoint
    records (megatron's loader). The export streams instead (:func:`export_hf`); this is
    the reference it is tested against."""
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


# dist checkpoint keys of the parts outside the layers; the layers' are stacked
# (``decoder.layers.<name>``: [num_layers, ...]).
EMBEDDING, FINAL_NORM, OUTPUT = ("embedding.word_embeddings.weight",
                                 "decoder.final_layernorm.weight", "output_layer.weight")
LAYERS, OPTIMIZER = "decoder.layers.", "optimizer."


def stream_hf_tensors(reader, model: ModelConfig,
                      vocab: int) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(part, HF tensors)`` for the embedding, each layer, the final norm and the
    output layer, in transformers' order, read from a dist checkpoint one part at a
    time (``reader``: :class:`hcx.interop.dist_reader.DistCheckpointReader`); the
    embedding and output layer keep their first ``vocab`` rows."""
    layer_keys = [k for k in reader.tensors if k.startswith(LAYERS)]
    known = {EMBEDDING, FINAL_NORM, *layer_keys} | (set() if model.tie_embeddings else {OUTPUT})
    # a training checkpoint also holds the optimizer's state, under its own keys
    unknown = sorted(k for k in set(reader.tensors) - known if not k.startswith(OPTIMIZER))
    if unknown:
        raise InteropError(f"{reader.path}: tensors a {model.family} model has no place for: "
                           f"{', '.join(unknown[:5])}")
    def rows(key: str) -> torch.Tensor:
        t = reader.read({key: (key, None)})[key]
        return t if t.shape[0] == vocab else t[:vocab].clone()

    yield "embedding", {"model.embed_tokens.weight": rows(EMBEDDING)}
    for i in range(model.num_layers):
        layer = reader.read({k[len(LAYERS):]: (k, i) for k in layer_keys})
        converted = layer_to_hf(layer, model, i)
        del layer
        yield f"layer {i}", converted
        del converted  # before the next layer is read
    yield "final norm", {"model.norm.weight": reader.read({"n": (FINAL_NORM, None)})["n"]}
    if not model.tie_embeddings:
        yield "output layer", {"lm_head.weight": rows(OUTPUT)}


def _write_part(writer, family: Family, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        writer.add(family.tensor_name(name), tensor)


def export_hf(ckpt: Path, out: Path, log=print, *, max_shard_size: str | int = "5GB",
              eval_run: Path | None = None, push_to_hub: str | None = None,
              observe=None) -> Path:
    """Write ``out`` atomically: config.json of the model's family, the weights as
    safetensors (sharded with model.safetensors.index.json above ``max_shard_size``),
    generation_config.json, the tokenizer files and a model card (README.md, with the
    scores of the ``hcx eval`` run directory ``eval_run``); then upload it to the Hub
    repository ``push_to_hub``.

    The weights are read from the checkpoint one layer at a time (any TP/PP layout:
    :mod:`hcx.interop.dist_reader`) and appended to the shard files as they come, so the
    export holds about one part of the model (the largest of the embedding, the output
    layer and one layer) twice over, never the whole model. ``observe(part)`` is called
    with each part in memory (tests measure what is held)."""
    from hcx.engine.checkpoint import checkpoint_path
    from hcx.engine.inference import checkpoint_recipe
    from hcx.interop import card, hub
    from hcx.interop.dist_reader import DistCheckpointReader
    from hcx.interop.safetensors_out import ShardedWriter, parse_size
    from hcx.tokenizer.loading import load_tokenizer

    ckpt = checkpoint_path(Path(ckpt))
    recipe = checkpoint_recipe(ckpt)
    model = recipe.model
    family = export_family(model)
    parse_size(max_shard_size)
    scores = card.read_scores(Path(eval_run)) if eval_run else None
    if push_to_hub:  # before the work, so an unreachable Hub costs nothing
        hub.check_reachable(push_to_hub)
    reader = DistCheckpointReader(ckpt)
    # The vocabulary the model was given (an imported model's: its own, so the round trip
    # is exact), else megatron's padded one: the padding rows never score a real token.
    padded, dtype = reader.shape(EMBEDDING)[0], reader.dtype(EMBEDDING)
    vocab = min(model.vocab_size or padded, padded)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    shapes = hf_tensor_shapes(model, vocab)
    out = Path(out)
    with _building(out) as tmp:
        writer = ShardedWriter(tmp, {family.tensor_name(n): (s, dtype) for n, s in shapes.items()},
                               max_shard_size)
        for part, tensors in stream_hf_tensors(reader, model, vocab):
            if observe is not None:
                observe(part)
            _write_part(writer, family, tensors)
            del tensors
        files = writer.close()
        config = hf_config(recipe, vocab, tokenizer, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(tokenizer), indent=2) + "\n")
        _write_tokenizer(recipe, tmp)
        (tmp / "README.md").write_text(card.model_card(recipe, ckpt, config, scores),
                                       encoding="utf-8")
    total = sum(math.prod(s) for s in shapes.values())
    log(f"exported {ckpt} to {out} as {family.architecture} ({total:,} parameters, "
        f"{len([f for f in files if f.endswith('.safetensors')])} safetensors file(s))")
    if push_to_hub:
        url = hub.push(out, push_to_hub, log=log)
        log(f"pushed {out} to {url}")
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

# The training part of the stub: continued pretraining wants a lower peak learning rate
# than training from scratch. Users adjust it; it makes the stub a complete recipe.
STUB_TRAIN = {"steps": 1000, "global_batch_size": 32, "micro_batch_size": 1, "lr": 3.0e-5,
              "min_lr": 3.0e-6, "warmup_steps": 100}
# A recipe needs data.sources; an import has none. The recipe recorded in the imported
# checkpoint (which 'hcx export' and inference read for the model and tokenizer) names
# this placeholder; recipe.yaml leaves data.sources out for the user to add.
NO_SOURCES = [{"name": "none-add-data-sources", "prefix": "none"}]


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
    family = family_of(config, source)
    origins = {"parallel.tp": f"--tp {tp}", "parallel.pp": f"--pp {pp}",
               **{f"model.{k}": f"{source}: {family.key(hf)}" for k, hf in MODEL_KEYS.items()}}
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


def read_hf_tensors(hf_dir: Path, shapes: dict[str, tuple[int, ...]],
                    family: Family | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``shapes`` names (Llama names, spelled in the files the way of
    ``family``), after checking all of them (before loading any): each must exist with
    that shape, and nothing else may be there but buffers transformers recomputes
    (``rotary_emb.inv_freq``) and, for tied embeddings, a copy of the embedding as
    ``lm_head.weight``. Errors name the tensor, file and shapes. Returns Llama names."""
    from safetensors import safe_open

    llama_names = {(family.tensor_name(n) if family else n): n for n in shapes}
    shapes = {stored: shapes[n] for stored, n in llama_names.items()}
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
                tensors[llama_names[name]] = f.get_tensor(name)
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
        tensors = read_hf_tensors(hf_dir, hf_tensor_shapes(model, hf_vocab or vocab),
                                  family_of(config, str(config_file)))
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
