"""``hcx data prepare`` as datatrove pipeline steps: the plan of tasks and the stages.

A run is cut into tasks by :func:`plan_tasks` (pieces of about ``shard_mb`` of one source,
by default the corpus over 32; JSONL files are cut at line boundaries). The number of
tasks depends only on the data, never on how many workers run them, so the output is the
same for any executor and any number of workers. Three stages, each a datatrove executor
run over its tasks:

1. :class:`ProcessShard` (one task per shard): hcx's per-document steps (parse, clean,
   filter, PII, FIM, tokenize, decontaminate), the shard's documents as a megatron-core
   indexed dataset, and each document's exact hash and MinHash signature, written in
   datatrove's signature-bucket format.
2. :class:`FindDuplicates` (one task per LSH band, plus one for exact hashes):
   datatrove's :class:`MinhashDedupBuckets` merges the sorted bucket files of all shards
   into pairs of documents that share a band (or a hash).
3. :class:`ClusterDuplicates` (one task): datatrove's :class:`MinhashDedupCluster` turns
   the exact pairs into documents to remove; near pairs are then confirmed on the full
   signature (estimated Jaccard >= threshold, as hcx did before) and clustered the same way.

The driver (:mod:`hcx.data.prepare`; on SLURM, a last job) then writes each source's
``<source>.bin/.idx`` from its shards minus the removed documents (:func:`write_source`).
Every task writes under temporary names and renames; datatrove's completion marker,
written after a task returns, is what a rerun trusts, so a killed task is simply run again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from hcx.config import Recipe
from hcx.data.sources import (BadRecord, SourceError, detect_format, expand, hub_records,
                              is_hub, jsonl_pieces, parse_record, raw_records)

MAX_EXAMPLES = 5            # file:line examples kept per removal reason
NOT_A_HASH = 0xFFFFFFFE     # datatrove's bucket reader stops at 0xFFFFFFFF: values are capped


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Task:
    """One shard: pieces of files of one source, read in order."""

    source: int                                     # index into recipe.data.sources
    pieces: list[tuple[str, str, int, int, int]]    # (file, format, start, end, first_line)


AUTO_TASKS = 32                  # shard_mb unset: the corpus cut into about this many tasks,
AUTO_SHARD_MB = (2.0, 512.0)     # in pieces of at least 2 and at most 512 MB


def source_files(recipe: Recipe) -> list[list]:
    """Per raw source: its files with their formats (``[]`` for a Hub source)."""
    out = []
    for source in recipe.data.sources:
        if source.path is None or is_hub(source.path):
            out.append([])
            continue
        try:
            files = expand(source.path, source.include, source.exclude)
        except SourceError as e:
            from hcx.data.documents import PrepareError

            raise PrepareError(f"data source {source.name!r}: {e}") from None
        out.append([(f, source.format if source.format != "auto" else
                     detect_format(f, source.language)) for f in files])
    return out


def shard_bytes(recipe: Recipe, files: list[list]) -> int:
    """Input bytes per task: ``executor.shard_mb``, or when unset the corpus over
    :data:`AUTO_TASKS` within :data:`AUTO_SHARD_MB`, so that a small corpus still gives
    the workers several tasks each to balance, and a large one a few thousand at most.
    Depends on the data only, never on the workers."""
    mb = recipe.data.prepare.executor.shard_mb
    if mb is None:
        total = sum(f.stat().st_size for fs in files for f, _ in fs) / 1e6
        low, high = AUTO_SHARD_MB
        mb = min(max(total / AUTO_TASKS, low), high)
    return max(int(mb * 1e6), 1)


def plan_tasks(recipe: Recipe) -> list[Task]:
    """The shards of every raw source, in recipe order (earlier sources win duplicates)."""
    files = source_files(recipe)
    piece_bytes = shard_bytes(recipe, files)
    tasks: list[Task] = []
    for index, source in enumerate(recipe.data.sources):
        if source.path is None:
            continue
        if is_hub(source.path):  # streamed: one task (a Hub dataset cannot be cut offline)
            tasks.append(Task(index, [(source.path, "hub", 0, 0, 0)]))
            continue
        current: list = []
        size = 0
        for f, fmt in files[index]:
            if fmt == "jsonl":
                pieces = [(str(f), fmt, a, b, line) for a, b, line in jsonl_pieces(f, piece_bytes)]
            else:
                pieces = [(str(f), fmt, 0, 0, 1)]
            for piece in pieces:
                current.append(piece)
                size += piece_size(piece)
                if size >= piece_bytes:
                    tasks.append(Task(index, current))
                    current, size = [], 0
        if current:
            tasks.append(Task(index, current))
    return tasks


def piece_size(piece: tuple[str, str, int, int, int]) -> int:
    """The input bytes of one piece: its byte range of a JSONL file, else the whole file."""
    file, fmt, start, end, _ = piece
    return end - start if fmt == "jsonl" else os.path.getsize(file)


SAMPLE_BYTES = 1 << 16  # of each file, to estimate its text per byte


def text_per_byte(file: str, fmt: str, text_field: str = "text") -> float:
    """Characters of document text per input byte in the first ~64 KB of a file.

    A task's time follows the characters it tokenizes and filters, not its bytes: a byte
    of English is a character, a byte of Korean a third of one, and JSON written with
    ``ensure_ascii`` spends six bytes (``\\uAC00``) on each Hangul syllable. On the
    benchmark corpus a 2 MB English shard takes 2.5x as long as a 2 MB Korean one.
    Whole files (source code, mostly ASCII: not read twice), Parquet (compressed) and
    unreadable samples count 1.0: the order is a hint only."""
    if fmt not in ("jsonl", "text"):
        return 1.0
    chars = size = 0
    try:
        for record in raw_records(Path(file), fmt):
            try:
                chars += len(parse_record(record, text_field))
            except BadRecord:
                pass
            size += record.size
            if size >= SAMPLE_BYTES:
                break
    except (OSError, SourceError):
        return 1.0
    return chars / size if size else 1.0


def task_costs(recipe: Recipe, tasks: list[Task]) -> list[float]:
    """Each task's estimated work: its input bytes times its files' text per byte (a
    Hub source's single task, which cannot be measured offline, counts as the largest).
    Only the order the tasks start in depends on it, never the output."""
    per_byte: dict[str, float] = {}
    costs = []
    for task in tasks:
        if any(fmt == "hub" for _, fmt, *_ in task.pieces):
            costs.append(float("inf"))
            continue
        field = recipe.data.sources[task.source].text_field
        cost = 0.0
        for piece in task.pieces:
            file, fmt = piece[0], piece[1]
            if file not in per_byte:
                per_byte[file] = text_per_byte(file, fmt, field)
            cost += piece_size(piece) * per_byte[file]
        costs.append(cost)
    return costs


def largest_first(recipe: Recipe, tasks: list[Task]) -> list[int]:
    """The ranks of ``tasks`` by decreasing estimated work (:func:`task_costs`): started
    in this order, the last tasks to finish are small and the workers end together."""
    costs = task_costs(recipe, tasks)
    return sorted(range(len(tasks)), key=lambda rank: -costs[rank])


def save_plan(tasks: list[Task], path: Path) -> None:
    _write_json(path, [asdict(t) for t in tasks])


def load_plan(path: Path) -> list[Task]:
    return [Task(t["source"], [tuple(p) for p in t["pieces"]]) for t in json.loads(path.read_text())]


def task_records(recipe: Recipe, task: Task):
    source = recipe.data.sources[task.source]
    for file, fmt, start, end, first_line in task.pieces:
        if fmt == "hub":
            yield from hub_records(file[len("hf://"):], source.hub_config, source.hub_split)
        else:
            yield from raw_records(Path(file), fmt, start, end or None, first_line)


# --- small file helpers ----------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False))
    os.replace(tmp, path)


def _read_u32(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u4") if path.exists() else np.empty(0, dtype="<u4")


@dataclass
class ShardStats:
    """What one task counted; :meth:`merge` adds tasks of one source together."""

    records: int = 0
    bytes_in: int = 0
    documents: int = 0
    tokens: int = 0
    characters: int = 0
    tokens_by_language: Counter = field(default_factory=Counter)
    removed: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    pii: Counter = field(default_factory=Counter)
    fim: Counter = field(default_factory=Counter)
    contamination: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def drop(self, reason: str, where: str) -> None:
        self.removed[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(where)

    def merge(self, other: ShardStats) -> None:
        for name in ("records", "bytes_in", "documents", "tokens", "characters", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("tokens_by_language", "removed", "pii", "fim", "contamination"):
            getattr(self, name).update(getattr(other, name))
        for reason, examples in other.examples.items():
            room = MAX_EXAMPLES - len(self.examples[reason])
            self.examples[reason].extend(examples[:max(room, 0)])

    def to_json(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, obj: dict) -> ShardStats:
        s = cls(**{k: v for k, v in obj.items() if not isinstance(v, dict)})
        for name in ("tokens_by_language", "removed", "pii", "fim", "contamination"):
            setattr(s, name, Counter(obj.get(name, {})))
        s.examples = defaultdict(list, obj.get("examples", {}))
        return s


# --- the steps -------------------------------------------------------------------------------


class HcxStep(PipelineStep):
    """What every hcx step knows: the recipe and the run's work directory."""

    type = "hcx"

    def __init__(self, recipe: Recipe, work: str, benchmarks: list[str],
                 ngram_index: str | None = None):
        from hcx.data.corpus.minhash import optimal_bands_rows

        super().__init__()
        self.recipe, self.work = recipe, Path(work)
        self.benchmarks, self.ngram_index = benchmarks, ngram_index
        # Chosen here, in the driver, and carried to the tasks with the step: a search
        # over every (bands, rows) (0.03 s) that each worker of each stage would repeat.
        dedup = self.cfg.dedup
        self.bands_rows = optimal_bands_rows(dedup.threshold, dedup.num_perm)

    @property
    def cfg(self):
        return self.recipe.data.prepare

    def near_config(self):
        from datatrove.pipeline.dedup.minhash import MinhashConfig
        from datatrove.utils.hashing import HashConfig

        bands, rows = self.bands_rows
        return MinhashConfig(n_grams=self.cfg.dedup.ngram, num_buckets=bands, hashes_per_bucket=rows,
                             hash_config=HashConfig(precision=32, hash_fc="sha1"))

    @staticmethod
    def exact_config():
        from datatrove.pipeline.dedup.minhash import MinhashConfig
        from datatrove.utils.hashing import HashConfig

        return MinhashConfig(num_buckets=1, hashes_per_bucket=2,
                             hash_config=HashConfig(precision=32, hash_fc="sha1"))

    def plan(self) -> list[Task]:
        return load_plan(self.work / "plan.json")


def write_buckets(folder: Path, rank: int, bands: np.ndarray) -> None:
    """Signature bands ``(documents, buckets, hashes)`` as datatrove's stage 1 writes them:
    ``bucket_NNN/RRRRR.minhash.sig``, records of the hashes and the document index,
    sorted. Written under a temporary name outside the bucket folder, then renamed."""
    docs, buckets, hashes = bands.shape
    dtype = np.dtype([(f"field{i + 1}", "<u4") for i in range(hashes)] + [(f"field{hashes + 1}", "<u4")])
    for b in range(buckets):
        records = np.empty(docs, dtype=dtype)
        for i in range(hashes):
            records[f"field{i + 1}"] = np.minimum(bands[:, b, i], NOT_A_HASH)
        records[f"field{hashes + 1}"] = np.arange(docs, dtype=np.uint32)
        records.sort(order=dtype.names)
        final = folder / f"bucket_{b:03d}" / f"{rank:05d}.minhash.sig"
        tmp = folder / "tmp" / f"{b:03d}-{rank:05d}.{os.getpid()}"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        records.tofile(tmp)
        os.replace(tmp, final)


# Per process: the tokenizer, filters and eval n-gram index, built once (a worker runs many
# tasks; loading the eval index alone takes ~0.6 s).
_TOOLS: dict = {}


def run_tools(recipe: Recipe, ngram_index: str | None):
    from hcx.data.documents import RunTools

    key = (json.dumps(recipe.data.model_dump(), sort_keys=True, default=str), ngram_index)
    if key not in _TOOLS:
        _TOOLS.clear()
        _TOOLS[key] = RunTools.build(recipe, ngram_index)
    return _TOOLS[key]


class ProcessShard(HcxStep):
    """Stage 1: every record of a shard through hcx's per-document steps."""

    name = "process: parse, clean, filter, PII, FIM, tokenize, decontaminate, sign"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import time

        from hcx.data.documents import DocumentProcessor, PrepareError, chunked, token_dtype

        t0 = time.time()
        task = self.plan()[rank]
        source = self.recipe.data.sources[task.source]
        tools = run_tools(self.recipe, self.ngram_index)
        processor = DocumentProcessor(self.recipe, source, tools)
        drop_contaminated = bool(self.cfg.decontaminate) and self.cfg.decontaminate.action == "drop"
        stats = ShardStats()
        where, language, chars, hits = [], [], [], []
        hashes, signatures = [], []
        docs = self.work / "docs"
        docs.mkdir(parents=True, exist_ok=True)
        tmp = docs / f"{rank:05d}.tmp{os.getpid()}"
        builder = shard_writer(tmp, token_dtype(tools.tokenizer.vocab_size))
        try:
            for chunk in chunked(task_records(self.recipe, task)):
                result = processor(chunk)
                if result.bad is not None:
                    message = (f"data source {source.name!r}: {result.bad} (use --skip-bad to "
                               "count and skip bad records)")
                    _write_json(self.work / "errors" / f"{rank:05d}.json", {"message": message})
                    raise PrepareError(message)
                stats.records += result.records
                stats.bytes_in += result.bytes_in
                stats.merge(ShardStats(removed=result.removed, examples=result.examples,
                                       pii=result.pii, fim=result.fim))
                for i, tokens in enumerate(result.tokens):
                    labels = result.contaminated[i]
                    if labels and drop_contaminated:
                        stats.contamination.update(self.benchmarks[k] for k in labels)
                        stats.drop("contaminated", result.where[i])
                        continue
                    builder.write(tokens)
                    where.append(result.where[i])
                    language.append(result.language[i])
                    chars.append(result.chars[i])
                    hits.append(list(labels))
                    hashes.append(result.text_hash[i])
                    if result.signatures:
                        signatures.append(result.signatures[i])
            builder.close()
        except BaseException:
            for ext in (".bin", ".idx"):
                Path(f"{tmp}{ext}").unlink(missing_ok=True)
            raise
        self.stat_update("documents", value=len(where))
        n = len(where)
        if self.cfg.dedup.exact:
            h = np.asarray(hashes, dtype=np.uint64).reshape(n)
            pairs = np.stack([(h >> np.uint64(32)).astype(np.uint32),
                              (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)], axis=1)
            write_buckets(self.work / "exact" / "signatures", rank, pairs.reshape(n, 1, 2))
        if self.cfg.dedup.near:
            config = self.near_config()
            sig = np.asarray(signatures, dtype=np.uint32).reshape(n, self.cfg.dedup.num_perm)
            used = config.num_buckets * config.hashes_per_bucket
            write_buckets(self.work / "near" / "signatures", rank,
                          sig[:, :used].reshape(n, config.num_buckets, config.hashes_per_bucket))
            sig_path = self.work / "near" / "full" / f"{rank:05d}.npy"
            sig_path.parent.mkdir(parents=True, exist_ok=True)
            tmp_sig = sig_path.with_name(f"{rank:05d}.tmp{os.getpid()}.npy")
            np.save(tmp_sig, sig)
            os.replace(tmp_sig, sig_path)
        stats.seconds = time.time() - t0
        _write_json(self.work / "meta" / f"{rank:05d}.json",
                    {"stats": stats.to_json(), "where": where, "language": language,
                     "chars": chars, "hits": hits})
        for ext in (".bin", ".idx"):  # the documents last: the task's other files are whole
            os.replace(f"{tmp}{ext}", docs / f"{rank:05d}{ext}")


class FindDuplicates(HcxStep):
    """Stage 2: datatrove's MinHash bucket stage, one task per LSH band, and one more
    (the last) for the exact hashes, which are a one-band signature of their own."""

    name = "duplicates: pairs sharing a band (datatrove MinhashDedupBuckets)"

    def tasks(self) -> int:
        bands = self.near_config().num_buckets if self.cfg.dedup.near else 0
        return bands + (1 if self.cfg.dedup.exact else 0)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

        bands = self.near_config().num_buckets if self.cfg.dedup.near else 0
        if rank < bands:
            step = MinhashDedupBuckets(str(self.work / "near" / "signatures"),
                                       str(self.work / "near" / "pairs"), config=self.near_config())
            step.run(None, rank, bands)
        else:
            step = MinhashDedupBuckets(str(self.work / "exact" / "signatures"),
                                       str(self.work / "exact" / "pairs"), config=self.exact_config())
            step.run(None, 0, 1)


class ClusterDuplicates(HcxStep):
    """Stage 3 (one task): exact pairs -> clusters -> documents to remove, then near pairs
    (minus those touching an exact duplicate, and confirmed on the full signature) ->
    clusters -> documents to remove. Clustering is datatrove's MinhashDedupCluster: the
    union-find holds only documents that have a duplicate."""

    name = "clusters: duplicate pairs -> documents to remove (datatrove MinhashDedupCluster)"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datatrove.pipeline.dedup.minhash import MinhashDedupCluster

        exact_removed: set[tuple[int, int]] = set()
        if self.cfg.dedup.exact:
            MinhashDedupCluster(str(self.work / "exact" / "pairs"), str(self.work / "exact" / "remove"),
                                config=self.exact_config()).run(None, 0, 1)
            for f in sorted((self.work / "exact" / "remove").glob("*.remove")):
                exact_removed.update((int(f.stem), int(d)) for d in _read_u32(f))
        if self.cfg.dedup.near:
            self.confirm(exact_removed)
            MinhashDedupCluster(str(self.work / "near" / "confirmed"), str(self.work / "near" / "remove"),
                                config=self.near_config()).run(None, 0, 1)

    def confirm(self, exact_removed: set[tuple[int, int]]) -> None:
        """Keep the band-sharing pairs whose full signatures agree on >= threshold of their
        entries, between documents that are not exact duplicates (those are gone already).
        Signatures are read one at a time: memory grows with the pairs, not the corpus."""
        threshold = self.cfg.dedup.threshold
        files: dict[int, tuple[int, int]] = {}  # shard -> (file descriptor, data offset)
        width = 4 * self.cfg.dedup.num_perm

        def signature(shard: int, doc: int) -> np.ndarray:
            # Read, not memory-mapped: mapped pages would count in this process's RSS.
            if shard not in files:
                path = self.work / "near" / "full" / f"{shard:05d}.npy"
                with open(path, "rb") as f:
                    if np.lib.format.read_magic(f) == (1, 0):
                        np.lib.format.read_array_header_1_0(f)
                    else:
                        np.lib.format.read_array_header_2_0(f)
                    offset = f.tell()
                files[shard] = (os.open(path, os.O_RDONLY), offset)
            fd, offset = files[shard]
            return np.frombuffer(os.pread(fd, width, offset + doc * width), dtype="<u4")

        out = self.work / "near" / "confirmed"
        out.mkdir(parents=True, exist_ok=True)
        confirmed = 0
        for pairs_file in sorted((self.work / "near" / "pairs").glob("*.dups")):
            pairs = np.fromfile(pairs_file, dtype="<u4").reshape(-1, 4)
            keep = []
            for f1, d1, f2, d2 in pairs.tolist():
                if (f1, d1) in exact_removed or (f2, d2) in exact_removed:
                    continue
                a, b = signature(f1, d1), signature(f2, d2)
                if np.count_nonzero(a == b) / a.size >= threshold:
                    keep.append((f1, d1, f2, d2))
            confirmed += len(keep)
            tmp = out / f"{pairs_file.name}.tmp{os.getpid()}"
            np.asarray(keep, dtype="<u4").reshape(-1, 4).tofile(tmp)
            os.replace(tmp, out / pairs_file.name)
        for fd, _ in files.values():
            os.close(fd)
        self.stat_update("confirmed_pairs", value=confirmed)


def write_source(work: Path, ranks: list[int], dtype, final: Path, benchmarks: list[str],
                 check_stop=lambda: None) -> ShardStats:
    """A source's dataset ``final.bin/.idx``: its shards' documents in order, minus those
    stage 3 removed, and the source's statistics. The kept documents of a shard are
    copied as byte ranges (one per run of kept documents), under a temporary name; then
    ``.bin`` and ``.idx`` are renamed (an ``.idx`` always has its whole ``.bin``).
    Memory: one shard's metadata and 4 bytes per kept document of the source."""
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    size = np.dtype(dtype).itemsize
    stats = ShardStats()
    try:
        kept_lengths = []
        with open(f"{tmp}.bin", "wb") as out:
            for rank in ranks:
                check_stop()
                meta = json.loads((work / "meta" / f"{rank:05d}.json").read_text())
                stats.merge(ShardStats.from_json(meta["stats"]))
                lengths, pointers = read_index(work / "docs" / f"{rank:05d}.idx")
                keep = np.ones(len(lengths), dtype=bool)
                for reason, kind in (("exact_duplicate", "exact"), ("near_duplicate", "near")):
                    removed = _read_u32(work / kind / "remove" / f"{rank:06d}.remove")
                    removed = np.sort(removed[keep[removed]])  # removed once, counted once
                    for i in removed.tolist():
                        stats.drop(reason, meta["where"][i])
                    keep[removed] = False
                for i in np.flatnonzero(keep).tolist():
                    stats.characters += meta["chars"][i]
                    stats.tokens_by_language[meta["language"][i]] += int(lengths[i])
                    stats.contamination.update(benchmarks[k] for k in meta["hits"][i])  # "report"
                stats.documents += int(keep.sum())
                stats.tokens += int(lengths[keep].sum())
                kept_lengths.append(lengths[keep])
                copy_documents(work / "docs" / f"{rank:05d}.bin", out, keep, lengths,
                               pointers, size)
        write_index(Path(f"{tmp}.idx"), np.concatenate(kept_lengths) if kept_lengths else
                    np.empty(0, np.int32), dtype)
        check_stop()
        for ext in (".idx", ".bin"):
            Path(f"{final}{ext}").unlink(missing_ok=True)
        os.replace(f"{tmp}.bin", f"{final}.bin")
        os.replace(f"{tmp}.idx", f"{final}.idx")
    finally:
        for ext in (".bin", ".idx"):
            Path(f"{tmp}{ext}").unlink(missing_ok=True)
    return stats


def copy_documents(path: Path, out, keep: np.ndarray, lengths: np.ndarray,
                   pointers: np.ndarray, size: int) -> None:
    """Append the kept documents of the shard ``path`` to ``out``: each run of
    consecutive kept documents is one contiguous byte range."""
    if not keep.any():
        return
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
    with open(path, "rb") as f:
        for first, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
            start = int(pointers[first])
            left = int(pointers[end - 1]) + int(lengths[end - 1]) * size - start
            f.seek(start)
            while left > 0:
                block = f.read(min(left, 1 << 24))
                out.write(block)
                left -= len(block)


# --- megatron-core indexed datasets, without importing megatron (and torch) in tasks -----------

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def shard_writer(prefix: Path, dtype):
    """datatrove's megatron-format writer for ``prefix.bin/.idx``."""
    from datatrove.pipeline.tokens.megatron_tokenizer import MegatronTokenizedFile

    return MegatronTokenizedFile(str(prefix.parent), prefix.name,
                                 token_size=np.dtype(dtype).itemsize)


def read_index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Sequence lengths and byte offsets of a megatron-core ``.idx`` (one sequence per document)."""
    with open(path, "rb") as f:
        if f.read(9) != _INDEX_HEADER:
            raise ValueError(f"{path}: not a megatron-core index")
        f.read(9)  # version, dtype code
        count = np.frombuffer(f.read(8), "<u8")[0]
        f.read(8)  # document count
        lengths = np.frombuffer(f.read(4 * int(count)), "<i4")
        pointers = np.frombuffer(f.read(8 * int(count)), "<i8")
    return lengths, pointers


def write_index(path: Path, lengths: np.ndarray, dtype) -> None:
    """A megatron-core ``.idx`` for documents of these lengths, laid out back to back."""
    lengths = np.asarray(lengths, dtype="<i4")
    pointers = np.zeros(len(lengths), dtype="<i8")
    np.cumsum(lengths[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_INDEX_HEADER)
        f.write(np.array([1], "<u8").tobytes())
        f.write(np.array([_DTYPE_CODES[np.dtype(dtype)]], "<u1").tobytes())
        f.write(np.array([len(lengths), len(lengths) + 1], "<u8").tobytes())
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype="<i8").tobytes())


def work_key(fingerprint: str, recipe: Recipe) -> str:
    """The work directory of a run: what it prepares and how it is cut into tasks."""
    key = json.dumps([fingerprint, recipe.data.prepare.executor.shard_mb])
    return hashlib.sha1(key.encode()).hexdigest()[:12]

