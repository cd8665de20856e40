"""Evaluation throughput: hcx's native evaluator against lm-evaluation-harness's ``hf``
model on the same weights, tasks and examples, in one run.

    python bench/eval_throughput.py MODEL_OR_RECIPE... [--tasks kobest_copa,kobest_boolq,...] \
        [--limit 200] [--batch 16] [--repeats 3] [--json out.json]

MODEL_OR_RECIPE: an hcx checkpoint directory (``runs/tiny/checkpoints``), a recipe YAML
(its checkpoints), or a Hugging Face directory. A checkpoint is exported to a temporary
Hugging Face directory with ``hcx export``'s code, so every row scores the same weights:

* ``hcx native, HcxModel``: ``hcx eval`` (hcx.evaluation.runner) on the checkpoint
  (megatron-core model, hcx's static KV cache);
* ``hcx native, HFModel``: ``hcx eval`` on the exported directory (transformers model);
* ``lm-eval hf``: lm-eval's own task YAMLs (``hcx eval --backend lm-eval``: the local data
  converted to the Hub schema) with lm-eval's ``HFLM`` on the exported directory;
* ``lm-eval + hcx model``: the same lm-eval tasks with hcx's adapter (``--model hcx``).

Every side gets the same ``--batch`` (for hcx: questions per forward pass; for lm-eval's
``hf``: requests, i.e. question-choice pairs, per forward pass, its usual meaning) and
float32 weights. Examples/s counts the task's examples over the whole evaluation call
(reading the data, building prompts, scoring, metrics); loading the model and building
lm-eval's task index are left out. Each implementation runs in a process of its own,
all started before any timing; the timed runs are interleaved (each repeat: each task
on each implementation in turn) after a small warm-up per task, and each row reports the
median of ``--repeats``. The accuracies of all rows must be equal; the script exits 1 if
any differs (the table with the per-task values is printed first).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import device_name  # noqa: E402
from hcx.cli import quiet_known_warnings  # noqa: E402

DEFAULT_TASKS = "kobest_copa,kobest_boolq,kobest_hellaswag,arc_easy"
NATIVE_HCX, NATIVE_HF, LMEVAL_HF, LMEVAL_HCX = ("hcx native, HcxModel", "hcx native, HFModel",
                                                 "lm-eval hf", "lm-eval + hcx model")


def quiet(fn, *args, **kwargs):
    """Run without progress bars and logging chatter on stdout/stderr."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def resolve_model(arg: str) -> tuple[Path | None, Path | None]:
    """``(hcx checkpoint or None, HF directory or None)``."""
    p = Path(arg)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        from hcx.config import load_recipe

        p = load_recipe(str(p), []).checkpoint_dir
        if not p.exists():
            raise SystemExit(f"{arg}: no checkpoint at {p} (train it first: hcx pretrain {arg})")
    if (p / "config.json").is_file():
        return None, p
    if not p.exists():
        raise SystemExit(f"{arg}: no such checkpoint or model directory")
    return p, None


def native_runner(model, task_names: list[str], limit: int, out: Path):
    from hcx.evaluation.runner import evaluate
    from hcx.evaluation.tasks import resolve_tasks

    tasks = {t.name: t for t in resolve_tasks(task_names)}

    def run(name: str, n: int | None = None, tag: str = "run"):
        d = Path(tempfile.mkdtemp(dir=out, prefix=f"{tag}-"))  # fresh: the runner resumes otherwise
        scores = quiet(evaluate, model, [tasks[name]], d, limit=n or limit, log=lambda *a: None)
        e = scores["tasks"][name]
        return {m: v["value"] for m, v in e["metrics"].items()}, e["n"]
    return run


