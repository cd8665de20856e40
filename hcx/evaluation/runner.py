"""``hcx eval``: run tasks on a model and write a run directory.

A run directory holds ``scores.json`` (every task's metrics with standard errors, the
model, the settings), the same results in lm-evaluation-harness's schema
(``results.json``, :mod:`hcx.evaluation.interchange`) and ``samples/<task>.jsonl`` (one record per example: the prompt,
what the model scored or wrote, and the per-example scores). Each task's results are
written as soon as it finishes, atomically, so a crash loses at most the task in flight
and running the same command again resumes: tasks already done with the same settings
are kept, not re-run.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from hcx import __version__ as HCX_VERSION  # the installed package's (pyproject.toml)
from hcx.errors import HcxError
from hcx.evaluation import kinds
from hcx.evaluation.interchange import RESULTS, lm_eval_results
from hcx.evaluation.judged import need_judge
from hcx.evaluation.models import LanguageModel
from hcx.evaluation.tasks import Task, load_docs, with_settings
from hcx.files import write_text_atomic

FORMAT = 1


def checkpoint_step(model: LanguageModel) -> int | None:
    """The training step of an hcx checkpoint (a checkpoints folder means its latest)."""
    from hcx.engine.checkpoint import META, checkpoint_path

    if model.kind != "hcx":
        return None
    meta = checkpoint_path(Path(model.path)) / META
    return json.loads(meta.read_text()).get("step") if meta.is_file() else None


def model_identity(model: LanguageModel) -> dict:
    """What tells one model's results from another's: its path, the training step (a
    checkpoints folder's latest moves on as training goes on) and the weights' dtype; for
    a served model, its URL and the name it is served under."""
    identity = {"path": model.path, "step": checkpoint_step(model),
                "dtype": getattr(model, "dtype", None)}
    if model.kind == "endpoint":
        identity["served"] = model.name
    return identity


def settings_key(task: Task, model: LanguageModel, limit: int | None, chat: bool,
                 judge: LanguageModel | None = None) -> str:
    """What a task's result depends on: a stored result with another key is re-run. A
    judged task's result depends on its judge too (another judge, or another step of
    it, grades anew)."""
    key = {"task": task.fingerprint, "model": model_identity(model), "limit": limit, "chat": chat}
    if task.spec.kind == "judged":
        key["judge"] = model_identity(judge) if judge is not None else None
    return json.dumps(key, sort_keys=True)


def load_scores(out_dir: Path) -> dict | None:
    path = out_dir / "scores.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def cap_generation(task: Task, max_new_tokens: int | None) -> Task:
    """The task with its generation length capped (a smoke run's ``--max-new-tokens``),
    its judge's too."""
    if max_new_tokens is None:
        return task
    update = {}
    gen, judge = task.spec.generation, task.spec.judge
    if gen.max_new_tokens > max_new_tokens:
        update["generation"] = gen.model_copy(update={"max_new_tokens": max_new_tokens})
    if judge is not None and judge.max_new_tokens > max_new_tokens:
        update["judge"] = judge.model_copy(update={"max_new_tokens": max_new_tokens})
    return Task(task.spec.model_copy(update=update), task.file) if update else task


def evaluate(model: LanguageModel, tasks: list[Task], out_dir: Path, limit: int | None = None,
             chat: bool = False, max_new_tokens: int | None = None, log=print,
             settings: dict | None = None, judge: LanguageModel | None = None) -> dict:
    """Run ``tasks`` on ``model``; write and return the scores (rank 0 writes).
    ``settings``: run-time choices applied to every task they fit
    (:func:`hcx.evaluation.tasks.with_settings`: ``mc_mode``, ``shuffle_seed``,
    ``samples``, ``temperature``, ``top_p``); they change the tasks' fingerprints, so
    results of other settings are re-run, not kept. ``judge``: the model grading judged
    tasks (MT-Bench); their results are kept only for the same judge."""
    out_dir = Path(out_dir)
    tasks = [cap_generation(with_settings(t, **(settings or {})), max_new_tokens) for t in tasks]
    need_judge(tasks, judge)  # before any task runs
    writer = model.rank0
    if writer:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    previous = load_scores(out_dir) or {}
    identity = model_identity(model)
    # A run directory holds one model at one setting: results of another model, step,
    # dtype, --limit or --chat are dropped (and re-run if asked for), never mixed.
    same = {"identity": identity, "limit": limit, "chat": chat}
    if previous and {k: previous.get(k) for k in same} != same:
        log(f"{out_dir}: holds results of other settings ({previous.get('model', {}).get('path')}, "
            f"step {previous.get('identity', {}).get('step')}, limit {previous.get('limit')}); "
            f"they are replaced")
        previous = {}
    scores = {
        "format": FORMAT,
        "model": {"name": model.name, "path": model.path, "kind": model.kind,
                  "step": identity["step"]},
        "identity": identity,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "limit": limit, "chat": chat, "hcx_version": HCX_VERSION, "backend": "hcx",
        "tasks": dict(previous.get("tasks", {})),
    }
    for i, task in enumerate(tasks, 1):
        key = settings_key(task, model, limit, chat, judge)
        done = scores["tasks"].get(task.name)
        if done and done.get("settings") == key and (out_dir / "samples" / f"{task.name}.jsonl").is_file():
            log(f"[{i}/{len(tasks)}] {task.name}: done before, kept ({_summary(done)})")
            continue
        docs = load_docs(task, limit)
        start = time.perf_counter()
        try:
            outcome = kinds.run(task, docs, model, chat=chat, judge=judge)
        except HcxError as e:
            raise _naming(e, task.name, [t for t in scores["tasks"] if t != task.name],
                          out_dir if writer else None)
        seconds = time.perf_counter() - start
        spec = task.spec
        entry = {
            "language": spec.language, "category": spec.category, "kind": spec.kind,
            **({"mode": spec.mode} if spec.kind == "multiple_choice" else {}),
            **({"shuffle_seed": spec.generate.shuffle_seed, "cot": spec.generate.cot}
               if spec.kind == "multiple_choice" and spec.mode == "generate" else {}),
            **({"samples": spec.generation.samples, "temperature": spec.generation.temperature,
                "top_p": spec.generation.top_p} if spec.generation.samples > 1 else {}),
            "n": len(docs), "num_fewshot": spec.fewshot.n, "version": task.fingerprint,
            "primary": spec.primary, "seconds": round(seconds, 2),
            "metrics": {m: v.to_json() for m, v in outcome.metrics.items()},
            "settings": key, **outcome.notes,
        }
        scores["tasks"][task.name] = entry
        if writer:
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outcome.samples)
            write_text_atomic(out_dir / "samples" / f"{task.name}.jsonl", lines)
            write_text_atomic(out_dir / "scores.json", json.dumps(scores, indent=1, ensure_ascii=False))
            # the same results in lm-evaluation-harness's schema, for its tools
            write_text_atomic(out_dir / RESULTS, json.dumps(lm_eval_results(scores), indent=1,
                                                            ensure_ascii=False))
        log(f"[{i}/{len(tasks)}] {task.name}: {_summary(entry)} ({len(docs)} examples, "
            f"{seconds:.1f}s, {len(docs) / max(seconds, 1e-9):.1f}/s)")
    return scores


def _naming(error: HcxError, task: str, finished: list[str], out_dir: Path | None) -> HcxError:
    """``error`` with the task it stopped named (unless it names it already) and where
    the results of the tasks already finished are. The error keeps its class (callers
    may catch a specific one); only its message grows."""
    message = str(error)
    if task not in message:
        message = f"task {task}: {message}"
    if finished and out_dir is not None:
        message += (f" (the results of {len(finished)} finished task(s) are in {out_dir}; "
                    "the same command resumes after them)")
    error.args = (message,)
    return error


def _summary(entry: dict) -> str:
    m = entry["metrics"].get(entry["primary"])
    if not m:
        return "no metrics"
    if m["value"] is None:  # undefined (a judged task whose every verdict was unparsed)
        return f"{entry['primary']} undefined"
    err = f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else ""
    return f"{entry['primary']} {m['value']:.4f}{err}"
