"""``hcx eval --backend lm-eval``: lm-evaluation-harness's own task definitions (prompts,
choices, metrics) run on the local copies of their data: the Korean KoBEST tasks
(``kobest_boolq``, ``kobest_copa``, ``kobest_hellaswag``, ``kobest_sentineg``,
``kobest_wic``; ``kobest`` is all five) and CLIcK (``click``, its groups ``click_cul`` and
``click_lang`` and their eleven subtasks), and, for comparisons with English,
``arc_easy``, ``arc_challenge`` and ``hellaswag`` (the 1000-item validation subset).

lm-eval's YAMLs read the Hugging Face Hub datasets (``skt/kobest_v1``,
``EunsuKim/CLIcK``, ...); the local files (``<data root>/eval/...``, see SOURCES.md there)
are the same benchmarks with the source repositories' field names and label spellings.
So each run

1. converts the local rows to the Hub schema the YAMLs expect (``<out>/lm_eval_data/``);
2. writes one task YAML per lm-eval task (``<out>/lm_eval_tasks/``) that ``include:``s the
   installed lm-eval YAML and replaces only where the data comes from: ``dataset_path:
   json`` with the converted files, the splits named as the Hub's (prompts, choices,
   targets and metrics stay lm-eval's);
3. runs lm-eval's evaluator (``lm_eval.evaluator.evaluate``, with ``simple_evaluate``'s
   seeds and few-shot defaults; not ``simple_evaluate`` itself, which spends ~2 s per
   call collecting environment information) on either hcx's model adapter (``hcx``,
   :mod:`hcx.evaluation.lm_eval.model`) or lm-eval's own Hugging Face model (``hf``);
4. writes the run directory ``hcx report`` reads: ``scores.json`` (same format as the
   native evaluator's, ``"backend": "lm-eval"``) and ``samples/<task>.jsonl`` (lm-eval's
   logged samples, plus ``loglikelihoods`` per choice for multiple-choice tasks), and
   lm-eval's own results per task in ``lm_eval/<task>.json``.

The Hub's KoBEST splits are train/validation/test; the local copies have dev (=
validation) and test, no train, so ``training_split`` is unset (few-shot examples, if
asked for, come from validation). CLIcK's Hub dataset has one split, ``train``, which
its YAMLs evaluate; the local file is all of it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hcx.errors import HcxError
from hcx.evaluation.interchange import metrics_from_lm_eval
from hcx.files import write_text_atomic


class LmEvalBackendError(HcxError, ValueError):
    pass


# --- local rows -> the Hub schema lm-eval's YAMLs read ---------------------------------


def _truth(value, where: str) -> int:
    """KoBEST's True/TRUE/False/FALSE as 1/0."""
    s = str(value).strip().lower()
    if s not in ("true", "false"):
        raise LmEvalBackendError(f"{where}: expected True/False, got {value!r}")
    return int(s == "true")


def _index(value, allowed: range, where: str, base: int = 0) -> int:
    try:
        i = int(str(value).strip()) - base
    except ValueError:
        raise LmEvalBackendError(f"{where}: expected an integer label, got {value!r}") from None
    if i not in allowed:
        raise LmEvalBackendError(f"{where}: label {value!r} is out of range")
    return i


def _boolq(r: dict, where: str) -> dict:
    return {"paragraph": r["Text"], "question": r["Question"], "label": _truth(r["Answer"], where)}


def _copa(r: dict, where: str) -> dict:
    return {"premise": r["sentence"], "question": r["question"], "alternative_1": r["1"],
            "alternative_2": r["2"], "label": _index(r["Answer"], range(2), where, base=1)}


def _hellaswag(r: dict, where: str) -> dict:
    return {"context": r["context"], **{f"ending_{k}": r[f"choice{k}"] for k in range(1, 5)},
            "label": _index(r["label"], range(4), where)}


def _sentineg(r: dict, where: str) -> dict:
    return {"sentence": r["Text"], "label": _index(r["Label"], range(2), where)}


def _wic(r: dict, where: str) -> dict:
    # The target word stays bracketed in the sentences, as in the source TSV.
    return {"word": r["Target"], "context_1": r["SENTENCE1"], "context_2": r["SENTENCE2"],
            "label": _truth(r["ANSWER"], where)}