def lm_eval_runner(lm, task_names: list[str], limit: int, out: Path):
    from lm_eval.tasks import TaskManager

    from hcx.evaluation.lm_eval.backend import evaluate_tasks, prepare, resolve

    selected = {t.name: t for t in resolve(task_names)}
    include = quiet(prepare, list(selected.values()), out / "lm_eval")
    manager = quiet(TaskManager, include_path=str(include))

    def run(name: str, n: int | None = None, tag: str = "run"):
        res = quiet(evaluate_tasks, lm, manager, [name], n or limit, None)
        metrics = {k.split(",")[0]: float(v) for k, v in res["results"][name].items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        return metrics, int(res["n-samples"][name]["effective"])
    return run


IMPLS = (NATIVE_HCX, NATIVE_HF, LMEVAL_HF, LMEVAL_HCX)


def worker(impl: str, ckpt: str | None, hf_dir: str, tasks: list[str], limit: int, batch: int,
           work: Path) -> None:
    """One implementation, in its own process (hcx's CPU shim for megatron,
    hcx.engine.cpu_compat, a torch function mode, is active only in the processes that open an
    hcx checkpoint, so it never slows the Hugging Face rows). Prints "ready", then
    answers each task name read from stdin with one timed run (a JSON line); a task's
    first request also runs a 4-example warm-up."""
    from hcx.evaluation.lm_eval.backend import TASKS, make_lm
    from hcx.evaluation.models import Budget, open_model

    model = None
    if impl in (NATIVE_HCX, LMEVAL_HCX):
        model = quiet(open_model, ckpt, budget=Budget(batch_size=batch), log=lambda *a: None)
    elif impl == NATIVE_HF:
        model = quiet(open_model, hf_dir, budget=Budget(batch_size=batch))
    if impl in (NATIVE_HCX, NATIVE_HF):
        run = native_runner(model, tasks, limit, work)
    elif impl == LMEVAL_HF:
        run = lm_eval_runner(quiet(make_lm, hf_dir, "hf", batch_size=batch), tasks, limit, work)
    else:
        run = lm_eval_runner(quiet(make_lm, model, "hcx", batch_size=batch), tasks, limit, work)
    warm: set[str] = set()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            task = line.strip()
            if task not in warm:
                quiet(run, task, 4, "warmup")
                warm.add(task)
            t0 = time.perf_counter()
            metrics, n = run(task)
            seconds = time.perf_counter() - t0
            print(json.dumps({"task": task, "impl": impl, "n": n, "seconds": seconds,
                              "primary": TASKS[task].primary, "metrics": metrics}), flush=True)
    finally:
        if model is not None:
            model.close()


def bench_model(arg: str, tasks: list[str], limit: int, batch: int, repeats: int, work: Path) -> dict:
    """Every implementation in a worker process of its own, all started first; then
    each repeat runs each task on each implementation in turn (interleaved, so that a
    busy moment of the machine does not land on one implementation only)."""
    from hcx.interop.hf import export_hf

    ckpt, hf_dir = resolve_model(arg)
    if ckpt is not None:
        hf_dir = quiet(export_hf, ckpt, work / "hf", log=lambda *a: None)
    impls = IMPLS if ckpt is not None else (NATIVE_HF, LMEVAL_HF)
    workers = {}
    try:
        for impl in impls:
            cmd = [sys.executable, __file__, "--worker", impl, "--hf-dir", str(hf_dir),
                   "--tasks", ",".join(tasks), "--limit", str(limit), "--batch", str(batch),
                   "--work", str(work)] + (["--checkpoint", str(ckpt)] if ckpt else [])
            w = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, bufsize=1)
            workers[impl] = w
            if w.stdout.readline().strip() != "ready":
                raise SystemExit(f"{impl} failed to start:\n{w.stderr.read()[-6000:]}")
        runs: dict[tuple[str, str], list[dict]] = {}
        for r in range(repeats):
            for task in tasks:
                for impl, w in workers.items():
                    w.stdin.write(task + "\n")
                    w.stdin.flush()
                    line = w.stdout.readline()
                    if not line:
                        raise SystemExit(f"{impl} failed on {task}:\n{w.stderr.read()[-6000:]}")
                    row = json.loads(line)
                    runs.setdefault((task, impl), []).append(row)
                    print(f"  [{r + 1}/{repeats}] {task:18} {impl:22} {row['n']:5d} ex "
                          f"{row['seconds']:7.2f}s {row['n'] / row['seconds']:8.1f} ex/s "
                          f"{row['primary']} {row['metrics'].get(row['primary'], float('nan')):.4f}",
                          flush=True)
    finally:
        for w in workers.values():
            if w.stdin and not w.stdin.closed:
                w.stdin.close()
        for w in workers.values():
            w.wait(timeout=120)
    rows = []
    for (task, impl), got in runs.items():
        seconds = statistics.median(g["seconds"] for g in got)
        rows.append({**got[0], "seconds": seconds, "examples_per_s": got[0]["n"] / seconds,
                     "all_seconds": [g["seconds"] for g in got],
                     "same_scores_each_repeat": all(g["metrics"] == got[0]["metrics"] for g in got)})
    return {"model": arg, "checkpoint": str(ckpt) if ckpt else None, "rows": rows}


