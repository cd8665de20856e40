"""The report's data (what ``report.json`` holds): the runs merged task by task, each
metric on its display scale, category and translation averages, deltas against the
baseline (the first run) and the warnings a reader needs before quoting the numbers.

Scales. Metrics whose values all lie in 0..1 (accuracies, exact match, ...) are shown
x100, so that every number in the tables and averages is on a 0-100 scale; BLEU, chrF and
TER are 0..100 already. ``report.json`` keeps each metric's raw ``value``/``stderr`` as
in ``scores.json`` plus the ``scale`` applied for display; category means and all deltas
in it are on the display (0-100) scale.

Judged tasks (MT-Bench, kind ``judged``) rate answers 1..10: their ``score`` metrics are
shown x10, on the same 0-100 scale as the rest; their per-category scores (the task's
``breakdown.category``) are kept on the judge's own 1-10 scale in ``judged`` (the report's
category chart and table).

Category averages are the mean of each task's primary metric (display scale) over the
tasks a run has in that category and language; a task whose primary metric is
lower-is-better is left out of averages (it is listed as such). Deltas are the displayed
value minus the baseline's displayed value; a dagger marks an average whose task set
differs from the baseline's (a task missing from either run), so that delta is not
like-for-like.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from hcx.evaluation.metrics import paired_test
from hcx.evaluation.report.runs import FORMAT, ReportError, Run, per_example

# Metrics on a 0..100 scale already (sacrebleu's); every other metric whose values all lie
# in [0, 1] is multiplied by 100 for display.
PERCENT_METRICS = {"bleu", "chrf", "chrf++", "ter", "sacrebleu"}

CATEGORY_ORDER = ["knowledge", "reasoning", "commonsense", "reading", "nli", "math", "code",
                  "instruction", "truthfulness", "safety"]
LANGS = {"ko": "Korean · 한국어", "en": "English · 영어"}
# The translation summary's columns: metric key in scores.json, column name.
TRANSLATION_METRICS = [("chrf", "chrF"), ("bleu", "BLEU")]


def _number(x: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _assign_labels(runs: list[Run]) -> None:
    """Unique, short column labels: the model name, then name@step, then the run dir."""
    def tries(run: Run) -> list[str]:
        step = run.model.get("step")
        out = [run.name]
        if step is not None:
            out.append(f"{run.name}@{step}")
        out.append(f"{run.name} ({run.dir.name})")
        return out

    taken: set[str] = set()
    for i, run in enumerate(runs):
        for cand in tries(run):
            if sum(1 for r in runs if cand in tries(r)) == 1 and cand not in taken:
                break
        else:
            cand = f"{run.name} #{i + 1}"
        while cand in taken:
            cand += "'"
        run.label = cand
        taken.add(cand)


def _section(language: str, category: str) -> str:
    if "-" in language:
        return "translation"
    if category == "safety":
        return "safety"
    return language if language in LANGS else "other"


def category_key(cat: str) -> tuple:
    """Sort key of categories: CATEGORY_ORDER first, then the rest alphabetically."""
    return (CATEGORY_ORDER.index(cat), "") if cat in CATEGORY_ORDER else (len(CATEGORY_ORDER), cat)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _delta(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def merge_runs(runs: list[Run], title: str | None = None) -> dict[str, Any]:
    """The report's data (what ``report.json`` holds), from runs whose first is the baseline."""
    if not runs:
        raise ReportError("no evaluation run given: pass at least one directory written by "
                          "`hcx eval CKPT --out DIR`")
    _assign_labels(runs)
    labels = [r.label for r in runs]
    base = labels[0]
    warns: list[str] = []

    # --- limits
    limits = {r.label: r.limit for r in runs}
    if any(v is not None for v in limits.values()):
        desc = ", ".join(f"{k}: {v if v is not None else 'none'}" for k, v in limits.items())
        warns.append(f"Evaluated with --limit ({desc}): each task was scored on its first N "
                     "examples only, so these scores are NOT comparable with published results.")
    if len(set(limits.values())) > 1:
        warns.append("The runs used different --limit values: their scores are not comparable "
                      "with each other either.")

    # --- tasks: the first run that has a task defines its language/category/primary
    order: list[str] = []
    for r in runs:
        order += [t for t in r.tasks if t not in order]
    tasks: dict[str, Any] = {}
    missing_notes = []
    for tname in order:
        have = [r for r in runs if tname in r.tasks]
        ref = have[0].tasks[tname]
        language = str(ref.get("language") or "?")
        category = str(ref.get("category") or "other")
        primary = ref["primary"]
        for key, ref_val in (("language", language), ("category", category), ("primary", primary)):
            vals = {r.label: str(r.tasks[tname].get(key) or "") for r in have}
            if len(set(vals.values())) > 1:
                warns.append(f"{tname}: {key} differs between runs ("
                             + ", ".join(f"{k}: {v}" for k, v in vals.items())
                             + f"); the report uses {ref_val}.")
        ns = {r.label: (r.tasks[tname].get("n") if tname in r.tasks else None) for r in runs}
        n_present = {k: v for k, v in ns.items() if k in {r.label for r in have}}
        n_mismatch = len(set(n_present.values())) > 1
        if n_mismatch:
            warns.append(f"{tname}: the runs scored different numbers of examples ("
                         + ", ".join(f"{k} n={v}" for k, v in n_present.items())
                         + "); its scores are not comparable between them.")
        missing = [r.label for r in runs if tname not in r.tasks]
        if missing:
            missing_notes.append(f"{tname} (missing in {', '.join(missing)})")

        mnames = [primary] + [m for r in have for m in r.tasks[tname]["metrics"] if m != primary]
        mnames = list(dict.fromkeys(mnames))
        metrics = {}
        for m in mnames:
            entries = {r.label: r.tasks[tname]["metrics"].get(m) if tname in r.tasks else None
                       for r in runs}
            hib_vals = [e.get("higher_is_better") for e in entries.values()
                        if e and e.get("higher_is_better") is not None]
            hib = bool(hib_vals[0]) if hib_vals else m.lower() != "ter"
            values = [_number(e.get("value")) for e in entries.values() if e]
            values = [v for v in values if v is not None]
            scale = 1.0 if m.lower() in PERCENT_METRICS else (
                10.0 if ref.get("kind") == "judged" and m.startswith("score") else
                100.0 if values and all(0.0 <= v <= 1.0 for v in values) else 1.0)
            per_run: dict[str, Any] = {}
            for lab, e in entries.items():
                if e is None or _number(e.get("value")) is None:
                    per_run[lab] = None
                else:
                    per_run[lab] = {"value": _number(e.get("value")),
                                    "stderr": _number(e.get("stderr"))}
            disp = {lab: (v["value"] * scale if v else None) for lab, v in per_run.items()}
            metrics[m] = {
                "higher_is_better": hib, "scale": scale, "runs": per_run,
                "display": disp,
                "delta": {lab: _delta(disp[lab], disp[base]) for lab in labels[1:]},
            }
            if m == primary:
                metrics[m]["paired"] = paired_deltas(runs, tname, m)
        asked = {r.label: how_asked(r.tasks[tname]) for r in have}
        if len(set(asked.values())) > 1:
            warns.append(f"{tname}: the runs asked it differently ("
                         + ", ".join(f"{k}: {v or 'default'}" for k, v in asked.items())
                         + "); its deltas compare different measurements.")
        tasks[tname] = {
            "language": language, "category": category, "primary": primary,
            "asked": asked[have[0].label],
            "kind": ref.get("kind"), "section": _section(language, category),
            "n": ns, "n_mismatch": n_mismatch, "missing_in": missing, "metrics": metrics,
        }

    # --- category averages per language (ko, en), over primary metrics
    excluded = [t for t, d in tasks.items()
                if d["section"] != "translation" and d["language"] in LANGS
                and not d["metrics"][d["primary"]]["higher_is_better"]]
    categories: dict[str, dict[str, Any]] = {}
    for lang in LANGS:
        cats = sorted({d["category"] for t, d in tasks.items()
                       if d["language"] == lang and t not in excluded}, key=category_key)
        rows: dict[str, Any] = {}
        for cat in cats:
            members = [t for t, d in tasks.items() if d["language"] == lang
                       and d["category"] == cat and t not in excluded]
            rows[cat] = _averages(labels, {t: tasks[t]["metrics"][tasks[t]["primary"]]["display"]
                                           for t in members})
        categories[lang] = rows

    # macro average per language: mean of that run's category means
    macro: dict[str, Any] = {}
    for lang, rows in categories.items():
        if not rows:
            continue
        cells = {}
        for lab in labels:
            means = [row[lab]["mean"] for row in rows.values() if row[lab]["mean"] is not None]
            covered = sorted(t for row in rows.values() for t in row[lab]["tasks"])
            cells[lab] = {"mean": _mean(means), "tasks": covered}
        _finish_deltas(labels, cells)
        macro[lang] = cells

    # --- translation, per direction, chrF and BLEU means
    translation: dict[str, Any] = {}
    directions = sorted({d["language"] for d in tasks.values() if d["section"] == "translation"},
                        key=language_key)
    for direction in directions:
        per_metric = {}
        for mkey, _ in TRANSLATION_METRICS:
            members = {}
            for t, d in tasks.items():
                if d["language"] != direction:
                    continue
                for m, md in d["metrics"].items():
                    if m.lower() == mkey:
                        members[t] = md["display"]
            if members:
                per_metric[mkey] = _averages(labels, members)
        translation[direction] = per_metric

    return {
        "format": FORMAT,
        "title": title or "Evaluation report",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "baseline": base,
        "checkpoints": [{
            "label": r.label, "run_dir": str(r.dir.resolve()), "name": r.name,
            "path": r.model.get("path"), "kind": r.model.get("kind"), "step": r.model.get("step"),
            "limit": r.limit, "created": r.created, "hcx_version": r.hcx_version,
            "tasks": len(r.tasks),
        } for r in runs],
        "tasks": tasks,
        "categories": categories,
        "macro": macro,
        "translation": translation,
        "excluded_from_averages": excluded,
        "missing_tasks": missing_notes,
        "judged": judged_categories(runs, order),
        "warnings": warns,
    }


