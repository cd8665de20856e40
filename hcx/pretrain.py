"""``hcx pretrain``: the pretraining stage on the shared engine."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from hcx.config import Recipe
from hcx.data import DataError, build_datasets, materialize_sources
from hcx.parallel import shutdown
from hcx.tokenization import load_tokenizer
from hcx.train import PretrainTask, build_engine, restore, train


def model_vocab_size(recipe: Recipe, tokenizer_vocab: int) -> int:
    if recipe.model.vocab_size is None:
        return tokenizer_vocab
    if recipe.model.vocab_size < tokenizer_vocab:
        raise DataError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({tokenizer_vocab})")
    return recipe.model.vocab_size


def run(recipe: Recipe) -> list[dict]:
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    engine = build_engine(recipe, model_vocab_size(recipe, tokenizer.vocab_size))
    try:
        out = Path(recipe.output_dir)
        if engine.topo.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1, ensure_ascii=False))
            prefixes = materialize_sources(recipe, tokenizer, is_writer=True)
        dist.barrier()
        if engine.topo.rank != 0:
            prefixes = materialize_sources(recipe, tokenizer, is_writer=False)
        datasets = build_datasets(recipe, prefixes, tokenizer)
        restore(engine)
        task = PretrainTask(engine, datasets.train)
        valid = PretrainTask(engine, datasets.valid) if datasets.valid is not None else None
        return train(engine, task, valid)
    finally:
        shutdown()
