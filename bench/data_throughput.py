"""Data pipeline throughput: raw SentencePiece, Hugging Face tokenizers and
``hcx data prepare``, in one run on the same corpus.

    .venv/bin/python bench/data_throughput.py [--mb N] [--repeat N] [--one-source] [--ray]
        [--command] [--paired] [--baseline CHECKOUT] [--json out.json]

Corpus: the Korean and English JSONL sources ``ko_legalize_kr_laws``,
``ko_nsmc_reviews`` and ``en_sotu_addresses`` under ``data://train/pretrain/``
(about 31 MB of text). ``--mb N`` keeps the first ~N MB, split over the three in
proportion to their size. Every method reads the same files (links to, or cuts of,
the sources in one temporary directory).

Methods, all with the shipped tokenizer ``tokenizer/hcx-ko-en-32k`` (the
SentencePiece ``tokenizer.model`` and its identical Hugging Face ``tokenizer.json``):

* SentencePiece ``sp.encode(text)`` per document, one process, one thread: the
  baseline every ratio is taken against; also ``sp.encode(list, num_threads=1)``
  and ``num_threads=<cores>`` over 1 MB batches.
* Hugging Face ``tokenizers`` ``encode_batch(texts, add_special_tokens=False)`` over
  1 MB batches, in a fresh subprocess: once with its default Rayon thread pool (all
  cores) and once with ``RAYON_NUM_THREADS=1`` (one thread, the per-core comparison).
* ``hcx.data.prepare.run`` (what ``hcx data prepare`` calls) with ``data.prepare.workers``
  1 and 2 on the local executor, and with ``--ray`` 2 workers on the Ray executor (a
  local Ray cluster of 2 CPUs, started once before the timed runs), from a recipe that
  inherits ``recipes/tiny.yaml`` with these sources and no decontamination, in two
  configurations: ``full`` (NFC/control characters, filters, PII masking, exact +
  MinHash dedup, tokenize, write ``.bin/.idx``) and ``tokenize-only`` (``dedup.exact=false
  dedup.near=false pii=false``; parsing, normalization and filters remain). Each run gets
  a fresh output directory; the whole ``run`` call is timed: planning the tasks, every
  datatrove stage (with 2 workers, process start-up and tokenizer loading in each), and
  concatenating the shards into one dataset per source. One small untimed run first pays
  the parent's one-off imports. ``--one-source`` adds rows that prepare the same files as
  a single source (``language: any``: no language filter, language detected per document).

``--command`` times what a user runs, ``python -m hcx data prepare RECIPE`` in a fresh
process per run (interpreter start, imports, worker start-up, the whole run), 1 and 2
workers, both configurations; ``--baseline CHECKOUT`` times another hcx checkout's
command on the same recipes, alternating with this one run by run (for example a
``git worktree add ../hcx-prev <commit>`` of the pipeline before).

``--paired --baseline CHECKOUT`` compares ``hcx.data.prepare.run`` in-process with the
other checkout's: each checkout runs in its own long-lived interpreter, warmed up once
like the in-process rows, and the two take turns run by run (which one goes first
alternates), so that a machine whose speed drifts by 10-20% over minutes is the same
for both halves of a pair; the speed ratio is the median over the pairs.

MB/s everywhere is MB (10^6 bytes) of the UTF-8 text of the documents' ``text``
field divided by wall-clock seconds, so all rows share one numerator. The JSON also
keeps prepare's own figure (``stats.json``: JSONL file bytes over the sum of
per-source seconds, which leaves out recipe loading and the final stats files).
Medians over ``--repeat`` runs of each method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hcx.cli import quiet_known_warnings  # noqa: E402
from hcx.paths import resolve  # noqa: E402

TOKENIZER_DIR = ROOT / "tokenizer" / "hcx-ko-en-32k"
BASE_RECIPE = ROOT / "recipes" / "tiny.yaml"
SOURCES = [  # name, language, path
    ("ko_laws", "ko", "data://train/pretrain/ko_legalize_kr_laws/train.jsonl"),
    ("ko_nsmc", "ko", "data://train/pretrain/ko_nsmc_reviews/train.jsonl"),
    ("en_sotu", "en", "data://train/pretrain/en_sotu_addresses/train.jsonl"),
]
BATCH_BYTES = 1 << 20  # batch size for the batch encoders (prepare's CHUNK_BYTES)
NEAR_LINEAR = 1.8      # 2-worker / 1-worker speed-up counted as "near-linear" (90%)


# --- the corpus -------------------------------------------------------------------------------


@dataclass
class Source:
    name: str
    language: str
    path: Path            # what every method reads (in the temporary corpus directory)
    origin: Path
    file_bytes: int = 0
    text_bytes: int = 0
    documents: int = 0


def read_texts(path: Path) -> list[str]:
    with path.open("rb") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def corpus(mb: float | None, tmp: Path) -> list[Source]:
    """The benchmark sources as ``tmp/corpus/<name>.jsonl``: links to the files, or
    with ``mb`` their first whole lines up to their share of ``mb`` MB."""
    (tmp / "corpus").mkdir(parents=True)
    sources = [Source(name, lang, tmp / "corpus" / f"{name}.jsonl", resolve(path))
               for name, lang, path in SOURCES]
    total = sum(s.origin.stat().st_size for s in sources)
    for s in sources:
        if not mb:
            s.path.symlink_to(s.origin.resolve())
            continue
        budget = mb * 1e6 * s.origin.stat().st_size / total
        with s.origin.open("rb") as src, s.path.open("wb") as dst:
            size = 0
            for line in src:
                if size >= budget:
                    break
                dst.write(line)
                size += len(line)
    for s in sources:
        texts = read_texts(s.path)
        s.file_bytes = s.path.stat().st_size
        s.text_bytes = sum(len(t.encode("utf-8")) for t in texts)
        s.documents = len(texts)
    return sources


def batches(texts: list[str], max_bytes: int = BATCH_BYTES) -> list[list[str]]:
    out, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t.encode("utf-8"))
        if size >= max_bytes:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


# --- raw encoders -----------------------------------------------------------------------------


def timed(fn, repeat: int) -> dict:
    """Median seconds of ``fn()`` over ``repeat`` calls, all of them, and the result
    of the last call (a token count)."""
    times, result = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "all_seconds": times, "tokens": result}


def bench_sentencepiece(texts: list[str], repeat: int) -> list[dict]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    chunks = batches(texts)
    cores = os.cpu_count() or 1

    def loop():
        return sum(len(sp.encode(t)) for t in texts)

    def batch(threads):
        return lambda: sum(len(ids) for b in chunks for ids in sp.encode(b, num_threads=threads))

    rows = []
    for method, threads, fn in [("SentencePiece `encode(text)` per document", 1, loop),
                                ("SentencePiece `encode(list, num_threads=1)`", 1, batch(1)),
                                (f"SentencePiece `encode(list, num_threads={cores})`", cores,
                                 batch(cores))]:
        rows.append({"method": method, "kind": "sentencepiece", "parallel": threads,
                     **timed(fn, repeat)})
    return rows


def hf_child(paths: list[str], repeat: int) -> None:
    """Runs in a subprocess (so Rayon's pool size is fixed by its environment)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    chunks = batches([t for p in paths for t in read_texts(Path(p))])

    def run():
        return sum(len(e.ids) for b in chunks
                   for e in tok.encode_batch(b, add_special_tokens=False))

    print(json.dumps(timed(run, repeat)))


def bench_hf(sources: list[Source], repeat: int) -> list[dict]:
    rows = []
    cores = os.cpu_count() or 1
    for threads in (None, 1):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS", "TOKENIZERS_PARALLELISM")}
        if threads is not None:
            env["RAYON_NUM_THREADS"] = str(threads)
            env["TOKENIZERS_PARALLELISM"] = "false"
        cmd = [sys.executable, __file__, "--hf-child", "--repeat", str(repeat),
               *[str(s.path) for s in sources]]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        label = ("HF tokenizers `encode_batch`, default Rayon pool (all cores)" if threads is None
                 else "HF tokenizers `encode_batch`, `RAYON_NUM_THREADS=1`")
        rows.append({"method": label, "kind": "hf", "parallel": threads or cores, **result})
    return rows


# --- hcx data prepare -------------------------------------------------------------------------


CONFIGS = {
    "full": {},
    "tokenize-only": {"dedup": {"exact": False, "near": False}, "pii": False},
}


def prepare_recipe(sources: list[Source], workers: int, config: str, out: Path,
                   one_source: bool = False, executor: str = "local", root: Path = ROOT,
                   load: bool = True):
    """The benchmark recipe in ``out/recipe.yaml`` (loaded unless ``load`` is false);
    ``root``: the hcx checkout whose ``recipes/tiny.yaml`` it inherits. The local
    executor is the default and is not written, so that the recipe also means the same
    to a checkout from before the executors (``--baseline``)."""
    import yaml

    from hcx.config import load_recipe

    if one_source:  # the corpus directory as one source
        entries = [{"name": "all", "language": "any", "path": str(sources[0].path.parent)}]
    else:
        entries = [{"name": s.name, "language": s.language, "path": str(s.path)} for s in sources]

    prepare = {"workers": workers, "decontaminate": None, "output_dir": str(out / "prepared"),
               **({"executor": {"kind": executor}} if executor != "local" else {}),
               **CONFIGS[config]}
    data = {
        "base": str(root / BASE_RECIPE.relative_to(ROOT)),
        "output_dir": str(out),
        "data": {
            "tokenizer": {"kind": "sentencepiece", "path": str(TOKENIZER_DIR / "tokenizer.model")},
            "sources": entries,
            "prepare": prepare,
        },
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_recipe(path) if load else path


def bench_command(sources: list[Source], tmp: Path, repeat: int,
                  baseline: Path | None) -> list[dict]:
    """``python -m hcx data prepare RECIPE`` as a user runs it, in a fresh process each
    time: interpreter start, imports, worker start-up and the whole run. With
    ``baseline`` (another hcx checkout) its command runs on the same corpus and settings,
    alternating with this checkout's run by run, so both see the same machine."""
    checkouts = [("this checkout", ROOT)] + ([("baseline", baseline)] if baseline else [])
    rows = []
    for config in CONFIGS:
        for workers in (1, 2):
            times: dict[str, list[float]] = {name: [] for name, _ in checkouts}
            for i in range(repeat):
                for name, root in checkouts:
                    out = tmp / f"command-{name.replace(' ', '-')}-{config}-{workers}w-{i}"
                    out.mkdir(parents=True)
                    recipe = prepare_recipe(sources, workers, config, out, root=root, load=False)
                    env = {**os.environ, "PYTHONPATH": str(root)}
                    t0 = time.perf_counter()
                    done = subprocess.run([sys.executable, "-m", "hcx", "data", "prepare",
                                           str(recipe)], cwd=root, env=env,
                                          capture_output=True, text=True)
                    times[name].append(time.perf_counter() - t0)
                    if done.returncode:
                        raise SystemExit(f"{name} ({root}): hcx data prepare failed:\n"
                                         + done.stderr[-2000:])
            rows += checkout_rows("command", f"`hcx data prepare` command, {config}", config,
                                  workers, checkouts, times)
    return rows


def checkout_rows(kind: str, method: str, config: str, workers: int,
                  checkouts: list[tuple[str, Path]], times: dict[str, list[float]]) -> list[dict]:
    """One row per checkout (``kind`` for this one, ``kind-baseline`` for the other) of
    runs timed side by side: the median seconds and every run."""
    rows = []
    for name, root in checkouts:
        this = name == "this checkout"
        rows.append({
            "method": method + ("" if this else f" (baseline: {root})"),
            "kind": kind if this else f"{kind}-baseline",
            "config": config, "layout": "sources", "executor": "local",
            "parallel": workers, "seconds": statistics.median(times[name]),
            "all_seconds": times[name], "tokens": None, "checkout": str(root),
        })
    return rows


# Runs in a long-lived interpreter of one checkout (``cwd`` and ``PYTHONPATH`` = the
# checkout): reads recipe paths on stdin, runs each in-process, prints its seconds.
PAIRED_SERVER = """
import json, sys, time
from hcx.config import load_recipe
from hcx.data.prepare import run
for line in sys.stdin:
    recipe = load_recipe(line.strip())
    t0 = time.perf_counter()
    run(recipe, progress=False, log=lambda *a: None)
    print(json.dumps(time.perf_counter() - t0), flush=True)
"""


def bench_paired(sources: list[Source], tmp: Path, repeat: int, baseline: Path) -> list[dict]:
    """``hcx.data.prepare.run`` of this checkout and of ``baseline``, each in its own
    long-lived interpreter (warmed up once, as :func:`bench_prepare`'s parent), the two
    taking turns run by run, the first of each pair alternating: on a machine whose speed
    drifts by 10-20% over minutes, only runs seconds apart compare. One run at a time."""
    checkouts = [("this checkout", ROOT), ("baseline", baseline)]
    servers = {}
    for name, root in checkouts:
        servers[name] = subprocess.Popen(
            [sys.executable, "-c", PAIRED_SERVER], cwd=root, text=True,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def timed_run(name: str, recipe: Path) -> float:
        server = servers[name]
        server.stdin.write(f"{recipe}\n")
        server.stdin.flush()
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"{name}: the paired prepare run failed (rerun it alone to see why)")
        return json.loads(line)

    rows = []
    try:
        warm = tmp / "paired-warmup"
        small = corpus(0.3, warm)
        for name, root in checkouts:
            out = warm / name.replace(" ", "-")
            out.mkdir(parents=True)
            timed_run(name, prepare_recipe(small, 1, "full", out, root=root, load=False))
        for config in CONFIGS:
            for workers in (1, 2):
                times: dict[str, list[float]] = {name: [] for name, _ in checkouts}
                for i in range(repeat):
                    for name, root in checkouts[::1 if i % 2 == 0 else -1]:
                        out = tmp / f"paired-{name.replace(' ', '-')}-{config}-{workers}w-{i}"
                        out.mkdir(parents=True)
                        recipe = prepare_recipe(sources, workers, config, out, root=root,
                                                load=False)
                        times[name].append(timed_run(name, recipe))
                ratios = [b / t for t, b in zip(times["this checkout"], times["baseline"])]
                pair = checkout_rows("paired", f"`hcx data prepare`, {config}, paired in-process",
                                     config, workers, checkouts, times)
                pair[0].update(speed_vs_baseline=statistics.median(ratios),
                               all_speed_vs_baseline=ratios)
                rows += pair
    finally:
        for server in servers.values():
            server.stdin.close()
            server.wait()
    return rows


def bench_prepare(sources: list[Source], tmp: Path, repeat: int, one_source: bool,
                  ray: bool = False) -> list[dict]:
    from hcx.data.prepare import run

    # Warm-up, untimed: one small single-process run pays the parent's one-off imports
    # (megatron's IndexedDatasetBuilder alone takes seconds) and lazy tables, which
    # would otherwise land on whichever configuration ran first.
    warm = tmp / "warmup"
    small = corpus(0.3, warm)
    run(prepare_recipe(small, 1, "full", warm), progress=False, log=lambda *a: None)

    rows = []
    layouts = ["sources", "one source"] if one_source else ["sources"]
    runs = [(layout, config, w, "local") for layout in layouts for config in CONFIGS for w in (1, 2)]
    if ray:
        runs += [("sources", config, 2, "ray") for config in CONFIGS]
    for layout, config, workers, executor in runs:
        if executor == "ray" and not ray_started():
            # One local Ray cluster of 2 CPUs for every Ray run, started untimed once the
            # local runs are done (its idle daemons take CPU from them); the executor
            # uses a connected driver as it is.
            import ray as ray_module

            ray_module.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        times, reports = [], []
        for i in range(repeat):
            out = tmp / f"prepare-{layout.replace(' ', '-')}-{config}-{workers}w-{executor}-{i}"
            out.mkdir(parents=True)
            recipe = prepare_recipe(sources, workers, config, out, layout == "one source", executor)
            t0 = time.perf_counter()
            report = run(recipe, progress=False, log=lambda *a: None)
            times.append(time.perf_counter() - t0)
            reports.append(report)
        k = times.index(statistics.median_low(times))
        report = reports[k]
        per_source = {s["name"]: {"seconds": s["seconds"], "bytes_in": s["bytes_in"],
                                  "documents": s["documents"], "records": s["records"],
                                  "removed": s["removed"], "mb_per_second": s["mb_per_second"]}
                      for s in report["sources"]}
        bytes_in = sum(s["bytes_in"] for s in report["sources"])
        src_seconds = sum(s["seconds"] for s in report["sources"])
        rows.append({
            "method": f"`hcx data prepare`, {config}"
                      + (", one source (`language: any`)" if layout == "one source" else "")
                      + (", Ray executor (local cluster)" if executor == "ray" else ""),
            "kind": "prepare" if executor == "local" else "prepare-ray", "config": config,
            "layout": layout, "executor": executor,
            "parallel": workers, "seconds": statistics.median(times), "all_seconds": times,
            "tokens": sum(s["tokens"] for s in report["sources"]),
            "documents": sum(s["documents"] for s in report["sources"]),
            "stats_mb_per_second": bytes_in / 1e6 / src_seconds, "sources": per_source,
        })
    if ray_started():
        import ray as ray_module

        ray_module.shutdown()  # before anything else is timed
    return rows


def ray_started() -> bool:
    """Whether this process is connected to Ray (without importing it when it isn't)."""
    module = sys.modules.get("ray")
    return bool(module and module.is_initialized())


# --- report -----------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import sentencepiece
    import tokenizers

    return {"python": platform.python_version(), "sentencepiece": sentencepiece.__version__,
            "tokenizers": tokenizers.__version__}


def verdicts(rows: list[dict], sp: float) -> list[str]:
    """The issue's three targets, per prepare configuration (``sp``: raw SP MB/s)."""
    hf = {r["parallel"]: r["mb_per_second"] for r in rows if r["kind"] == "hf"}
    lines = []
    for config in CONFIGS:
        p = {r["parallel"]: r for r in rows
             if r.get("config") == config and r["layout"] == "sources" and r["kind"] == "prepare"}
        per_worker = [p[w]["per_worker_vs_sp"] for w in (1, 2)]
        ok = min(per_worker) >= 0.8
        lines.append(f"{config}: per-worker >= 0.8x raw SP: {'meets' if ok else 'does not meet'} "
                     f"(1w {per_worker[0]:.2f}x, 2w {per_worker[1]:.2f}x of {sp:.2f} MB/s)")
        scale = p[2]["mb_per_second"] / p[1]["mb_per_second"]
        lines.append(f"{config}: near-linear scaling (2w/1w >= {NEAR_LINEAR}): "
                     f"{'meets' if scale >= NEAR_LINEAR else 'does not meet'} ({scale:.2f}x)")
        faster = all(p[w]["mb_per_second"] > hf[w] for w in (1, 2) if w in hf)
        lines.append(f"{config}: faster than HF at the same core count: "
                     f"{'meets' if faster else 'does not meet'} ("
                     + ", ".join(f"{w}w {p[w]['mb_per_second']:.2f} vs HF {w}t {hf[w]:.2f} MB/s"
                                 for w in (1, 2) if w in hf) + ")")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, help="cap the corpus at about N MB (default: all ~31 MB)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (median reported)")
    ap.add_argument("--skip-prepare", action="store_true")
    ap.add_argument("--ray", action="store_true",
                    help="also prepare with the Ray executor, 2 workers on a local Ray cluster")
    ap.add_argument("--command", action="store_true",
                    help="also time the whole `python -m hcx data prepare` command in a fresh "
                         "process (start-up and imports included), 1 and 2 workers")
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="with --command or --paired: time this other hcx checkout too, "
                         "alternating run by run (e.g. a `git worktree` of an older commit)")
    ap.add_argument("--paired", action="store_true",
                    help="with --baseline: time prepare in-process in two long-lived "
                         "interpreters (this checkout, the baseline) taking turns run by run")
    ap.add_argument("--one-source", action="store_true",
                    help="also prepare the corpus as one source (one worker pool)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paired and not args.baseline:
        ap.error("--paired needs --baseline CHECKOUT")
    if args.hf_child:
        hf_child(args.paths, args.repeat)
        return 0

    quiet_known_warnings()
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hcx-data-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sources = corpus(args.mb, tmp)
        texts = [t for s in sources for t in read_texts(s.path)]
        text_mb = sum(s.text_bytes for s in sources) / 1e6
        rows = bench_sentencepiece(texts, args.repeat)
        del texts
        rows += bench_hf(sources, args.repeat)
        if not args.skip_prepare:
            rows += bench_prepare(sources, tmp, args.repeat, args.one_source, args.ray)
        if args.command:
            rows += bench_command(sources, tmp, args.repeat, args.baseline)
        if args.paired:
            rows += bench_paired(sources, tmp, args.repeat, args.baseline)

    sp_row = rows[0]
    sp = text_mb / sp_row["seconds"]
    for row in rows:
        row["mb_per_second"] = text_mb / row["seconds"]
        row["vs_sp"] = row["mb_per_second"] / sp
        if row["kind"].startswith(("prepare", "command", "paired")):
            row["per_worker_vs_sp"] = row["vs_sp"] / row["parallel"]
    same_ids = len({r["tokens"] for r in rows
                    if not r["kind"].startswith(("prepare", "command", "paired"))}) == 1
    result = {
        "date": date.today().isoformat(), "cpu": cpu_name(), "cores": cores,
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        **versions(), "tokenizer": str(TOKENIZER_DIR.relative_to(ROOT)),
        "corpus": [{"name": s.name, "language": s.language, "path": str(s.origin),
                    "documents": s.documents, "text_bytes": s.text_bytes,
                    "file_bytes": s.file_bytes} for s in sources],
        "text_mb": text_mb, "repeat": args.repeat, "load_average_1min_before": load_before,
        "raw_encoders_same_token_count": same_ids,
        "rows": rows,
    }

    print(f"{result['cpu']}, {cores} cores | {result['date']} | sentencepiece "
          f"{result['sentencepiece']}, tokenizers {result['tokenizers']}, "
          f"Python {result['python']} | load average before: {load_before:.2f}")
    print(f"corpus: {text_mb:.1f} MB of text, {sum(s.documents for s in sources):,} documents ("
          + ", ".join(f"{s.name} {s.text_bytes / 1e6:.1f} MB" for s in sources) + ")"
          + ("" if same_ids else "; WARNING: raw encoders disagree on the token count"))
    print()
    print("| method | workers / threads | seconds | MB/s | vs raw SP | per worker vs raw SP |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        per = f"{r['per_worker_vs_sp']:.2f}x" if "per_worker_vs_sp" in r else ""
        print(f"| {r['method']} | {r['parallel']} | {r['seconds']:.2f} | {r['mb_per_second']:.2f} "
              f"| {r['vs_sp']:.2f}x | {per} |")
    if not args.skip_prepare:
        print()
        result["scaling"] = {}
        for layout in dict.fromkeys(r["layout"] for r in rows if r["kind"] == "prepare"):
            for config in CONFIGS:
                p = {r["parallel"]: r for r in rows
                     if r.get("config") == config and r["layout"] == layout
                     and r["kind"] == "prepare"}
                scale = p[2]["mb_per_second"] / p[1]["mb_per_second"]
                result["scaling"][f"{config}, {layout}"] = scale
                secs = "; ".join(f"{w}w " + ", ".join(f"{n} {v['seconds']:.1f}s" for n, v in
                                                      p[w]["sources"].items()) for w in (1, 2))
                print(f"prepare {config} ({layout}): 2w/1w {scale:.2f}x; seconds per source "
                      f"(stats.json): {secs}")
        result["targets"] = verdicts(rows, sp)
        print()
        for line in result["targets"]:
            print("target", line)
    base = {(r["config"], r["parallel"]): r for r in rows if r["kind"] == "command-baseline"}
    if base:
        print()
        result["command_vs_baseline"] = {}
        for r in rows:
            if r["kind"] == "command" and (r["config"], r["parallel"]) in base:
                b = base[r["config"], r["parallel"]]
                speed = b["seconds"] / r["seconds"]
                result["command_vs_baseline"][f"{r['config']}, {r['parallel']}w"] = speed
                print(f"command {r['config']} {r['parallel']}w: {r['seconds']:.2f} s vs baseline "
                      f"{b['seconds']:.2f} s ({speed:.2f}x the baseline's speed)")
    paired = [r for r in rows if r["kind"] == "paired"]
    if paired:
        print()
        result["paired_vs_baseline"] = {}
        for r in paired:
            key = f"{r['config']}, {r['parallel']}w"
            result["paired_vs_baseline"][key] = r["speed_vs_baseline"]
            print(f"paired {key}: {r['seconds']:.2f} s vs baseline "
                  + next(f"{b['seconds']:.2f} s" for b in rows if b["kind"] == "paired-baseline"
                         and (b["config"], b["parallel"]) == (r["config"], r["parallel"]))
                  + f"; speed vs baseline, median of {len(r['all_speed_vs_baseline'])} pairs "
                  f"{r['speed_vs_baseline']:.2f}x (pairs: "
                  + ", ".join(f"{x:.2f}" for x in r["all_speed_vs_baseline"]) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
