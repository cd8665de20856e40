"""``train.trainable``: train only chosen parameters, or only the new rows of the
embedding and output layer, as EEVE's staged schedule does (Kim et al. 2024,
arXiv:2402.14714: first the new tokens' input embeddings, then their output embeddings,
then both, then all output embeddings, ..., then everything).

Selections (any number; their union trains, everything else is frozen):

==========================  ==========================================================
``all``                     every parameter (the default)
``embeddings``              the input embedding and the output layer, every row
``input_embeddings``        the input embedding
``output_embeddings``       the output layer (with tied embeddings: the same matrix)
``new_embeddings``          the new rows of both (``new_input_embeddings`` +
                            ``new_output_embeddings``)
``new_input_embeddings``    rows ``train.new_tokens_from`` .. vocabulary of the input
                            embedding
``new_output_embeddings``   the same rows of the output layer
anything else               a glob over megatron parameter names, e.g.
                            ``decoder.layers.*.mlp.*``, ``decoder.final_layernorm.*``
==========================  ==========================================================

How, so that frozen values stay bit-identical under every layout:

- a whole parameter that is not selected gets ``requires_grad = False`` before megatron's
  DDP and optimizer are built: DDP allocates no gradient buffer for it and the optimizer
  never sees it (its backward is skipped too);
- a row selection keeps the matrix trainable and zeroes the other rows' gradients after
  megatron's gradient reduction (``finalize_model_grads``, which all-reduces over DP or,
  with the distributed optimizer, reduce-scatters into each rank's shard), on the
  ``main_grad`` buffer the optimizer reads, so the mask holds whichever rank owns a row's
  optimizer state and whether or not a fused kernel wrote the gradient. The matrix is
  exempt from weight decay (AdamW's decay would move frozen rows with zero gradient);
  Adam's update of a row whose gradient was always zero is exactly zero.
- Tensor parallelism: the vocabulary-parallel embedding and the column-parallel output
  layer hold rows ``rank * V/tp .. (rank+1) * V/tp`` of the padded vocabulary on TP rank
  ``rank``; each rank masks its own slice by global id. Rows beyond the model's vocabulary
  (megatron's padding to a multiple of 128) never train under a ``new_*`` selection.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from hcx.config import Recipe, RecipeError

INPUT, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
NAMED = ("all", "embeddings", "input_embeddings", "output_embeddings", "new_embeddings",
         "new_input_embeddings", "new_output_embeddings")
# The attribute that marks a row-masked matrix (the optimizer exempts it from weight decay).
ROW_MASKED = "hcx_row_masked"


def selection(recipe: Recipe, names: list[str]) -> tuple[set[str], set[str]]:
    """The parameters (of ``names``, this stage's) that train whole, and those that train
    only their new rows. Raises RecipeError for a glob that matches nothing anywhere."""
    chosen = recipe.train.trainable
    tied = recipe.model.tie_embeddings
    inputs = {INPUT} | ({OUTPUT} if tied else set())
    outputs = {OUTPUT} | ({INPUT} if tied else set())
    whole: set[str] = set()
    rows: set[str] = set()
    for item in chosen:
        if item == "all":
            whole |= set(names)
        elif item in ("embeddings", "input_embeddings", "output_embeddings"):
            whole |= {"embeddings": inputs | outputs, "input_embeddings": inputs,
                      "output_embeddings": outputs}[item]
        elif item in ("new_embeddings", "new_input_embeddings", "new_output_embeddings"):
            rows |= {"new_embeddings": inputs | outputs, "new_input_embeddings": inputs,
                     "new_output_embeddings": outputs}[item]
        else:
            matched = {n for n in names if fnmatch.fnmatchcase(n, item)}
            if not matched:
                raise RecipeError(f"{recipe.where('train.trainable')}: train.trainable "
                                  f"{item!r} matches no parameter (names look like "
                                  f"{', '.join(sorted(names)[:3])}, ...; named choices: "
                                  f"{', '.join(NAMED)})")
            whole |= matched
    present = set(names)
    return whole & present, (rows - whole) & present


def apply(model, recipe: Recipe, vocab_size: int, log=print) -> dict[str, Any]:
    """Freeze what ``train.trainable`` leaves out, on this stage's (unwrapped) GPTModel,
    before DDP and the optimizer are built. ``vocab_size`` is the model's unpadded
    vocabulary. Returns the row-masked parameters by name (for :func:`mask_rows`)."""
    if recipe.train.trainable == ["all"]:
        return {}
    from megatron.core import parallel_state as ps

    params = dict(model.named_parameters())
    whole, rows = selection(recipe, list(params))
    first = recipe.train.new_tokens_from or 0
    if rows and first >= vocab_size:
        raise RecipeError(f"{recipe.where('train.new_tokens_from')}: train.new_tokens_from="
                          f"{first} is not below the vocabulary size {vocab_size}: no new rows")
    tp_rank = ps.get_tensor_model_parallel_rank()
    masked = {}
    for name, param in params.items():
        param.requires_grad_(name in whole or name in rows)
        if name in rows:
            local = param.shape[0]
            ids = torch.arange(tp_rank * local, (tp_rank + 1) * local, device=param.device)
            keep = (ids >= first) & (ids < vocab_size)
            setattr(param, ROW_MASKED, True)
            masked[name] = (param, keep)
    trained = sum(p.numel() for n, p in params.items() if n in whole) + \
        sum(int(k.sum()) * p.shape[1] for p, k in masked.values())
    log(f"train.trainable {recipe.train.trainable}: {trained:,} of "
        f"{sum(p.numel() for p in params.values()):,} parameters train on this rank"
        + (f" (rows {first:,}..{vocab_size - 1:,} of {', '.join(masked)})" if masked else ""))
    return masked


def mask_rows(masked: dict[str, Any]) -> None:
    """Zero the gradients of the rows that do not train (after gradient reduction)."""
    for param, keep in masked.values():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            grad.masked_fill_(~keep.unsqueeze(1), 0.0)


def after_reduction(finalize, masked: dict[str, Any]):
    """megatron's ``finalize_model_grads`` followed by :func:`mask_rows`."""
    if not masked:
        return finalize

    def finalize_then_mask(*args, **kwargs):
        result = finalize(*args, **kwargs)
        mask_rows(masked)
        return result

    return finalize_then_mask