def how_asked(entry: dict) -> str:
    """How a task was asked when not the plain way (choices scored by log-likelihood,
    greedy generation), in words: ``generated answer, shuffled, CoT``, ``8 samples, T=0.6,
    top-p 0.95``; empty for the plain way."""
    parts = []
    if entry.get("mode") == "generate":
        parts.append("generated answer")
        if entry.get("shuffle_seed") is not None:
            parts.append("options shuffled")
        if entry.get("cot"):
            parts.append("CoT")
    if (entry.get("samples") or 1) > 1:
        parts.append(f"{entry['samples']} samples, T={entry.get('temperature', 0):g}")
        if (entry.get("top_p") or 1.0) < 1.0:
            parts.append(f"top-p {entry['top_p']:g}")
    judge = ((entry.get("judging") or {}).get("judge") or {}).get("name")
    if judge:
        parts.append(f"judged by {judge}")
    return ", ".join(parts)


def judged_categories(runs: list[Run], order: list[str]) -> dict[str, Any]:
    """Per judged task, its per-category score (1-10) in every run that has it:
    ``{task: {"categories": [...], "runs": {label: {category: value or None}}}}``."""
    out: dict[str, Any] = {}
    for tname in order:
        per_run: dict[str, dict[str, float | None]] = {}
        for r in runs:
            entry = r.tasks.get(tname)
            if not entry or entry.get("kind") != "judged":
                continue
            groups = (entry.get("breakdown") or {}).get("category", {}).get("groups", {})
            per_run[r.label] = {g: _number((v.get("score") or {}).get("value"))
                                for g, v in groups.items() if isinstance(v, dict)}
        if any(per_run.values()):
            cats = list(dict.fromkeys(c for groups in per_run.values() for c in groups))
            out[tname] = {"categories": cats,
                          "runs": {r.label: {c: per_run.get(r.label, {}).get(c) for c in cats}
                                   for r in runs}}
    return out


