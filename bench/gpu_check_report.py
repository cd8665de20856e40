"""The Markdown table of ``bench/gpu_check.sh``: reads what its steps left in the work
folder (``times.tsv``, each step's log, the runs' ``metrics.jsonl``, the benchmarks'
JSON) and writes one table per part, with every failed or skipped step said so.

    python bench/gpu_check_report.py WORK --tolerance 0.03 --out bench/gpu_check.md
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path


def read_times(work: Path) -> dict[str, tuple[str, float | None]]:
    out = {}
    path = work / "times.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, ms = (line.split("\t") + ["", ""])[:3]
        out[name] = (rc, float(ms) / 1000 if ms else None)
    return out


def losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def compare(a: dict[int, float], b: dict[int, float], tol: float) -> tuple[str, float | None]:
    """``ok``/``FAIL`` and the largest relative difference over the common steps."""
    steps = sorted(set(a) & set(b))
    if not steps:
        return "no data", None
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)
    return ("ok" if worst <= tol else "FAIL"), worst


def status(times: dict, name: str) -> str:
    rc, secs = times.get(name, ("not run", None))
    if rc == "0":
        return f"{secs:.0f} s"
    return "skipped" if rc == "skipped" else f"failed (exit {rc}; see {name}.log)"


def load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("work")
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    times = read_times(work)
    lines = [f"# hcx GPU check ({date.today().isoformat()})", ""]

    env = (work / "environment.log").read_text().strip().splitlines() \
        if (work / "environment.log").is_file() else ["(not run)"]
    lines += ["## Environment", "", "| item | value |", "|---|---|"]
    lines += [f"| {'GPU, driver, memory' if i == 0 else 'torch, CUDA, megatron-core' if i == 1 else 'Transformer Engine'} | {x} |"
              for i, x in enumerate(env[:3])]
    lines.append("")

    fp32 = losses(work / "tiny-fp32")
    lines += ["## Tiny recipe, 20 steps over NCCL", "",
              f"Tolerance: every step's loss within {args.tolerance:.0%} (relative) of the fp32 "
              "run's.", "", "| run | final loss | largest relative difference | verdict | wall time |",
              "|---|---|---|---|---|"]
    lines.append(f"| fp32, TP=1 | {fp32.get(max(fp32), float('nan')) if fp32 else 'n/a'} | "
                 f"(reference) | | {status(times, 'tiny_fp32')} |")
    for name, run in (("bf16, TP=1", "tiny_bf16"), ("bf16, TP=2 + SP", "tiny_bf16_tp2")):
        if run not in times:
            continue
        got = losses(work / run.replace("_", "-"))
        verdict, worst = compare(got, fp32, args.tolerance)
        final = f"{got[max(got)]:.4f}" if got else "n/a"
        lines.append(f"| {name} | {final} | {'n/a' if worst is None else f'{worst:.2%}'} | "
                     f"{verdict} | {status(times, run)} |")
    lines.append("")

    tt = load_json(work / "train_throughput.json")
    lines += ["## recipes/bench-1b.yaml training throughput", ""]
    if tt:
        lines += [f"{tt['device']}, {tt['dtype']}, batch {tt['global_batch']} x {tt['seq_length']}",
                  "", "| implementation | tokens/s | TFLOP/s per GPU | MFU |", "|---|---|---|---|"]
        for row in tt["rows"]:
            mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
            lines.append(f"| {row['impl']} | {row['tokens_per_s']:,.0f} | "
                         f"{row['tflops_per_device']:.1f} | {mfu} |")
    else:
        lines.append(f"not measured: {status(times, 'train_throughput')}")
    lines.append("")

    lines += ["## Checkpoint save time (bench-1b, 3 steps)", "",
              "Seconds a save holds training up: (run saving every step - run saving at the "
              "end) / 2 extra saves.", "", "| mode | per save | runs |", "|---|---|---|"]
    for mode in ("sync", "async"):
        end, every = times.get(f"save_{mode}_end"), times.get(f"save_{mode}_every")
        if end and every and end[0] == every[0] == "0":
            lines.append(f"| {mode} | {(every[1] - end[1]) / 2:.1f} s | {end[1]:.0f} s / "
                         f"{every[1]:.0f} s |")
        else:
            lines.append(f"| {mode} | n/a | {status(times, f'save_{mode}_every')} |")
    lines.append("")

    for title, name, cap in (("Evaluation", "eval_throughput", 4000),
                             ("Generation", "generate_throughput", 3000)):
        found = load_json(work / f"{name}.json")
        lines += [f"## {title} (tiny model)", ""]
        if found:
            lines += ["```", json.dumps(found, indent=1)[:cap], "```"]
        else:
            lines.append(f"not measured: {status(times, name)}")
        lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