def _click(r: dict, where: str) -> dict:
    if r["answer"] not in r["choices"]:
        raise LmEvalBackendError(f"{where}: answer {r['answer']!r} is none of the choices")
    return {k: r[k] for k in ("id", "paragraph", "question", "choices", "answer")}


def _arc(r: dict, where: str) -> dict:
    q = r["question"]
    labels = [c["label"] for c in q["choices"]]
    if r["answerKey"] not in labels:
        raise LmEvalBackendError(f"{where}: answerKey {r['answerKey']!r} is none of {labels}")
    return {"id": r["id"], "question": q["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": labels}}


def _hellaswag_en(r: dict, where: str) -> dict:
    # The rowanz layout is the Hub's (Rowan/hellaswag), whose label is a string.
    return {**r, "label": str(_index(r["label"], range(len(r["endings"])), where))}


@dataclass(frozen=True)
class Source:
    """Where a benchmark's local files are and how their rows become the Hub's."""

    directory: str                 # under <data root>/eval/
    splits: dict[str, str]         # split name (as on the Hub) -> local file name
    convert: Callable[[dict, str], dict]
    task_splits: dict = field(default_factory=dict)  # the YAML's *_split keys, overridden


@dataclass(frozen=True)
class LmEvalTask:
    """One row of the report: an lm-eval task, or an lm-eval group scored as a whole
    (its ``leaves`` are the tasks whose YAMLs are redirected to the local data)."""

    name: str
    source: Source
    category: str
    yamls: dict[str, str] = field(default_factory=dict)  # leaf task -> YAML under lm_eval/tasks
    primary: str = "acc"
    language: str = "ko"


# Test and validation (dev) files, no train: few-shot examples would come from validation.
_TEST_DEV = {"test": "test.jsonl", "validation": "dev.jsonl"}
_TEST_DEV_SPLITS = {"training_split": None, "validation_split": "validation", "test_split": "test"}
_SOURCES = {
    "kobest_boolq": Source("kobest_boolq", _TEST_DEV, _boolq, _TEST_DEV_SPLITS),
    "kobest_copa": Source("kobest_copa", _TEST_DEV, _copa, _TEST_DEV_SPLITS),
    "kobest_hellaswag": Source("kobest_hellaswag", _TEST_DEV, _hellaswag, _TEST_DEV_SPLITS),
    "kobest_sentineg": Source("kobest_sentineg", _TEST_DEV, _sentineg, _TEST_DEV_SPLITS),
    "kobest_wic": Source("kobest_wic", _TEST_DEV, _wic, _TEST_DEV_SPLITS),
    # The Hub's CLIcK is one split, "train", which lm-eval's YAMLs evaluate already.
    "click": Source("click", {"train": "test.jsonl"}, _click),
    "arc_easy": Source("arc_easy", {"test": "test.jsonl", "validation": "validation.jsonl"},
                       _arc, _TEST_DEV_SPLITS),
    "arc_challenge": Source("arc_challenge", {"test": "test.jsonl", "validation": "validation.jsonl"},
                            _arc, _TEST_DEV_SPLITS),
    # A 1000-item subset of the validation split (SOURCES.md), which lm-eval evaluates.
    "hellaswag": Source("hellaswag", {"validation": "validation_subset1000.jsonl"}, _hellaswag_en,
                        {"training_split": None, "validation_split": "validation"}),
}
# Categories and primary metrics as the native tasks of eval/tasks/ give them, so that
# hcx report compares the two backends like for like.
_KOBEST_CATEGORY = {"kobest_boolq": "reading", "kobest_copa": "reasoning",
                    "kobest_hellaswag": "commonsense", "kobest_sentineg": "understanding",
                    "kobest_wic": "understanding"}
_CLICK_CUL = ["economy", "geography", "history", "kpop", "law", "politics", "society", "tradition"]
_CLICK_LANG = ["function", "grammar", "text"]


