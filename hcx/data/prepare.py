"""``hcx data prepare RECIPE``: raw corpora to megatron-core indexed datasets.

Per document, in worker processes (:func:`process_chunk`):
    parse (file:line on error) -> NFC + control characters -> filters -> PII masking
    -> fill-in-the-middle (code) -> tokenize + eod -> exact hash, MinHash signature and
    eval n-gram hits (on the document's tokens).
In the main process, in input order (so the output does not depend on the number of
workers): exact and near-duplicate removal across all sources (earlier sources win),
decontamination, and writing one ``<source>.bin/.idx`` per source.

Nothing half-written is ever accepted: each dataset is written under a temporary name
and renamed (``.bin`` first, then ``.idx``, so an ``.idx`` always has its whole
``.bin``), and ``manifest.json``, which ``hcx pretrain`` checks, is written last.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hcx.config import DataSource, PrepareConfig, Recipe
from hcx.errors import HcxError, Stopped
from hcx.paths import resolve
from hcx.data.sources import (BadRecord, RawRecord, SourceError, expand, is_hub, iter_records,
                         parse_record)
from hcx.tokenizer.loading import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
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


class Processors:
    """One :class:`DocumentProcessor` per source, built on first use (a worker serves
    every source of a run, so the tokenizer and eval index load once per process)."""

    def __init__(self, recipe: Recipe, ngram_index_path: str | None):
        self.recipe, self.ngram_index_path = recipe, ngram_index_path
        self.tools: RunTools | None = None
        self.by_source: dict[int, DocumentProcessor] = {}

    def __call__(self, job: tuple[int, list[RawRecord]]) -> ChunkResult:
        index, chunk = job
        if index not in self.by_source:
            if self.tools is None:
                self.tools = RunTools.build(self.recipe, self.ngram_index_path)
            self.by_source[index] = DocumentProcessor(
                self.recipe, self.recipe.data.sources[index], self.tools)
        return self.by_source[index](chunk)


# Pool workers build their state once, in the initializer; a module-level slot is how
# multiprocessing hands per-process state to the mapped function.
_processors: Processors | None = None


def _init_worker(recipe: Recipe, ngram_index_path: str | None) -> None:
    global _processors
    # The parent handles Ctrl-C and SIGTERM (also when a scheduler signals the whole
    # process group): it stops the pool and removes partial files. A worker whose
    # parent died (SIGKILL, out of memory) exits instead of lingering.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    _processors = Processors(recipe, ngram_index_path)


def _work(job: tuple[int, list[RawRecord]]) -> ChunkResult:
    return _processors(job)


def start_workers(recipe: Recipe, ngram_index_path: str | None):
    """A function mapping ``(source index, chunks)`` to results in input order: in this
    process for one worker, else on a pool started once for the whole run. Returns
    it and a function that stops the pool."""
    workers = recipe.data.prepare.workers
    if workers == 1:
        processors = Processors(recipe, ngram_index_path)
        return (lambda index, chunks: (processors((index, c)) for c in chunks)), (lambda: None)
    # spawn, not fork: the parent has threads (torch, tokenizers, tqdm), and a forked
    # child can die holding a lock; an executor then fails loudly instead of hanging.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(recipe, ngram_index_path))
    return ((lambda index, chunks: ordered_map(pool, _work, ((index, c) for c in chunks),
                                               in_flight=2 * workers)),
            (lambda: pool.shutdown(wait=True, cancel_futures=True)))


def ordered_map(pool: ProcessPoolExecutor, fn, items: Iterable, in_flight: int) -> Iterator:
    """``pool.map`` that reads ``items`` lazily: at most ``in_flight`` chunks are queued
    (Executor.map would read a whole corpus into memory first). Results in input order."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --- reading ----------------------------------------------------------------------------------


def source_records(source: DataSource) -> Iterator[RawRecord]:
    return iter_records(source.path, source.include, source.exclude, source.format,
                        source.language, source.hub_config, source.hub_split)


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


def source_bytes(source: DataSource) -> int | None:
    if is_hub(source.path):
        return None
    return sum(f.stat().st_size for f in expand(source.path, source.include, source.exclude))


