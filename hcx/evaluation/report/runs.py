"""Reading evaluation run directories: the ``scores.json`` that ``hcx eval`` writes,
checked before anything is merged, with errors that name the file and the field."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcx.errors import HcxError
from hcx.evaluation.interchange import is_lm_eval_results, scores_from_lm_eval

SCORES = "scores.json"
FORMAT = 1


class ReportError(HcxError, ValueError):
    """An evaluation run directory that cannot be read, or a report that cannot be built."""


@dataclass
class Run:
    """One evaluation run: its directory and the parsed ``scores.json``."""

    dir: Path
    file: Path
    model: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    limit: int | None = None
    created: str | None = None
    hcx_version: str | None = None
    label: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return str(self.model.get("name") or self.dir.name)


def lm_eval_results_file(run_dir: Path) -> Path | None:
    """The newest lm-evaluation-harness results file in a folder (``lm_eval
    --output_path`` writes ``<model>/results_<date>.json``), if any."""
    found = sorted(run_dir.glob("results_*.json")) + sorted(run_dir.glob("*/results_*.json"))
    return max(found, key=lambda p: p.name) if found else None


def load_run(path: str | os.PathLike) -> Run:
    """Read and check one run: an ``hcx eval`` run directory (its ``scores.json``), or
    lm-evaluation-harness's results (a ``results_*.json`` file or the folder holding one;
    :func:`hcx.evaluation.interchange.scores_from_lm_eval`)."""
    path = Path(path)
    if path.is_file():
        file, run_dir = path, path.parent
    elif path.is_dir():
        file, run_dir = path / SCORES, path
        if not file.is_file():
            file = lm_eval_results_file(path) or file
        if not file.is_file():
            raise ReportError(
                f"{path}: no {SCORES} here, so this is not an evaluation run directory; "
                f"produce one with `hcx eval CKPT --out {path}`")
    else:
        raise ReportError(f"{path}: no such evaluation run directory; "
                          f"produce one with `hcx eval CKPT --out {path}`")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                          f"re-run `hcx eval CKPT --out {run_dir}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{file}: cannot be read ({e})") from None

    def bad(where: str, what: str) -> ReportError:
        return ReportError(f"{file}: {where}: {what}")

    if not isinstance(data, dict):
        raise bad("top level", "expected a JSON object")
    if is_lm_eval_results(data):
        data = scores_from_lm_eval(data, run_dir.name)
    fmt = data.get("format")
    if fmt != FORMAT:
        raise bad("format", f"is {fmt!r}; this hcx reads format {FORMAT} "
                  "(written by a different hcx version?)")
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise bad("model", "expected an object")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise bad("tasks", "missing or empty: the run scored no task")
    for tname, task in tasks.items():
        if not isinstance(task, dict):
            raise bad(f"tasks.{tname}", "expected an object")
        metrics = task.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            raise bad(f"tasks.{tname}.metrics", "missing or empty")
        for mname, m in metrics.items():
            if not isinstance(m, dict) or "value" not in m:
                raise bad(f"tasks.{tname}.metrics.{mname}", "expected an object with a 'value'")
        primary = task.get("primary")
        if primary not in metrics:
            raise bad(f"tasks.{tname}.primary",
                      f"{primary!r} is not one of its metrics ({', '.join(metrics)})")
    limit = data.get("limit")
    return Run(dir=run_dir, file=file, model=model, tasks=tasks,
               limit=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
               created=data.get("created"), hcx_version=data.get("hcx_version"), raw=data)


def per_example(run: Run, task: str, metric: str) -> tuple[list, list[float]] | None:
    """``(example identities, scores)`` of one metric of one task from the run's
    ``samples/<task>.jsonl``, or None where the run kept no such per-example score (corpus
    metrics such as BLEU, or runs without samples). An example's identity is its prompt,
    so two runs compare only on the same examples in the same order."""
    path = run.dir / "samples" / f"{task}.jsonl"
    if not path.is_file():
        return None
    ids, values = [], []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            value = record.get(metric)
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)):
                return None
            ids.append(record.get("prompt"))
            values.append(float(value))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return ids, values