def _tasks() -> dict[str, LmEvalTask]:
    out = {name: LmEvalTask(name, _SOURCES[name], cat, {name: f"kobest/{name}.yaml"},
                            primary="acc_norm" if name == "kobest_hellaswag" else "acc")
           for name, cat in _KOBEST_CATEGORY.items()}
    for name, yaml_path, cat, primary in (
            ("arc_easy", "arc/arc_easy.yaml", "reasoning", "acc"),
            ("arc_challenge", "arc/arc_challenge.yaml", "reasoning", "acc"),
            ("hellaswag", "hellaswag/hellaswag.yaml", "commonsense", "acc_norm")):
        out[name] = LmEvalTask(name, _SOURCES[name], cat, {name: yaml_path}, primary, "en")
    cul = {f"click_cul_{s}": f"click/click_cul/click_cul_{s}.yaml" for s in _CLICK_CUL}
    lang = {f"click_lang_{s}": f"click/click_lang/click_lang_{s}.yaml" for s in _CLICK_LANG}
    for group, leaves in (("click", {**lang, **cul}), ("click_cul", cul), ("click_lang", lang)):
        out[group] = LmEvalTask(group, _SOURCES["click"], "knowledge", leaves)
    for leaf, yaml_path in {**cul, **lang}.items():
        out[leaf] = LmEvalTask(leaf, _SOURCES["click"], "knowledge", {leaf: yaml_path})
    return out


TASKS: dict[str, LmEvalTask] = _tasks()
ALIASES = {"kobest": list(_KOBEST_CATEGORY)}


def supported_tasks() -> list[str]:
    return sorted(TASKS) + sorted(ALIASES)