# --- the cross-document steps and writing (main process) -----------------------------------


@dataclass
class SourceStats:
    name: str
    language: str
    weight: float
    records: int = 0
    bytes_in: int = 0
    documents: int = 0
    tokens: int = 0
    characters: int = 0
    tokens_by_language: Counter = field(default_factory=Counter)
    removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    pii: Counter = field(default_factory=Counter)
    fim: Counter = field(default_factory=Counter)
    contamination: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def drop(self, reason: str, where: str) -> None:
        self.removed[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(where)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "language": self.language, "weight": self.weight,
            "records": self.records, "bytes_in": self.bytes_in, "documents": self.documents,
            "tokens": self.tokens, "characters": self.characters,
            "tokens_by_language": dict(self.tokens_by_language),
            "removed": dict(self.removed), "removed_examples": dict(self.examples),
            "pii_masked": dict(self.pii), "fim": dict(self.fim),
            "contaminated_documents_by_benchmark": dict(self.contamination),
            "seconds": round(self.seconds, 2),
            "mb_per_second": round(self.bytes_in / 1e6 / max(self.seconds, 1e-9), 2),
        }


class CrossDocumentFilter:
    """Exact and near duplicates across all sources, and contamination, in input order."""

    def __init__(self, cfg: PrepareConfig, benchmarks: list[str]):
        from hcx.data.corpus.minhash import LSHIndex

        self.cfg, self.benchmarks = cfg, benchmarks
        self.seen: set[int] = set()
        self.lsh = LSHIndex(cfg.dedup.num_perm, cfg.dedup.threshold) if cfg.dedup.near else None
        self.next_key = 0

    def keep(self, result: ChunkResult, i: int, stats: SourceStats) -> bool:
        where = result.where[i]
        hits = result.contaminated[i]
        if hits and self.cfg.decontaminate.action == "drop":
            for label in hits:
                stats.contamination[self.benchmarks[label]] += 1
            stats.drop("contaminated", where)
            return False
        if not self._unique(result, i, stats):
            return False
        for label in hits:  # action "report": counted among the documents kept
            stats.contamination[self.benchmarks[label]] += 1
        return True

    def _unique(self, result: ChunkResult, i: int, stats: SourceStats) -> bool:
        where = result.where[i]
        if self.cfg.dedup.exact:
            h = result.text_hash[i]
            if h in self.seen:
                stats.drop("exact_duplicate", where)
                return False
            self.seen.add(h)
        if self.lsh is not None:
            self.next_key += 1
            if self.lsh.query_insert(self.next_key, result.signatures[i]) is not None:
                stats.drop("near_duplicate", where)
                return False
        return True


def _remove(prefix: Path) -> None:
    for ext in (".idx", ".bin"):
        Path(str(prefix) + ext).unlink(missing_ok=True)


