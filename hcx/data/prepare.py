"""``hcx data prepare RECIPE``: raw corpora to megatron-core indexed datasets, as a
datatrove pipeline (:mod:`hcx.data.pipeline` has the stages, :mod:`hcx.data.executors`
where they run: local processes, SLURM job arrays or a Ray cluster).

Per document, in the tasks of stage 1 (:class:`DocumentProcessor`):
    parse (file:line on error) -> NFC + control characters -> filters -> PII masking
    -> fill-in-the-middle (code) -> tokenize + eod -> exact hash, MinHash signature and
    eval n-gram hits (on the document's tokens); contaminated documents dropped.
Across documents (stages 2-3, datatrove's MinHash buckets and clusters): exact and near
duplicates across all sources (earlier sources win). :func:`finish` then writes one
``<source>.bin/.idx`` per source: its shards' documents minus the duplicates. The tasks
do not depend on the number of workers, so neither does the output.

Nothing half-written is ever accepted: each dataset is written under a temporary name
and renamed (``.bin`` first, then ``.idx``, so an ``.idx`` always has its whole
``.bin``), and ``manifest.json``, which ``hcx pretrain`` checks, is written last.
A rerun after a crash skips the tasks datatrove marked complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from hcx.config import DataSource, PrepareConfig, Recipe
from hcx.errors import HcxError, Stopped
from hcx.paths import resolve
from hcx.data.documents import (  # noqa: F401 - re-exported: hcx.data.indexed, tests
    DocumentProcessor, PrepareError, fim_token_ids, token_dtype, word_start_table)
from hcx.data.sources import SourceError, expand, is_hub
from hcx.tokenizer.loading import load_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
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
    prep = recipe.data.prepare.model_dump(exclude={"workers", "output_dir", "skip_bad", "executor"})
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


def source_report(source: DataSource, stats) -> dict:
    """One source's row of ``stats.json`` (its tasks' :class:`ShardStats` merged)."""
    return {
        "name": source.name, "language": source.language, "weight": source.weight,
        "records": stats.records, "bytes_in": stats.bytes_in, "documents": stats.documents,
        "tokens": stats.tokens, "characters": stats.characters,
        "tokens_by_language": dict(stats.tokens_by_language),
        "removed": dict(stats.removed), "removed_examples": dict(stats.examples),
        "pii_masked": dict(stats.pii), "fim": dict(stats.fim),
        "contaminated_documents_by_benchmark": dict(stats.contamination),
        "seconds": round(stats.seconds, 2),
        "mb_per_second": round(stats.bytes_in / 1e6 / max(stats.seconds, 1e-9), 2),
    }


@dataclass
class Stages:
    """A run's datatrove executors, in order, with the work directory they share."""

    work: Path
    tasks: list                 # hcx.data.pipeline.Task, one per shard
    benchmarks: list[str]
    executors: list = field(default_factory=list)   # (name, executor)


def build_stages(recipe: Recipe, work: Path, benchmarks: list[str], index_path: str | None,
                 key: str) -> Stages:
    from hcx.data import pipeline as pl
    from hcx.data.executors import make_executor

    plan_file = work / "plan.json"
    if plan_file.exists():  # a rerun: the same tasks, so finished ones are skipped
        tasks = pl.load_plan(plan_file)
    else:
        tasks = pl.plan_tasks(recipe)
        pl.save_plan(tasks, plan_file)
    stages = Stages(work, tasks, benchmarks)
    args = (recipe, str(work), benchmarks, index_path)
    find = pl.FindDuplicates(*args)
    wanted = [("process", [pl.ProcessShard(*args)], len(tasks), pl.largest_first(recipe, tasks))]
    if find.tasks():
        wanted += [("duplicates", [find], find.tasks(), None),
                   ("clusters", [pl.ClusterDuplicates(*args)], 1, None)]
    if recipe.data.prepare.executor.kind == "slurm":
        wanted.append(("finish", [FinishStep(*args, key=key)], 1, None))
    previous = None
    for name, steps, count, order in wanted:
        previous = make_executor(recipe, name, steps, count, work / "logs" / name,
                                 depends=previous, order=order)
        stages.executors.append((name, previous))
    return stages


def _first_error(work: Path) -> str | None:
    errors = sorted((work / "errors").glob("*.json")) if (work / "errors").exists() else []
    return json.loads(errors[0].read_text())["message"] if errors else None


