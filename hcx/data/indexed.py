"""Pretraining data: megatron-core indexed datasets, blended per source.

Each recipe source is a ``.bin/.idx`` pair (``prefix``), written by
``hcx data prepare`` or by :func:`write_indexed_dataset`, or a raw JSONL/text file
(``path``) that is tokenized once into the cache. megatron-core's
``BlendedMegatronDatasetBuilder`` builds the GPT samples and the weighted blend.

The order of samples is a pure function of the recipe, so the data position is
just the number of samples consumed: resume after step k reads exactly what an
uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hcx.config import Recipe
from hcx.errors import HcxError
from hcx.paths import resolve
from hcx.data.prepare import token_dtype
from hcx.tokenizer.loading import Tokenizer


class DataError(HcxError, ValueError):
    """Bad input data; the message names the file and line."""


# --- writing indexed datasets --------------------------------------------------------


def write_indexed_dataset(documents: Iterable[list[int]], prefix: str | Path, vocab_size: int) -> int:
    """Write token documents as ``prefix.bin/.idx`` (megatron-core format), atomically:
    the files appear under their final names only once complete. Returns #documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=token_dtype(vocab_size))
    n = 0
    for doc in documents:
        if not doc:
            continue
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
        n += 1
    builder.finalize(str(tmp) + ".idx")
    if n == 0:
        for ext in (".bin", ".idx"):
            Path(str(tmp) + ext).unlink(missing_ok=True)
        raise DataError(f"{prefix}: no non-empty documents to write")
    os.replace(str(tmp) + ".bin", str(prefix) + ".bin")
    os.replace(str(tmp) + ".idx", str(prefix) + ".idx")
    return n


def read_texts(path: Path, text_field: str) -> Iterator[str]:
    """Texts of a JSONL file (``text_field`` of each line), a plain text file (one
    document per blank-line block) or a source file. Errors name the file and line."""
    from hcx.data.sources import BadRecord, detect_format, parse_record, raw_records

    if not path.exists():
        raise DataError(f"{path}: file not found")
    for record in raw_records(path, detect_format(path)):
        try:
            yield parse_record(record, text_field)
        except BadRecord as e:
            raise DataError(str(e)) from None


def materialize_sources(recipe: Recipe, tokenizer: Tokenizer) -> list[str]:
    """Dataset prefixes of all sources in recipe order. Raw sources (``path``) are
    prepared first if needed (:func:`hcx.data.prepare.ensure_prepared`, which every process
    may call at once)."""
    from hcx.data.prepare import ensure_prepared, raw_sources

    prepared = (ensure_prepared(recipe, log=_log_any_rank, say_up_to_date=False)
                if raw_sources(recipe) else {})
    prefixes = []
    for source in recipe.data.sources:
        if source.prefix is not None:
            prefix = resolve(source.prefix)
            for ext in (".bin", ".idx"):
                if not Path(str(prefix) + ext).exists():
                    raise DataError(
                        f"data source {source.name!r}: {prefix}{ext} not found "
                        "(build it with 'hcx data prepare')"
                    )
        else:
            prefix = prepared[source.name]
        prefixes.append(str(prefix))
    return prefixes


def _log_any_rank(message: str) -> None:
    """Whichever rank takes the lock prepares the data; it says so, with its rank."""
    rank = os.environ.get("RANK", "0")
    print(f"hcx: {message}" if rank == "0" else f"hcx [rank {rank}]: {message}", flush=True)


# --- building samples -------------------------------------------------------------------


@dataclass
class _TokenizerInfo:
    """What megatron's GPTDataset reads from a tokenizer."""

    vocab_size: int
    eod: int
    pad: int
    fingerprint: str

    @property
    def unique_identifiers(self) -> dict:
        # Part of megatron's index-cache key: a new tokenizer must not reuse old indices.
        return {"class": "hcx", "fingerprint": self.fingerprint}


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None


def check_splits(recipe: Recipe, prefixes: list[str]) -> None:
    """Refuse splits that would be empty for a source.

    megatron-core assigns each source's documents to train/valid/test by the split
    bookends; a split of non-zero weight with no documents makes ``GPTDataset``
    loop forever (megatron-core 0.16) instead of failing. Say which source instead.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(recipe.data.split))
    except Exception as e:
        raise DataError(f"data.split {recipe.data.split!r} is not a valid split: {e}") from None
    names = ("train", "validation", "test")
    for source, prefix in zip(recipe.data.sources, prefixes):
        n_docs = len(IndexedDataset(prefix).document_indices) - 1
        for name, bookends in zip(names, matrix):
            if bookends is None:
                continue
            n = int(round(bookends[1] * n_docs)) - int(round(bookends[0] * n_docs))
            if n == 0:
                raise DataError(
                    f"data source {source.name!r} has {n_docs} documents: data.split "
                    f"{recipe.data.split!r} leaves none for its {name} split. Add documents or "
                    "change data.split (e.g. '100,0,0' for no held-out data)."
                )


def _contents_digest(prefixes: list[str]) -> str:
    """Changes when any dataset file is rewritten. megatron keys its sample-index cache
    on the dataset path (not its contents), and ``hcx data prepare`` rewrites datasets
    in place: without this, re-prepared data would be read through stale indices."""
    h = hashlib.sha1()
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            st = Path(prefix + ext).stat()
            h.update(f"{prefix}{ext}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_datasets(recipe: Recipe, prefixes: list[str], tokenizer: Tokenizer) -> Datasets:
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_splits(recipe, prefixes)
    t, d = recipe.train, recipe.data
    weights = [s.weight for s in d.sources]
    config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=d.seq_length,
        blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=d.split,
        path_to_cache=str(recipe.data_cache_dir / "indices"),
        # pad == eod (a tokenizer without a pad token) is safe: megatron then treats
        # the pad as absent (allow_ambiguous_pad_tokens=False), tested in test_units.
        tokenizer=_TokenizerInfo(tokenizer.vocab_size, tokenizer.eod, tokenizer.pad,
                                 tokenizer.fingerprint() + "/" + _contents_digest(prefixes)),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal mask is built inside attention
    )
    n_train = t.steps * t.global_batch_size
    n_valid = 0
    if d.eval_every:
        n_valid = d.eval_batches * t.global_batch_size
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [n_train, n_valid, 0], lambda: True, config
    ).build()
    if train is None:
        raise DataError("the train split is empty; check data.split")
    return Datasets(train=train, valid=valid if n_valid else None)


def stack_samples(dataset, positions) -> dict[str, torch.Tensor]:
    """One micro-batch: the GPT samples at data ``positions`` (wrapping around the
    dataset), stacked."""
    items = [dataset[i % len(dataset)] for i in positions]
    return {key: torch.stack([torch.as_tensor(np.asarray(item[key])) for item in items])
            for key in ("tokens", "labels", "loss_mask", "position_ids")}
