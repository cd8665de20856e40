"""How fast evaluation runs in its modes, on one checkpoint and the same examples:

* ``in-process``: ``hcx eval CKPT`` (the baseline);
* ``--dp 2``: ``hcx eval CKPT --dp 2`` (two replicas, each running every other batch);
* ``endpoint``: ``hcx eval URL`` through ``hcx serve CKPT`` started by this script (HTTP on
  127.0.0.1, the endpoint client's --concurrency);
* ``MT-Bench``: ``hcx eval CKPT --tasks mt_bench --judge CKPT`` (answers plus judging,
  the same tiny model as judge), wall time only (a tiny judge's scores mean nothing).

    python bench/eval_modes.py CKPT [--tasks kobest_copa,arc_easy,gsm8k] [--limit 64] \
        [--max-new-tokens 32] [--mt-bench-limit 8] [--json out.json]

Examples/s count each task's examples over its evaluation call (``seconds`` in
scores.json: prompts, scoring, metrics), so model loading and server start are left out;
the command's wall time including them is printed beside. Every mode runs the same tasks
on the same examples with greedy decoding, and their scores must be equal: the script
exits 1 if any differs (the table is printed first). Runs are sequential, each in fresh
processes, in a fresh run directory (no resumed results, no request cache).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_throughput import device_name  # noqa: E402


def hcx_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hcx.cli", *args]


def timed_eval(model: str, out: Path, args: list[str]) -> dict:
    """One ``hcx eval`` run: its wall time and each task's (n, seconds, primary metrics)."""
    start = time.perf_counter()
    proc = subprocess.run(hcx_cmd("eval", model, "--out", str(out), *args), cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"hcx eval {model} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    tasks = json.loads((out / "scores.json").read_text())["tasks"]
    return {"wall": wall, "tasks": {name: {"n": e["n"], "seconds": e["seconds"],
                                           "metrics": {m: v["value"] for m, v in e["metrics"].items()}}
                                    for name, e in tasks.items()}}


class Server:
    """``hcx serve CKPT --port 0`` until the block ends (SIGTERM, waited for)."""

    def __init__(self, ckpt: str, max_batch: int):
        self.proc = subprocess.Popen(hcx_cmd("serve", ckpt, "--port", "0", "--max-batch",
                                             str(max_batch)), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def __enter__(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("serving "):
                return line.split(" on ")[-1].strip()
        raise SystemExit("hcx serve exited before it was ready")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--tasks", default="kobest_copa,arc_easy,gsm8k")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16,
                    help="in process: questions per pass; the server's --max-batch and the "
                         "client's --concurrency")
    ap.add_argument("--mt-bench-limit", type=int, default=8,
                    help="MT-Bench questions (two turns each, each turn judged); 0 skips it")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    common = ["--tasks", args.tasks, "--limit", str(args.limit), "--max-new-tokens",
              str(args.max_new_tokens)]
    local = [*common, "--batch-size", str(args.batch_size)]
    work = Path(tempfile.mkdtemp(prefix="hcx-bench-eval-"))
    rows = {"in-process": timed_eval(args.checkpoint, work / "native", local),
            "--dp 2": timed_eval(args.checkpoint, work / "dp2", [*local, "--dp", "2"])}
    with Server(args.checkpoint, args.batch_size) as url:  # the server batches as --batch-size
        rows["endpoint (hcx serve)"] = timed_eval(
            url, work / "endpoint", [*common, "--concurrency", str(args.batch_size)])
    mt = None
    if args.mt_bench_limit:
        mt = timed_eval(args.checkpoint, work / "mt_bench",
                        ["--tasks", "mt_bench", "--limit", str(args.mt_bench_limit),
                         "--max-new-tokens", str(args.max_new_tokens), "--judge", args.checkpoint])

    names = args.tasks.split(",")
    base = rows["in-process"]
    print(f"# Evaluation modes, {date.today()}, {device_name()}, {os.cpu_count()} cores")
    print(f"checkpoint {args.checkpoint}; --limit {args.limit}, --max-new-tokens "
          f"{args.max_new_tokens}, --batch-size {args.batch_size}\n")
    print("| mode | " + " | ".join(f"{n} ex/s" for n in names) + " | all ex/s | vs in-process | wall s |")
    print("|---|" + "---:|" * (len(names) + 3))
    same = True
    for mode, r in rows.items():
        n = sum(r["tasks"][t]["n"] for t in names)
        secs = sum(r["tasks"][t]["seconds"] for t in names)
        base_rate = sum(base["tasks"][t]["n"] for t in names) / sum(base["tasks"][t]["seconds"] for t in names)
        cells = [f"{r['tasks'][t]['n'] / max(r['tasks'][t]['seconds'], 1e-9):.1f}" for t in names]
        print(f"| {mode} | " + " | ".join(cells) + f" | {n / secs:.1f} | {n / secs / base_rate:.2f}x | {r['wall']:.1f} |")
        for t in names:
            if r["tasks"][t]["metrics"] != base["tasks"][t]["metrics"]:
                same = False
                print(f"  {mode}: {t} scores differ: {r['tasks'][t]['metrics']} vs {base['tasks'][t]['metrics']}")
    if mt:
        e = mt["tasks"]["mt_bench"]
        print(f"\nMT-Bench, {e['n']} questions x 2 turns, the checkpoint as its own judge: "
              f"{e['seconds']:.1f} s in the task ({mt['wall']:.1f} s wall with loading)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "mt_bench": mt, "device": device_name(),
                                               "date": str(date.today())}, indent=1))
    print("\nscores equal in every mode" if same else "\nSCORES DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