def run_stage(name: str, executor, work: Path) -> None:
    """Run one stage's tasks; a task's error (a bad record, named by file:line) becomes
    this run's error, and so does a task that did not complete (Ray retries and logs)."""
    try:
        executor.run()
    except Exception as e:  # noqa: BLE001 - any task failure, from any executor
        message = _first_error(work)
        if message:
            raise PrepareError(message) from None
        if isinstance(e, HcxError):
            raise
        raise PrepareError(f"hcx data prepare: a {name} task failed ({type(e).__name__}: {e}); "
                           f"its log is under {work / 'logs' / name / 'logs'}; finished tasks "
                           "are kept, run again to continue") from None
    message = _first_error(work)
    if message:
        raise PrepareError(message)
    left = executor.get_incomplete_ranks(skip_completed=True)
    if left:
        raise PrepareError(f"hcx data prepare: {len(left)} {name} task(s) did not complete "
                           f"(ranks {left[:10]}); logs: {work / 'logs' / name / 'logs'}; "
                           "finished tasks are kept, run again to continue")


def finish(recipe: Recipe, work: Path, tasks: list, benchmarks: list[str], key: str,
           seconds: float, log=print, check_stop: Callable[[], None] = lambda: None) -> dict:
    """Write each source's shards minus the duplicates into ``<source>.bin/.idx``, merge
    the tasks' statistics, write the reports and, last, the manifest; then drop the work directory."""
    from hcx.data.pipeline import write_source

    cfg = recipe.data.prepare
    out = prepared_dir(recipe)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    rows = []
    for index, source in enumerate(recipe.data.sources):
        if source.path is None:
            continue
        ranks = [r for r, t in enumerate(tasks) if t.source == index]
        stats = write_source(work, ranks, token_dtype(tokenizer.vocab_size), out / source.name,
                             benchmarks, check_stop)
        if stats.documents == 0:
            for ext in (".bin", ".idx"):
                Path(f"{out / source.name}{ext}").unlink(missing_ok=True)
            raise PrepareError(f"data source {source.name!r}: no documents left after "
                               f"{stats.records} records (removed: {dict(stats.removed)})")
        row = source_report(source, stats)
        log(f"  {source.name}: {stats.documents:,} documents, {stats.tokens:,} tokens "
            f"({stats.bytes_in / 1e6:.1f} MB in {len(ranks)} task(s))"
            + (f"; removed {dict(stats.removed)}" if stats.removed else ""))
        rows.append(row)
    report = {
        "recipe": recipe.name,
        "tokenizer": tokenizer.name,
        "workers": cfg.workers,
        "executor": cfg.executor.kind,
        "tasks": len(tasks),
        "seconds": round(seconds, 2),
        "decontamination": ({"action": cfg.decontaminate.action, "ngram": cfg.decontaminate.ngram,
                             "benchmarks": benchmarks} if cfg.decontaminate else None),
        "sources": rows,
    }
    check_stop()
    (out / "stats.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "stats.md").write_text(markdown_report(report))
    (out / MANIFEST).write_text(json.dumps({
        "fingerprint": key, "format_version": FORMAT_VERSION,
        "sources": {s.name: str(out / s.name) for s in raw_sources(recipe)}}, indent=1) + "\n")
    if cfg.executor.kind != "slurm":  # a SLURM job still logs into it after this returns
        shutil.rmtree(work, ignore_errors=True)
    return report


class FinishStep(PipelineStep):
    """SLURM's last job: :func:`finish`, once every stage's jobs are done."""

    type = "hcx"
    name = "finish: concatenate shards, reports, manifest"

    def __init__(self, recipe: Recipe, work: str, benchmarks: list[str], index_path, key: str):
        super().__init__()
        self.recipe, self.work, self.benchmarks, self.key = recipe, Path(work), benchmarks, key
        self.started = time.time()

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from hcx.data.pipeline import load_plan

        finish(self.recipe, self.work, load_plan(self.work / "plan.json"), self.benchmarks,
               self.key, time.time() - self.started)


def work_dir(recipe: Recipe, key: str) -> Path:
    from hcx.data.pipeline import work_key

    return prepared_dir(recipe) / "work" / work_key(key, recipe)


def run(recipe: Recipe, progress: bool = True, log=print) -> dict:
    """Prepare every raw source of the recipe; returns the stats (also written as
    ``stats.json`` and ``stats.md`` next to the datasets). With the SLURM executor the
    jobs are submitted and ``{"submitted": ...}`` is returned; the last job writes them."""
    from datatrove.utils.logging import logger

    from hcx.data.executors import start_local_workers

    sources = raw_sources(recipe)
    if not sources:
        raise PrepareError("the recipe has no raw sources (data.sources[*].path) to prepare")
    names = [s.name for s in recipe.data.sources]
    for name in {n for n in names if names.count(n) > 1}:
        raise PrepareError(f"data.sources: the name {name!r} is used twice")
    cfg = recipe.data.prepare
    start_local_workers(recipe)  # in the background, while the driver gets ready
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    if cfg.fim.rate > 0 and any(s.uses_fim for s in sources):  # fail now, not mid-run
        fim_token_ids(tokenizer)
    key = fingerprint(recipe)
    out = prepared_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)       # incomplete until written again
    for stale in out.glob("*.tmp*"):               # left by a killed run
        stale.unlink()
    work = work_dir(recipe, key)
    if (out / "work").exists():                    # other settings' unfinished runs
        for old in (out / "work").iterdir():
            if old != work:
                shutil.rmtree(old, ignore_errors=True)
    t0 = time.time()
    index_path, benchmarks = None, []
    if cfg.decontaminate:
        index_path, benchmarks = build_ngram_index(recipe, recipe.data_cache_dir / "decontam", log)
    # datatrove logs each task to <work>/logs/<stage>/logs/; the console gets hcx's lines.
    logger.remove()
    work.mkdir(parents=True, exist_ok=True)
    logger.add(str(work / "driver.log"), level="INFO")
    shutil.rmtree(work / "errors", ignore_errors=True)
    stages = build_stages(recipe, work, benchmarks, index_path, key)
    completions = work / "logs" / "process" / "completions"
    done = sum(1 for _ in completions.iterdir()) if completions.exists() else 0
    log(f"{len(stages.tasks)} task(s) on the {cfg.executor.kind} executor"
        + (f" ({cfg.workers} at a time)" if cfg.executor.kind != "slurm" else "")
        + (f"; {done} already processed by an earlier run" if done else "")
        + f"; work files and logs in {work}")
    if cfg.executor.kind == "slurm":
        name, last = stages.executors[-1]
        last.run()  # submits every stage, each depending on the one before
        log(f"submitted {len(stages.executors)} SLURM job arrays (last job {last.job_id}); "
            f"the prepared data appears in {out} when job {last.job_id} ends; logs in "
            f"{work / 'logs'}")
        return {"submitted": str(last.job_id), "work": str(work)}
    with _terminate_as_interrupt() as signals:
        signals.raise_now = True
        if cfg.executor.kind == "ray":
            from hcx.data.executors import ray_cluster

            context = ray_cluster(recipe, log)
        else:
            context = contextlib.nullcontext()
        with context:
            for name, executor in stages.executors:
                run_stage(name, executor, work)
        signals.raise_now = False
        signals.check()
        return finish(recipe, work, stages.tasks, benchmarks, key, time.time() - t0, log,
                      signals.check)