def _averages(labels: list[str], members: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """Per run: the mean over the member tasks it has, which tasks, and the delta."""
    cells = {}
    for lab in labels:
        have = {t: disp[lab] for t, disp in members.items() if disp.get(lab) is not None}
        cells[lab] = {"mean": _mean(list(have.values())), "tasks": sorted(have)}
    _finish_deltas(labels, cells)
    return cells


def _finish_deltas(labels: list[str], cells: dict[str, dict[str, Any]]) -> None:
    base = cells[labels[0]]
    for lab in labels:
        c = cells[lab]
        if lab == labels[0]:
            c["delta"], c["differs_from_baseline"] = None, False
        else:
            c["delta"] = _delta(c["mean"], base["mean"])
            c["differs_from_baseline"] = (c["mean"] is not None and base["mean"] is not None
                                          and c["tasks"] != base["tasks"])


def language_key(lang: str) -> tuple:
    """Sort key of languages and translation directions: Korean, English, then the rest."""
    order = ["ko", "en", "ko-en", "en-ko"]
    return (order.index(lang), "") if lang in order else (len(order), lang)


NOISE_P = 0.05  # a delta whose paired test gives p >= this is marked as within noise


def paired_deltas(runs: list[Run], task: str, metric: str) -> dict[str, dict]:
    """Per non-baseline run, the paired test of its per-example scores against the
    baseline's on the same examples (McNemar for 0/1 scores, else a paired bootstrap):
    ``{label: {"test", "p", "noise"}}``; runs without comparable per-example scores are
    left out."""
    base = per_example(runs[0], task, metric) if task in runs[0].tasks else None
    out: dict[str, dict] = {}
    if base is None:
        return out
    for run in runs[1:]:
        mine = per_example(run, task, metric) if task in run.tasks else None
        if mine is None or mine[0] != base[0]:
            continue  # other examples (another --limit, another task version)
        test, p = paired_test(base[1], mine[1])
        out[run.label] = {"test": test, "p": p, "noise": p >= NOISE_P}
    return out
