"""Results in lm-evaluation-harness's schema, both ways.

``hcx eval`` writes ``results.json`` beside ``scores.json``: the keys lm-eval's own
results file has (``results`` with ``"acc,none"`` / ``"acc_stderr,none"``, ``n-shot``,
``versions``, ``higher_is_better``, ``n-samples``, ``config``), so tools that read lm-eval
runs (leaderboards, notebooks, lm-eval's own ``make_table``) read hcx runs. ``hcx report``
reads lm-eval's results files as runs too (:func:`scores_from_lm_eval`), so a report can
put an lm-eval run of another model beside hcx runs.

hcx's metrics carry no lm-eval filter, so each is written under the filter ``none``.
"""

from __future__ import annotations

from typing import Any

FILTER = "none"
RESULTS = "results.json"


def metrics_from_lm_eval(result: dict, higher: dict) -> dict[str, dict]:
    """hcx metric entries (``value``, ``stderr``, ``higher_is_better``) from one task's
    lm-eval result (``{"acc,none": 0.5, "acc_stderr,none": 0.1, ...}``). A metric under
    several filters keeps the first (lm-eval lists ``none`` first)."""
    out: dict[str, dict] = {}
    for key, value in result.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) \
                or isinstance(value, bool):
            continue
        name, filt = key.split(",", 1)
        if name in out:
            continue
        stderr = result.get(f"{name}_stderr,{filt}")
        out[name] = {"value": float(value),
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                     "higher_is_better": bool(higher.get(name, True))}
    return out


def lm_eval_results(scores: dict) -> dict[str, Any]:
    """lm-eval's results-file layout of an hcx ``scores.json`` (a task's ``version`` is
    the fingerprint of its definition: lm-eval's versions number task revisions)."""
    n_shot = {name: int(t.get("num_fewshot") or 0) for name, t in scores.get("tasks", {}).items()}
    results, higher, samples, versions = {}, {}, {}, {}
    for name, task in scores.get("tasks", {}).items():
        entry: dict[str, Any] = {"alias": name}
        for metric, m in task["metrics"].items():
            entry[f"{metric},{FILTER}"] = m.get("value")
            entry[f"{metric}_stderr,{FILTER}"] = m.get("stderr") if m.get("stderr") is not None \
                else "N/A"
        results[name] = entry
        higher[name] = {metric: bool(m.get("higher_is_better", True))
                        for metric, m in task["metrics"].items()}
        samples[name] = {"original": task.get("n"), "effective": task.get("n")}
        versions[name] = task.get("version", 1.0)
    model = scores.get("model", {})
    return {
        "results": results,
        "configs": {name: {"task": name, "num_fewshot": n_shot.get(name, 0),
                           "metadata": {"hcx_kind": t.get("kind"),
                                        "hcx_language": t.get("language"),
                                        "hcx_category": t.get("category"),
                                        "hcx_primary": t.get("primary")}}
                    for name, t in scores.get("tasks", {}).items()},
        "versions": versions,
        "n-shot": {name: n_shot.get(name, 0) for name in results},
        "higher_is_better": higher,
        "n-samples": samples,
        "config": {"model": "hcx", "model_args": f"checkpoint={model.get('path')}",
                   "limit": scores.get("limit"), "batch_size": None},
        "model_name": model.get("name"),
        "date": scores.get("created"),
        "hcx_version": scores.get("hcx_version"),
    }


def is_lm_eval_results(data: dict) -> bool:
    return isinstance(data, dict) and isinstance(data.get("results"), dict) \
        and "format" not in data


def scores_from_lm_eval(data: dict, source: str) -> dict[str, Any]:
    """An hcx ``scores.json`` (format 1) from an lm-eval results file: each task's
    metrics; language, category and primary metric from hcx's own task of that name
    (or the file's hcx metadata), else unknown language, category ``other`` and ``acc``
    (or the first metric) as primary."""
    from hcx.evaluation.tasks import TaskError, resolve_tasks

    tasks = {}
    configs = data.get("configs") or {}
    for name, result in data["results"].items():
        metrics = metrics_from_lm_eval(result, (data.get("higher_is_better") or {}).get(name, {}))
        if not metrics:
            continue  # a group's aggregate without scores of its own
        meta = (configs.get(name) or {}).get("metadata") or {}
        language, category, primary = (meta.get("hcx_language"), meta.get("hcx_category"),
                                       meta.get("hcx_primary"))
        if language is None:
            try:
                spec = resolve_tasks([name])[0].spec
                language, category, primary = spec.language, spec.category, spec.primary
            except TaskError:
                pass
        if primary not in metrics:
            primary = "acc" if "acc" in metrics else next(iter(metrics))
        n = ((data.get("n-samples") or {}).get(name) or {}).get("effective")
        tasks[name] = {"language": language or "?", "category": category or "other",
                       "kind": meta.get("hcx_kind") or "lm-eval", "n": n, "primary": primary,
                       "metrics": metrics}
    config = data.get("config") or {}
    name = data.get("model_name") or config.get("model_args") or source
    return {"format": 1, "model": {"name": str(name), "path": config.get("model_args"),
                                   "kind": "lm-eval"},
            "created": data.get("date") if isinstance(data.get("date"), str) else None,
            "limit": config.get("limit"), "backend": "lm-eval", "tasks": tasks}
