"""``hcx pretrain``: the pretraining stage on the shared engine."""

from __future__ import annotations


from hcx.config import Recipe
from hcx.data import DataError, build_datasets, materialize_sources
from hcx.parallel import shutdown
from hcx.tokenization import load_tokenizer
from hcx.train import PretrainTask, build_engine, restore, train, write_run_recipe


def model_vocab_size(recipe: Recipe, tokenizer_vocab: int) -> int:
    if recipe.model.vocab_size is None:
        return tokenizer_vocab
    if recipe.model.vocab_size < tokenizer_vocab:
        raise DataError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({tokenizer_vocab})")
    return recipe.model.vocab_size


def run(recipe: Recipe) -> list[dict]:
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    vocab = model_vocab_size(recipe, tokenizer.vocab_size)
    # Before the process group exists: tokenizing a large raw source can take longer
    # than any collective timeout (processes coordinate through a file lock instead).
    prefixes = materialize_sources(recipe, tokenizer)
    engine = build_engine(recipe, vocab)
    try:
        write_run_recipe(engine)
        datasets = build_datasets(recipe, prefixes, tokenizer)
        restore(engine)
        task = PretrainTask(engine, datasets.train)
        valid = None
        if datasets.valid is not None:
            valid = PretrainTask(engine, datasets.valid, held_out=True)
        records = train(engine, task, valid)
        return records
    finally:
        shutdown()