def resolve(names: list[str]) -> list[LmEvalTask]:
    """The tasks named (``kobest`` is all five KoBEST tasks); an unknown name is an
    error that lists what is supported."""
    unknown = [n for n in names if n not in TASKS and n not in ALIASES]
    if unknown:
        raise LmEvalBackendError(
            f"--backend lm-eval: unknown task{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; supported: {', '.join(supported_tasks())}")
    if not names:
        raise LmEvalBackendError(f"--backend lm-eval: no tasks given; supported: "
                                 f"{', '.join(supported_tasks())}")
    out: list[LmEvalTask] = []
    for n in names:
        for t in ALIASES.get(n, [n]):
            if TASKS[t] not in out:
                out.append(TASKS[t])
    return out


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def convert_source(source: Source, data_root: Path, out: Path) -> dict[str, str]:
    """Convert a benchmark's local files into ``out`` (JSON Lines in the Hub's schema);
    returns lm-eval split name -> converted file."""
    files = {}
    out.mkdir(parents=True, exist_ok=True)
    for split, name in source.splits.items():
        src = data_root / "eval" / source.directory / name
        if not src.is_file():
            raise LmEvalBackendError(f"{src}: not found (the local copy of {source.directory}; "
                                     "set HCX_DATA_DIR or --data-dir)")
        rows = []
        with src.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    where = f"{src}:{i}"
                    try:
                        rows.append(source.convert(json.loads(line), where))
                    except KeyError as e:
                        raise LmEvalBackendError(f"{where}: no field {e}") from None
        dest = out / f"{split}.jsonl"
        write_text_atomic(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files[split] = str(dest.resolve())
    return files


def write_task_yamls(task: LmEvalTask, data_files: dict[str, str], out: Path) -> list[Path]:
    """One YAML per leaf: lm-eval's YAML, included, with the data source replaced."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    root = lm_eval_tasks_dir()
    written = []
    for leaf, rel in task.yamls.items():
        spec = {
            "include": str(root / rel),
            "task": leaf,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files},
            **task.source.task_splits,
        }
        path = out / f"{leaf}.yaml"
        write_text_atomic(path, yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
        written.append(path)
    return written


def prepare(tasks: list[LmEvalTask], out_dir: Path, data_root: Path | None = None) -> Path:
    """Converted data and task YAMLs for ``tasks`` under ``out_dir``; returns the
    directory to give lm-eval as ``include_path``. Every file is written atomically, so
    TP ranks preparing the same run directory side by side never read a partial file."""
    from hcx.paths import data_root as default_root

    root = Path(data_root) if data_root else default_root()
    include = out_dir / "lm_eval_tasks"
    converted: dict[str, dict[str, str]] = {}
    for t in tasks:
        src = t.source
        if src.directory not in converted:
            converted[src.directory] = convert_source(src, root, out_dir / "lm_eval_data" / src.directory)
        write_task_yamls(t, converted[src.directory], include)
    return include


# --- running lm-eval -------------------------------------------------------------------


def _offline() -> None:
    # Local files only: nothing may be fetched (lm-eval's f1 metrics ask the Hub's
    # `evaluate` for a metric script they never use for multiple choice).
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"):
        os.environ.setdefault(var, "1")


class _QuietHubMetricMiss(logging.Filter):
    """Drops lm-eval's "f1 not found in the evaluate library!" error: KoBEST's f1 is a
    per-example (gold, prediction) pair aggregated by lm-eval's own macro-F1, and the
    Hub metric it fails to fetch offline is never called."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not found in the evaluate library" not in record.getMessage()


def make_lm(model, lm_eval_model: str = "hcx", tp: int = 1, batch_size: int = 16,
            max_tokens: int | None = None, dtype: str = "float32", device: str | None = None):
    """The lm-eval model object: hcx's adapter, or lm-eval's ``hf`` model (a Hugging
    Face directory). ``model`` is a path, or an open hcx LanguageModel (``hcx`` only)."""
    if lm_eval_model == "hcx":
        from hcx.evaluation.lm_eval.model import HcxLM

        if isinstance(model, (str, Path)):
            return HcxLM(checkpoint=str(model), tp=tp, batch_size=batch_size,
                         max_tokens=max_tokens, dtype=dtype)
        return HcxLM(model=model, batch_size=batch_size, max_tokens=max_tokens)
    if lm_eval_model == "hf":
        import torch
        from lm_eval.models.huggingface import HFLM

        if not isinstance(model, (str, Path)) or not (Path(model) / "config.json").is_file():
            raise LmEvalBackendError(f"lm_eval_model='hf' needs a Hugging Face directory "
                                     f"(hcx export CHECKPOINT DIR makes one); got {model}")
        if tp != 1:
            raise LmEvalBackendError("lm_eval_model='hf' runs in one process (tp=1)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return HFLM(pretrained=str(model), batch_size=batch_size, dtype=dtype, device=device)
    raise LmEvalBackendError(f"lm_eval_model must be 'hcx' or 'hf', not {lm_eval_model!r}")


def evaluate_tasks(lm, task_manager, names: list[str], limit: int | None,
              num_fewshot: int | None) -> dict | None:
    """lm-eval's evaluator with ``simple_evaluate``'s seeds and few-shot defaults."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = task_manager.load(names)
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True)


def _sample_records(samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples, JSON-ready, with each choice's log-likelihood."""
    from lm_eval.utils import handle_non_serializable

    out = []
    for s in samples:
        rec = json.loads(json.dumps(s, default=handle_non_serializable, ensure_ascii=False))
        resps = rec.get("filtered_resps")
        if isinstance(resps, list) and resps and all(isinstance(r, list) and len(r) == 2
                                                     and isinstance(r[0], (int, float)) for r in resps):
            rec["loglikelihoods"] = [float(r[0]) for r in resps]
        out.append(rec)
    return out


def _model_meta(lm, model, lm_eval_model: str) -> dict:
    if lm_eval_model == "hcx":
        from hcx.evaluation.runner import checkpoint_step

        m = lm.model
        return {"name": m.name, "path": m.path, "kind": m.kind, "step": checkpoint_step(m)}
    p = Path(model).resolve()
    return {"name": p.name, "path": str(p), "kind": "hf", "step": None}


def run_lm_eval(model_path, tasks: list[str], out_dir: Path, limit: int | None = None, *,
                tp: int = 1, batch_size: int = 16, max_tokens: int | None = None,
                lm_eval_model: str = "hcx", num_fewshot: int | None = None,
                data_root: Path | None = None, dtype: str = "float32", lm=None,
                log=print) -> dict | None:
    """Run lm-eval's own tasks ``tasks`` on the local data; write ``out_dir`` (the run
    directory ``hcx report`` reads) and return the scores (on the process that writes;
    None on the other TP ranks).

    ``model_path``: an hcx checkpoint or a Hugging Face directory (``lm_eval_model="hcx"``,
    hcx's adapter), or a Hugging Face directory (``"hf"``, lm-eval's own model). ``lm``: an
    lm-eval model object already made (``make_lm``) to reuse; then ``model_path`` only
    names it. ``batch_size``: questions per forward pass for ``hcx``; requests
    (question-choice pairs) per forward pass for ``hf``, lm-eval's meaning.
    """
    from hcx.errors import require

    require("lm_eval", "eval", package="lm-eval", purpose="hcx eval --backend lm-eval")
    _offline()
    selected = resolve(list(tasks))
    out_dir = Path(out_dir)
    from lm_eval.tasks import TaskManager

    include = prepare(selected, out_dir, data_root)
    own_lm = lm is None
    if own_lm:
        lm = make_lm(model_path, lm_eval_model, tp=tp, batch_size=batch_size,
                     max_tokens=max_tokens, dtype=dtype)
    writer = lm.rank == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0
    if lm_eval_model == "hcx":
        writer = writer and lm.model.rank0
    quiet = _QuietHubMetricMiss()
    registry_log = logging.getLogger("lm_eval.api.registry")
    registry_log.addFilter(quiet)
    try:
        import lm_eval

        manager = TaskManager(include_path=str(include))
        model_meta = _model_meta(lm, model_path, lm_eval_model)
        scores_path = out_dir / "scores.json"
        previous = json.loads(scores_path.read_text(encoding="utf-8")) if scores_path.is_file() else {}
        # One model at one setting per run directory (as the native runner): other
        # results are replaced, never mixed under this run's limit.
        keep = (previous.get("backend") == "lm-eval"
                and previous.get("model", {}) == model_meta
                and previous.get("limit") == limit
                and previous.get("lm_eval", {}).get("model") == lm_eval_model
                and previous.get("lm_eval", {}).get("num_fewshot") == num_fewshot)
        scores = {
            "format": 1, "model": model_meta,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "limit": limit, "chat": False, "hcx_version": _hcx_version(), "backend": "lm-eval",
            "lm_eval": {"version": lm_eval.__version__, "model": lm_eval_model,
                        "batch_size": batch_size, "num_fewshot": num_fewshot},
            "tasks": dict(previous.get("tasks", {})) if keep else {},
        }
        if writer:
            (out_dir / "samples").mkdir(parents=True, exist_ok=True)
            (out_dir / "lm_eval").mkdir(parents=True, exist_ok=True)
        for i, task in enumerate(selected, 1):
            start = time.perf_counter()
            results = evaluate_tasks(lm, manager, [task.name], limit, num_fewshot)
            seconds = time.perf_counter() - start
            if results is None or not writer:
                continue
            leaves = list(task.yamls)
            n = sum(int(results["n-samples"][leaf]["effective"]) for leaf in leaves)
            entry = {
                "language": task.language, "category": task.category, "kind": "multiple_choice",
                "n": n, "primary": task.primary, "seconds": round(seconds, 2),
                "metrics": metrics_from_lm_eval(results["results"][task.name],
                                    results.get("higher_is_better", {}).get(task.name, {})),
                "lm_eval_task": task.name,
            }
            scores["tasks"][task.name] = entry
            records = []
            for leaf in leaves:
                for rec in _sample_records(results["samples"].get(leaf, [])):
                    records.append({"task": leaf, **rec} if len(leaves) > 1 else rec)
            write_text_atomic(out_dir / "samples" / f"{task.name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            from lm_eval.utils import handle_non_serializable

            raw = {k: v for k, v in results.items() if k != "samples"}
            write_text_atomic(out_dir / "lm_eval" / f"{task.name}.json",
                          json.dumps(raw, indent=1, ensure_ascii=False, default=handle_non_serializable))
            write_text_atomic(scores_path, json.dumps(scores, indent=1, ensure_ascii=False))
            m = entry["metrics"].get(task.primary, {})
            err = f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else ""
            log(f"[{i}/{len(selected)}] {task.name} (lm-eval, {lm_eval_model}): "
                f"{task.primary} {m.get('value', float('nan')):.4f}{err} "
                f"({n} examples, {seconds:.1f}s, {n / max(seconds, 1e-9):.1f}/s)")
        return scores if writer else None
    finally:
        registry_log.removeFilter(quiet)
        if own_lm and lm_eval_model == "hcx":
            lm.close()


def _hcx_version() -> str:
    from hcx import __version__

    return __version__