class _terminate_as_interrupt:
    """SIGTERM (a cluster's or a user's kill) stops the run: the stack unwinds so that
    temporary files are removed and no manifest is written (exit 143).

    While datatrove's executor runs tasks (``raise_now``), the handler raises at once: the
    main process only waits there, and raising tears the worker pool down (its tasks leave
    no completion marker, so a rerun redoes them). Elsewhere the handler only records the
    signal and :meth:`check` raises: a signal that lands while Python runs a weakref
    callback or a ``__del__`` has an exception raised from the handler printed as
    "Exception ignored" and dropped; the recorded signal is checked again before the
    manifest is written, so the run cannot go on to finish either way."""

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGTERM)
        self.signum = 0
        self.raise_now = False

        def handler(signum, frame):
            self.signum = signum
            if self.raise_now:
                self.raise_now = False
                self.check()

        signal.signal(signal.SIGTERM, handler)
        return self

    def check(self) -> None:
        if self.signum:
            raise Stopped(f"stopped by signal {self.signum}: partial files removed, nothing "
                          "marked prepared; run again to continue (finished tasks are kept)",
                          self.signum)

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
    # A POSIX record lock (lockf), not flock: processes forked by the executor do not
    # inherit it, so it is released the moment this process ends, however it ends.
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"waiting for another process to finish preparing data in {out}")
            fcntl.lockf(lock, fcntl.LOCK_EX)
        if force or not is_prepared(recipe):
            if recipe.data.prepare.executor.kind == "slurm":
                raise PrepareError(f"the prepared data in {out} is missing or out of date, and "
                                   "data.prepare.executor.kind is slurm: run 'hcx data prepare' "
                                   "(it submits the jobs) and start again when they end")
            log(f"preparing data into {out} (hcx data prepare)")
            run(recipe, progress=progress, log=log)
        elif say_up_to_date:
            log(f"prepared data in {out} is up to date")
    return {s.name: str(out / s.name) for s in raw_sources(recipe)}
