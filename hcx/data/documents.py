"""What ``hcx data prepare`` does to each document, on its own: parse, normalize, filter,
mask PII, fill-in-the-middle, tokenize, and the exact hash, MinHash signature and eval
n-gram hits that the cross-document steps need. Runs inside the pipeline's tasks
(:class:`hcx.data.pipeline.ProcessShard`), any number of them at once."""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from hcx.config import DataSource, Recipe
from hcx.errors import HcxError
from hcx.data.sources import BadRecord, RawRecord, parse_record
from hcx.tokenizer.loading import Tokenizer, load_tokenizer

CHUNK_BYTES = 1 << 20       # records handed to a worker at a time
MAX_EXAMPLES = 5            # file:line examples kept per removal reason


class PrepareError(HcxError, ValueError):
    pass


# --- what a worker returns ------------------------------------------------------------------


@dataclass
class ChunkResult:
    """Documents of one chunk that survived the per-document steps, plus counts."""

    tokens: list[np.ndarray] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    language: list[str] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)
    text_hash: list[int] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)
    contaminated: list[tuple[int, ...]] = field(default_factory=list)
    records: int = 0
    bytes_in: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    pii: Counter = field(default_factory=Counter)
    fim: Counter = field(default_factory=Counter)
    bad: str | None = None  # the error, when not skipping bad input (processing stopped)

    def drop(self, reason: str, where: str) -> None:
        self.removed[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(where)


# --- the per-document steps (run in workers) ------------------------------------------------


@dataclass
class RunTools:
    """What the documents of every source share, built once per process (loading the
    eval n-gram index alone takes ~0.6 s; once per source it added seconds)."""

    tokenizer: Tokenizer
    filters: object            # hcx.data.corpus.clean.FilterConfig
    minhasher: object | None   # hcx.data.corpus.minhash.MinHasher, when near-dedup is on
    ngrams: object | None      # hcx.data.corpus.decontam.NgramIndex, when decontaminating
    starts_word: np.ndarray | None

    @classmethod
    def build(cls, recipe: Recipe, ngram_index_path: str | None) -> RunTools:
        from hcx.data.corpus.clean import FilterConfig
        from hcx.data.corpus.minhash import MinHasher

        cfg = recipe.data.prepare
        tokenizer = load_tokenizer(recipe.data.tokenizer)
        minhasher = (MinHasher(cfg.dedup.num_perm, cfg.dedup.ngram, seed=cfg.seed)
                     if cfg.dedup.near else None)
        ngrams = starts_word = None
        if ngram_index_path:
            from hcx.data.corpus.decontam import NgramIndex

            starts_word = word_start_table(tokenizer)
            with np.load(ngram_index_path) as arrays:
                ngrams = NgramIndex.from_arrays(**arrays)
        return cls(tokenizer, FilterConfig(**cfg.filters.model_dump()), minhasher, ngrams,
                   starts_word)


class DocumentProcessor:
    """Everything done to one document of a source before the cross-document steps."""

    def __init__(self, recipe: Recipe, source: DataSource, tools: RunTools):
        from hcx.data.corpus.fim import FimIds

        cfg = recipe.data.prepare
        self.cfg, self.source = cfg, source
        self.tokenizer, self.filters = tools.tokenizer, tools.filters
        self.minhasher, self.ngrams, self.starts_word = tools.minhasher, tools.ngrams, tools.starts_word
        self.fim_ids = None
        if source.uses_fim and cfg.fim.rate > 0:
            self.fim_ids = FimIds(*fim_token_ids(self.tokenizer))

    def __call__(self, chunk: list[RawRecord]) -> ChunkResult:
        out = ChunkResult()
        for record in chunk:
            out.records += 1
            out.bytes_in += record.size
            try:
                self._one(record, out)
            except BadRecord as e:
                if not self.cfg.skip_bad:
                    out.bad = str(e)
                    return out
                out.drop(f"bad_{e.reason}", record.where)
            except Exception as e:  # a bug or a library's surprise: still name the record
                raise PrepareError(f"{record.where}: unexpected {type(e).__name__} while "
                                   f"preparing this record: {e}") from e
        return out

    def _one(self, record: RawRecord, out: ChunkResult) -> None:
        from hcx.data.corpus.clean import detect_language, filter_reason, normalize
        from hcx.data.corpus.pii import mask_pii

        text = normalize(parse_record(record, self.source.text_field))
        reason = filter_reason(text, self.source.language, self.filters)
        if reason:
            out.drop(reason, record.where)
            return
        text_hash = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(),
                                   "little")
        if self.cfg.pii:
            text, counts = mask_pii(text)
            out.pii.update(counts)
        ids, plain_ids = self._tokenize(text, record, out)
        tokens = np.empty(len(ids) + 1, dtype=np.int32)  # one conversion from the list
        tokens[:-1] = ids
        tokens[-1] = self.tokenizer.eod
        plain = tokens[:-1] if plain_ids is None else np.asarray(plain_ids, dtype=np.int32)
        out.tokens.append(tokens)
        out.where.append(record.where)
        out.language.append(self.source.language if self.source.language != "any"
                            else detect_language(text))
        out.chars.append(len(text))
        out.text_hash.append(text_hash)
        if self.minhasher is not None:
            out.signatures.append(self.minhasher.signature(plain))
        out.contaminated.append(self._benchmarks_quoted(plain))

    def _benchmarks_quoted(self, tokens: np.ndarray) -> tuple[int, ...]:
        if self.ngrams is None:
            return ()
        from hcx.data.corpus.decontam import word_hashes

        return tuple(sorted(self.ngrams.labels_hit(word_hashes(tokens, self.starts_word))))

    def _tokenize(self, text: str, record: RawRecord,
                  out: ChunkResult) -> tuple[list[int], list[int] | None]:
        """The document's training ids, and for FIM documents its plain ids (document
        order, no sentinels) for the duplicate and contamination checks."""
        if self.fim_ids is None:
            return self.tokenizer.encode(text), None
        from hcx.data.corpus.fim import fim_layout, fim_split

        fim = self.cfg.fim
        # Seeded by the record's place, not by worker or order: the same input gives
        # the same FIM layout with any number of workers.
        key = zlib.crc32(f"{self.source.name}\0{record.where}".encode())
        rng = np.random.default_rng([self.cfg.seed, key])
        if rng.random() >= fim.rate:
            return self.tokenizer.encode(text), None
        spm = bool(rng.random() < fim.spm_rate)
        mode = "random" if rng.random() < fim.random_split_rate else "thirds"
        prefix, middle, suffix = (self.tokenizer.encode(part) for part in fim_split(text, mode, rng))
        out.fim[("spm" if spm else "psm") + "_" + mode] += 1
        return fim_layout(prefix, middle, suffix, self.fim_ids, spm), prefix + middle + suffix


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype megatron's indexed datasets can store these token ids in."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def word_start_table(tokenizer: Tokenizer) -> np.ndarray:
    """For each id: does its text begin with whitespace (a new word)?

    Each id is decoded after an anchor token, because many tokenizers (SentencePiece
    with a dummy prefix, HF Metaspace) drop a token's leading space when it is decoded
    first."""
    anchor = tokenizer.encode("a")[:1]
    head = tokenizer.decode(anchor)
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode(anchor + [i])
        text = text[len(head):] if text.startswith(head) else text
        table[i] = bool(text) and text[0].isspace()
    return table


def fim_token_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    from hcx.tokenizer import special_tokens as st

    ids = [tokenizer.special_id(t) for t in (st.FIM_PREFIX, st.FIM_MIDDLE, st.FIM_SUFFIX)]
    if None in ids:
        raise PrepareError(f"tokenizer {tokenizer.name} has no {st.FIM_PREFIX}/{st.FIM_MIDDLE}/"
                           f"{st.FIM_SUFFIX} tokens: use an hcx tokenizer (hcx tokenizer "
                           "train) or set data.prepare.fim.rate=0 / fim: false on the source")
    return tuple(ids)


def chunked(records: Iterable[RawRecord], max_bytes: int = CHUNK_BYTES) -> Iterator[list[RawRecord]]:
    chunk, size = [], 0
    for record in records:
        chunk.append(record)
        size += record.size
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