def report(result: dict, args) -> bool:
    """Print the Markdown table; True if every implementation's scores agree."""
    rows = result["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["task"], r["impl"]): r for r in rows}
    print(f"\n{result['device']} | torch {result['torch']} | {result['model']} | float32 | "
          f"batch {args.batch}, limit {args.limit}, {result['date']}\n")
    print("| task | n | " + " | ".join(f"{i} ex/s" for i in impls)
          + " | hcx native / lm-eval hf | scores | agree |")
    print("|---|---:|" + "---:|" * len(impls) + "---:|---|---|")
    ok_all = True
    for t in tasks:
        rs = [by[(t, i)] for i in impls]
        keys = sorted({"acc", "acc_norm"} & set.intersection(*(set(r["metrics"]) for r in rs)))
        agree = all(len({r["metrics"][k] for r in rs}) == 1 for k in keys)
        ok_all &= agree
        best_native = by[(t, NATIVE_HCX)] if (t, NATIVE_HCX) in by else by[(t, NATIVE_HF)]
        speed = best_native["examples_per_s"] / by[(t, LMEVAL_HF)]["examples_per_s"]
        accs = ", ".join(f"{k} {rs[0]['metrics'][k]:.4f}" for k in keys) if agree else \
            "; ".join(f"{r['impl']}: " + ", ".join(f"{k} {r['metrics'][k]:.4f}" for k in keys) for r in rs)
        print(f"| {t} | {rs[0]['n']} | " + " | ".join(f"{r['examples_per_s']:,.1f}" for r in rs)
              + f" | {speed:.2f}x | {accs} | {'yes' if agree else 'NO'} |")
    total = {i: sum(by[(t, i)]["n"] for t in tasks) / sum(by[(t, i)]["seconds"] for t in tasks)
             for i in impls}
    native = total.get(NATIVE_HCX, total[NATIVE_HF])
    print(f"| all tasks | {sum(by[(t, impls[0])]['n'] for t in tasks)} | "
          + " | ".join(f"{total[i]:,.1f}" for i in impls)
          + f" | {native / total[LMEVAL_HF]:.2f}x | | {'yes' if ok_all else 'NO'} |")
    result["examples_per_s_all_tasks"] = total
    return ok_all


def main() -> int:
    quiet_known_warnings()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="MODEL_OR_RECIPE")
    ap.add_argument("--tasks", default=DEFAULT_TASKS,
                    help=f"comma-separated, tasks both backends have (default {DEFAULT_TASKS})")
    ap.add_argument("--limit", type=int, default=200, help="examples per task")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(["-"] + sys.argv[1:] if "--worker" in sys.argv else None)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.worker:
        work = Path(tempfile.mkdtemp(dir=args.work, prefix="worker-"))
        worker(args.worker, args.checkpoint, args.hf_dir, tasks, args.limit, args.batch, work)
        return 0

    results, ok = [], True
    for arg in args.models:
        print(f"{arg}:", flush=True)
        with tempfile.TemporaryDirectory(prefix="hcx-eval-bench-") as work:
            res = bench_model(arg, tasks, args.limit, args.batch, args.repeats, Path(work))
        res.update(date=date.today().isoformat(), device=device_name(), torch=torch.__version__,
                   batch=args.batch, limit=args.limit, repeats=args.repeats)
        ok &= report(res, args)
        results.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not ok:
        print("\nscores differ between implementations", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