def prepare_source(recipe: Recipe, index: int, out_dir: Path, cross: CrossDocumentFilter,
                   process, progress: bool, dtype,
                   check_stop: Callable[[], None] = lambda: None) -> SourceStats:
    """Stream one source through the workers (``process``) and the cross-document
    filter into ``<out_dir>/<name>.bin/.idx``. ``check_stop`` raises when the run must
    stop (called between chunks and before the files are put in place)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    source = recipe.data.sources[index]
    stats = SourceStats(source.name, source.language, source.weight)
    t0 = time.time()
    final = out_dir / source.name
    tmp = out_dir / f"{source.name}.tmp{os.getpid()}"
    bar = tqdm(total=source_bytes(source), unit="B", unit_scale=True, desc=source.name,
               disable=not progress, leave=False, file=sys.stderr)
    try:  # from the moment the temporary file exists: a signal may arrive at any point
        builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
        results = process(index, chunked(source_records(source)))
        for result in results:
            check_stop()
            bar.update(result.bytes_in)
            if result.bad is not None:
                raise PrepareError(f"data source {source.name!r}: {result.bad} (use "
                                   "--skip-bad to count and skip bad records)")
            stats.records += result.records
            stats.bytes_in += result.bytes_in
            stats.removed.update(result.removed)
            for reason, examples in result.examples.items():
                room = MAX_EXAMPLES - len(stats.examples[reason])
                stats.examples[reason].extend(examples[:max(room, 0)])
            stats.pii.update(result.pii)
            stats.fim.update(result.fim)
            for i, tokens in enumerate(result.tokens):
                if not cross.keep(result, i, stats):
                    continue
                builder.add_document(tokens, [len(tokens)])
                stats.documents += 1
                stats.tokens += len(tokens)
                stats.characters += result.chars[i]
                stats.tokens_by_language[result.language[i]] += len(tokens)
        if stats.documents == 0:
            raise PrepareError(f"data source {source.name!r}: no documents left after "
                               f"{stats.records} records (removed: {dict(stats.removed)})")
        check_stop()
        builder.finalize(str(tmp) + ".idx")
        # .bin before .idx: whoever sees the final .idx also sees its complete .bin.
        _remove(final)
        os.replace(str(tmp) + ".bin", str(final) + ".bin")
        os.replace(str(tmp) + ".idx", str(final) + ".idx")
    finally:
        bar.close()
        _remove(tmp)
    stats.seconds = time.time() - t0
    return stats


# --- decontamination index ----------------------------------------------------------------


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def eval_files(cfg: PrepareConfig) -> dict[str, list[Path]]:
    """Benchmark name -> its JSONL files, under ``decontaminate.eval_dir``."""
    d = cfg.decontaminate
    root = resolve(d.eval_dir)
    if not root.is_dir():
        raise PrepareError(f"data.prepare.decontaminate.eval_dir: {root} is not a directory "
                           "(one folder of JSONL files per benchmark)")
    names = d.benchmarks or sorted(p.name for p in root.iterdir() if p.is_dir())
    out = {}
    for name in names:
        files = sorted((root / name).glob("*.jsonl"))
        if not files:
            raise PrepareError(f"data.prepare.decontaminate: benchmark {name!r} has no *.jsonl "
                               f"files in {root / name}")
        out[name] = files
    return out


def build_ngram_index(recipe: Recipe, cache_dir: Path, log) -> tuple[str, list[str]]:
    """The eval sets' token n-grams (cached by tokenizer and file contents); returns the
    index path and the benchmark names (label i = names[i])."""
    from hcx.data.corpus.clean import normalize
    from hcx.data.corpus.decontam import NgramIndex, word_hashes

    cfg = recipe.data.prepare
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    files = eval_files(cfg)
    key = json.dumps([FORMAT_VERSION, "words", tokenizer.fingerprint(), cfg.decontaminate.ngram,
                      {n: _stamps(fs) for n, fs in files.items()}])
    path = cache_dir / f"ngrams-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    names = list(files)
    if path.exists():
        return str(path), names
    starts_word = word_start_table(tokenizer)
    log(f"indexing {len(names)} eval sets for decontamination "
        f"({cfg.decontaminate.ngram}-word n-grams)")
    index = NgramIndex(cfg.decontaminate.ngram)
    for label, (name, fs) in enumerate(files.items()):
        for f in fs:
            for lineno, line in enumerate(f.open("rb"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise PrepareError(f"{f}:{lineno}: malformed JSON in eval set ({e})") from None
                for text in _strings(record):
                    if len(text) >= 20:
                        ids = np.asarray(tokenizer.encode(normalize(text)), np.int64)
                        index.add(word_hashes(ids, starts_word), label)
    index.freeze()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **index.to_arrays())
    os.replace(tmp, path)
    return str(path), names


# --- the whole run ---------------------------------------------------------------------------


def raw_sources(recipe: Recipe) -> list[DataSource]:
    return [s for s in recipe.data.sources if s.path is not None]


def _stamps(files: list[Path]) -> list[tuple[str, int, int]]:
    """Path, size and modification time of each file: what a cache key needs to notice
    that an input changed."""
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def fingerprint(recipe: Recipe) -> str:
    """Changes when anything that shapes the prepared data changes."""
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    files = {}
    for s in raw_sources(recipe):
        if is_hub(s.path):
            files[s.name] = [s.path, s.hub_config, s.hub_split]
        else:
            try:
                files[s.name] = _stamps(expand(s.path, s.include, s.exclude))
            except SourceError as e:
                raise PrepareError(f"data source {s.name!r}: {e}") from None
    if recipe.data.prepare.decontaminate:
        files["<eval sets>"] = _stamps([f for fs in eval_files(recipe.data.prepare).values()
                                        for f in fs])
    # Not part of it: how many workers (the output is the same) and skip_bad (data
    # prepared with --skip-bad is prepared; a later pretrain must not redo it strictly).
    prep = recipe.data.prepare.model_dump(exclude={"workers", "output_dir", "skip_bad"})
    key = json.dumps([FORMAT_VERSION, tokenizer.fingerprint(), prep,
                      [s.model_dump(exclude={"weight"}) for s in raw_sources(recipe)], files],
                     sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()


def prepared_dir(recipe: Recipe) -> Path:
    p = recipe.data.prepare.output_dir
    return resolve(p) if p else recipe.data_cache_dir / "prepared"


def is_prepared(recipe: Recipe) -> bool:
    manifest = prepared_dir(recipe) / MANIFEST
    if not manifest.exists():
        return False
    try:
        recorded = json.loads(manifest.read_text())["fingerprint"]
    except (ValueError, KeyError):
        return False
    out = prepared_dir(recipe)
    complete = all(Path(f"{out / s.name}{ext}").exists()
                   for s in raw_sources(recipe) for ext in (".bin", ".idx"))
    return complete and recorded == fingerprint(recipe)


def run(recipe: Recipe, progress: bool = True, log=print) -> dict:
    """Prepare every raw source of the recipe; returns the stats (also written as
    ``stats.json`` and ``stats.md`` next to the datasets)."""

    sources = raw_sources(recipe)
    if not sources:
        raise PrepareError("the recipe has no raw sources (data.sources[*].path) to prepare")
    names = [s.name for s in recipe.data.sources]
    for name in {n for n in names if names.count(n) > 1}:
        raise PrepareError(f"data.sources: the name {name!r} is used twice")
    cfg = recipe.data.prepare
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    if cfg.fim.rate > 0 and any(s.uses_fim for s in sources):  # fail now, not mid-run
        fim_token_ids(tokenizer)
    key = fingerprint(recipe)
    out = prepared_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)       # incomplete until written again
    for stale in out.glob("*.tmp*"):               # left by a killed run
        stale.unlink()
    t0 = time.time()
    index_path, benchmarks = None, []
    if cfg.decontaminate:
        index_path, benchmarks = build_ngram_index(recipe, recipe.data_cache_dir / "decontam", log)
    cross = CrossDocumentFilter(cfg, benchmarks)
    all_stats = []
    with _terminate_as_interrupt() as signals:
        process, stop_workers = start_workers(recipe, index_path)
        try:
            for index, source in enumerate(recipe.data.sources):
                if source.path is None:
                    continue
                try:
                    stats = prepare_source(recipe, index, out, cross, process, progress,
                                           token_dtype(tokenizer.vocab_size), signals.check)
                except BrokenProcessPool:
                    raise PrepareError(f"data source {source.name!r}: a worker process died "
                                       "(killed, or out of memory?); nothing was marked "
                                       "prepared, run again") from None
                log(f"  {source.name}: {stats.documents:,} documents, {stats.tokens:,} tokens "
                    f"({stats.bytes_in / 1e6:.1f} MB at "
                    f"{stats.bytes_in / 1e6 / stats.seconds:.1f} MB/s)"
                    + (f"; removed {dict(stats.removed)}" if stats.removed else ""))
                all_stats.append(stats)
            signals.check()
        finally:
            stop_workers()
    report = {
        "recipe": recipe.name,
        "tokenizer": tokenizer.name,
        "workers": cfg.workers,
        "seconds": round(time.time() - t0, 2),
        "decontamination": ({"action": cfg.decontaminate.action, "ngram": cfg.decontaminate.ngram,
                             "benchmarks": benchmarks} if cfg.decontaminate else None),
        "sources": [s.to_dict() for s in all_stats],
    }
    (out / "stats.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "stats.md").write_text(markdown_report(report))
    (out / MANIFEST).write_text(json.dumps({
        "fingerprint": key, "format_version": FORMAT_VERSION,
        "sources": {s.name: str(out / s.name) for s in sources}}, indent=1) + "\n")
    return report


class _terminate_as_interrupt:
    """SIGTERM (a cluster's or a user's kill) stops the run at the next chunk: the stack
    unwinds so that temporary files are removed and no manifest is written (exit 143).

    The handler only records the signal and :meth:`check` raises. Raising from the handler
    itself is not safe: a signal that lands while Python runs a weakref callback or a
    ``__del__`` (e.g. importlib's module-lock cleanup) has its exception printed as
    "Exception ignored" and dropped, and the run would go on to finish."""

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGTERM)
        self.signum = 0

        def handler(signum, frame):
            self.signum = signum

        signal.signal(signal.SIGTERM, handler)
        return self

    def check(self) -> None:
        if self.signum:
            raise Stopped(f"stopped by signal {self.signum}: partial files removed, nothing "
                          "marked prepared; run again to prepare", self.signum)

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


def markdown_report(report: dict) -> str:
    rows = report["sources"]
    lines = [f"# Prepared data: {report['recipe']}", "",
             f"Tokenizer `{report['tokenizer']}`, {report['workers']} worker(s), "
             f"{report['seconds']} s.", "",
             "| source | language | weight | records | documents | tokens | MB in | removed |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for s in rows:
        removed = ", ".join(f"{k} {v}" for k, v in sorted(s["removed"].items())) or "-"
        lines.append(f"| {s['name']} | {s['language']} | {s['weight']} | {s['records']:,} | "
                     f"{s['documents']:,} | {s['tokens']:,} | {s['bytes_in'] / 1e6:.2f} | {removed} |")
    by_lang: Counter = Counter()
    for s in rows:
        by_lang.update(s["tokens_by_language"])
    total = sum(by_lang.values()) or 1
    lines += ["", "Tokens by language: " + ", ".join(
        f"{k} {v:,} ({100 * v / total:.1f}%)" for k, v in sorted(by_lang.items()))]
    pii = Counter()
    fim = Counter()
    for s in rows:
        pii.update(s["pii_masked"])
        fim.update(s["fim"])
    lines.append("PII masked: " + (", ".join(f"{k} {v}" for k, v in sorted(pii.items())) or "none"))
    if fim:
        lines.append("Fill-in-the-middle documents: " + ", ".join(f"{k} {v}" for k, v in sorted(fim.items())))
    d = report["decontamination"]
    if d:
        hits = Counter()
        for s in rows:
            hits.update(s["contaminated_documents_by_benchmark"])
        lines += ["", f"## Decontamination ({d['ngram']}-word n-grams, action: {d['action']})", ""]
        if hits:
            lines += ["| benchmark | training documents sharing an n-gram |", "|---|---:|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(hits.items())]
        else:
            lines.append(f"No training document shares an n-gram with the {len(d['benchmarks'])} "
                         "eval sets.")
    return "\n".join(lines) + "\n"


def ensure_prepared(recipe: Recipe, force: bool = False, progress: bool = False,
                    log=print, say_up_to_date: bool = True) -> dict[str, str]:
    """Prefixes of the recipe's raw sources, preparing them first if the prepared data
    is missing or stale (or ``force``). Every process (and ``hcx data prepare`` beside
    a starting ``hcx pretrain``) may call this at once: a file lock lets one prepare
    while the others wait and then find it done."""
    import fcntl

    out = prepared_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to finish preparing data in {out}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not is_prepared(recipe):
            log(f"preparing data into {out} (hcx data prepare)")
            run(recipe, progress=progress, log=log)
        elif say_up_to_date:
            log(f"prepared data in {out} is up to date")
    return {s.name: str(out / s.name) for s in raw_sources(recipe)}
