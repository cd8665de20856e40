"""The bilingual evaluation report: Korean and English side by side, the way the
HyperCLOVA X technical report lays out its results.

``build_report(run_dirs, out_dir)`` reads the ``scores.json`` of each evaluation run
directory (written by ``hcx eval``), the FIRST one being the baseline, and writes three
files into ``out_dir``:

* ``report.md``   - Markdown: header, warnings, summary tables, per-language task tables;
* ``report.html`` - one self-contained page (inline CSS, the plots as base64 PNG ``data:``
  URIs; no script, no external URL, no web font);
* ``report.json`` - the merged data (see ``merge_runs``).

Scales. Metrics whose values all lie in 0..1 (accuracies, exact match, ...) are shown
x100, so that every number in the tables and averages is on a 0-100 scale; BLEU, chrF and
TER are 0..100 already. ``report.json`` keeps each metric's raw ``value``/``stderr`` as
in ``scores.json`` plus the ``scale`` applied for display; category means and all deltas
in it are on the display (0-100) scale.

Category averages are the mean of each task's primary metric (display scale) over the
tasks a run has in that category and language; a task whose primary metric is
lower-is-better is left out of averages (it is listed as such). Deltas are the displayed
value minus the baseline's displayed value; a dagger marks an average whose task set
differs from the baseline's (a task missing from either run), so that delta is not
like-for-like.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hcx.errors import HcxError
from hcx.files import write_text_atomic

__all__ = ["ReportError", "Run", "load_run", "merge_runs", "build_report", "PALETTE"]

SCORES = "scores.json"
FORMAT = 1

#: Bar colours of the plots, one per checkpoint in run order (matplotlib's tab10).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

# Metrics on a 0..100 scale already (sacrebleu's); every other metric whose values all lie
# in [0, 1] is multiplied by 100 for display.
PERCENT_METRICS = {"bleu", "chrf", "chrf++", "ter", "sacrebleu"}

CATEGORY_ORDER = ["knowledge", "reasoning", "commonsense", "reading", "nli", "math", "code",
                  "instruction", "truthfulness", "safety"]
LANGS = {"ko": "Korean · 한국어", "en": "English · 영어"}
LANG_SHORT = {"ko": "KO", "en": "EN"}
SECTIONS = [("ko", "Korean tasks · 한국어"), ("en", "English tasks · 영어"),
            ("translation", "Translation · 번역"), ("safety", "Safety · 안전성"),
            ("other", "Other tasks")]
TRANSLATION_METRICS = [("chrf", "chrF"), ("bleu", "BLEU")]
DASH = "—"
MINUS = "\u2212"
DAGGER = "†"


class ReportError(HcxError, ValueError):
    """An evaluation run directory that cannot be read, or a report that cannot be built."""


# ----------------------------------------------------------------------------- loading

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


def _number(x: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def load_run(path: str | os.PathLike) -> Run:
    """Read and check one run directory's ``scores.json`` (``path`` may also name the file)."""
    path = Path(path)
    if path.is_file():
        file, run_dir = path, path.parent
    elif path.is_dir():
        file, run_dir = path / SCORES, path
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


# ----------------------------------------------------------------------------- merging

def _section(language: str, category: str) -> str:
    if "-" in language:
        return "translation"
    if category == "safety":
        return "safety"
    return language if language in LANGS else "other"


def _category_key(cat: str) -> tuple:
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
        tasks[tname] = {
            "language": language, "category": category, "primary": primary,
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
                       if d["language"] == lang and t not in excluded}, key=_category_key)
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
                        key=_lang_key)
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
        "warnings": warns,
    }


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


# ----------------------------------------------------------------------------- formatting

def _fmt(x: float | None) -> str:
    return DASH if x is None else f"{x:.1f}"


def _fmt_delta(d: float | None) -> str:
    if d is None:
        return ""
    r = round(d, 1)
    if r == 0:
        return "0.0"
    return f"+{r:.1f}" if r > 0 else f"{MINUS}{-r:.1f}"


def _verdict(d: float | None, higher_is_better: bool) -> str:
    if d is None or round(d, 1) == 0:
        return "same"
    return "better" if (d > 0) == higher_is_better else "worse"


def _value_pm(run: dict | None, scale: float) -> str:
    if run is None:
        return DASH
    s = _fmt(run["value"] * scale)
    if run.get("stderr") is not None:
        s += f" ± {run['stderr'] * scale:.1f}"
    return s


def _direction(lang: str) -> str:
    return lang.replace("-", "→")


def _n_text(task: dict) -> str:
    ns = [n for n in task["n"].values() if n is not None]
    if not ns:
        return DASH
    if task["n_mismatch"]:
        return "/".join(str(task["n"][k]) if task["n"][k] is not None else DASH
                        for k in task["n"]) + " ⚠"
    return str(ns[0])


def _metric_label(m: str, md: dict, primary: str) -> str:
    s = m + (" ↓" if not md["higher_is_better"] else "")
    return s + (" *" if m == primary else "")


def _lang_key(lang: str) -> tuple:
    order = ["ko", "en", "ko-en", "en-ko"]
    return (order.index(lang), "") if lang in order else (len(order), lang)


def _section_tasks(data: dict, section: str) -> list[str]:
    ts = [t for t, d in data["tasks"].items() if d["section"] == section]
    return sorted(ts, key=lambda t: (_category_key(data["tasks"][t]["category"]),
                                     _lang_key(data["tasks"][t]["language"]), t))


# ----------------------------------------------------------------------------- markdown

def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_avg(cell: dict, is_base: bool) -> str:
    if cell["mean"] is None:
        return DASH
    s = _fmt(cell["mean"])
    if cell.get("differs_from_baseline"):
        s += DAGGER
    if not is_base and cell["delta"] is not None:
        s += f" ({_fmt_delta(cell['delta'])})"
    return s


def render_markdown(data: dict) -> str:
    labels = [c["label"] for c in data["checkpoints"]]
    base = data["baseline"]
    out = [f"# {data['title']}", "",
           f"Generated {data['generated']} by hcx. Baseline for deltas: **{base}** "
           "(the first run). Scores are on a 0-100 scale (0..1 metrics ×100); "
           "deltas are against the baseline.", ""]
    out.append("## Checkpoints")
    out.append("")
    out.append(_md_table(["", "name", "kind", "step", "limit", "tasks", "path", "run"],
                         [[c["label"], c["name"], c["kind"] or DASH, _str(c["step"]),
                           _str(c["limit"], "none"), str(c["tasks"]), _str(c["path"]),
                           c["run_dir"]] for c in data["checkpoints"]],
                         ["l"] * 3 + ["r"] * 3 + ["l"] * 2))
    out.append("")
    if data["warnings"]:
        out.append("> **⚠ WARNING — read before quoting these numbers**")
        out.append(">")
        out += [f"> - {w}" for w in data["warnings"]]
        out.append("")

    out += ["## Summary", "", "Category averages of each task's primary metric."]
    out.append("")
    cats = sorted({c for lang in LANGS for c in data["categories"][lang]}, key=_category_key)
    if cats:
        header = ["Category"]
        for lab in labels:
            header += [f"{lab} {LANG_SHORT[lang]}" for lang in LANGS]
        rows = []
        for cat in cats:
            row = [cat]
            for lab in labels:
                for lang in LANGS:
                    cell = data["categories"][lang].get(cat, {}).get(lab)
                    row.append(_md_avg(cell, lab == base) if cell else DASH)
            rows.append(row)
        if data["macro"]:
            row = ["**average**"]
            for lab in labels:
                for lang in LANGS:
                    cell = data["macro"].get(lang, {}).get(lab)
                    row.append(_md_avg(cell, lab == base) if cell else DASH)
            rows.append(row)
        out.append(_md_table(header, rows))
        out.append("")
    if data["translation"]:
        header = ["Translation"]
        for lab in labels:
            header += [f"{lab} {name}" for _, name in TRANSLATION_METRICS]
        rows = []
        for direction, per_metric in data["translation"].items():
            row = [_direction(direction)]
            for lab in labels:
                for mkey, _ in TRANSLATION_METRICS:
                    cell = per_metric.get(mkey, {}).get(lab)
                    row.append(_md_avg(cell, lab == base) if cell else DASH)
            rows.append(row)
        out.append(_md_table(header, rows))
        out.append("")
    out += _notes(data, md=True)

    for section, heading in SECTIONS:
        tnames = _section_tasks(data, section)
        if not tnames:
            continue
        out += [f"## {heading}", ""]
        header = ["Task", "Lang", "Category", "n", "Metric"] + labels
        rows = []
        for t in tnames:
            d = data["tasks"][t]
            for m, md in d["metrics"].items():
                row = [t, _direction(d["language"]), d["category"], _n_text(d),
                       _metric_label(m, md, d["primary"])]
                for lab in labels:
                    s = _value_pm(md["runs"][lab], md["scale"])
                    if lab != base and md["runs"][lab] is not None and md["delta"][lab] is not None:
                        s += f" ({_fmt_delta(md['delta'][lab])})"
                    row.append(s)
                rows.append(row)
        out.append(_md_table(header, rows, ["l"] * 5 + ["r"] * len(labels)))
        out.append("")
    out.append("`*` primary metric; `↓` lower is better; value ± standard error; "
               f"{DASH} task not run.")
    out.append("")
    return "\n".join(out)


def _str(x: Any, none: str = DASH) -> str:
    return none if x is None else str(x)


def _notes(data: dict, md: bool) -> list[str]:
    notes = []
    if any(c.get("differs_from_baseline") for lang in data["categories"].values()
           for row in lang.values() for c in row.values()) or any(
            c.get("differs_from_baseline") for cells in data["macro"].values()
            for c in cells.values()) or any(
            c.get("differs_from_baseline") for pm in data["translation"].values()
            for row in pm.values() for c in row.values()):
        notes.append(f"{DAGGER} averaged over a different task set than the baseline's, so its "
                     "delta is not like-for-like.")
    if data["missing_tasks"]:
        notes.append("Tasks not in every run: " + "; ".join(data["missing_tasks"]) + ".")
    if data["excluded_from_averages"]:
        notes.append("Not averaged (primary metric lower-is-better): "
                     + ", ".join(data["excluded_from_averages"]) + ".")
    if not md:
        return notes
    return [f"- {n}" for n in notes] + ([""] if notes else [])


# ----------------------------------------------------------------------------- plots

_CJK_FONTS = ["Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "NanumBarunGothic",
              "Source Han Sans KR", "UnDotum", "Malgun Gothic", "Apple SD Gothic Neo",
              "AppleGothic", "Noto Sans CJK JP", "Noto Sans CJK SC"]
# Fonts installed after matplotlib built its font cache are not in it: look for these too.
_CJK_FILES = ["/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
              "/usr/share/fonts/truetype/nanum/NanumBarunGothic.ttf",
              "/usr/share/fonts/truetype/unfonts-core/UnDotum.ttf"]


def _cjk_font() -> str | None:
    """A Hangul-capable font matplotlib can use, or None (then plot labels stay ASCII)."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    found = next((n for n in _CJK_FONTS if n in names), None)
    if found:
        return found
    for path in _CJK_FILES:
        if os.path.isfile(path):
            try:
                font_manager.fontManager.addfont(path)
                return font_manager.FontProperties(fname=path).get_name()
            except Exception:  # an unreadable font file: keep looking, ASCII labels at worst
                continue
    return None


def _plot_label(s: str, cjk: bool) -> str:
    """ASCII unless a Hangul-capable font is available (no missing-glyph warnings)."""
    if cjk or s.isascii():
        return s
    ascii_s = re.sub(r"[^\x20-\x7e]+", "?", s)
    return ascii_s


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_plots(data: dict) -> dict[str, str]:
    """base64 PNGs: ``categories`` (KO and EN panels) and ``tasks`` (per-task primary)."""
    from hcx.errors import require

    matplotlib = require("matplotlib", "eval", purpose="the report's plots")
    from matplotlib.figure import Figure  # Agg canvas on savefig; pyplot's backend untouched

    labels = [c["label"] for c in data["checkpoints"]]
    colours = {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}
    font = _cjk_font()
    cjk = font is not None
    rc = {"font.size": 10, "axes.spines.top": False, "axes.spines.right": False}
    if font:
        rc["font.family"] = ["DejaVu Sans", font]  # Latin from DejaVu, Hangul falls back
    pngs: dict[str, str] = {}
    with matplotlib.rc_context(rc):
        # --- category averages, Korean and English panels side by side
        langs = [lang for lang in LANGS if data["categories"][lang]]
        if langs:
            ncats = [len(data["categories"][lang]) for lang in langs]
            fig = Figure(figsize=(11.5, 4.6), layout="constrained")
            axes = fig.subplots(1, len(langs), squeeze=False, sharey=True,
                                width_ratios=[max(n, 2) for n in ncats])[0]
            width = 0.8 / len(labels)
            for ax, lang in zip(axes, langs):
                rows = data["categories"][lang]
                cats = list(rows)
                for i, lab in enumerate(labels):
                    xs = [j - 0.4 + width * (i + 0.5) for j in range(len(cats))]
                    ys = [rows[c][lab]["mean"] for c in cats]
                    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                    ax.bar([p[0] for p in pts], [p[1] for p in pts], width * 0.92,
                           color=colours[lab], label=_plot_label(lab, cjk) if ax is axes[0]
                           else None)
                ax.set_xticks(range(len(cats)), [_plot_label(c, cjk) for c in cats],
                              rotation=15 if max(map(len, cats)) > 8 else 0)
                ax.set_xlim(-0.6, len(cats) - 0.4)
                ax.set_title("Korean (KO)" if lang == "ko" else "English (EN)", fontsize=11)
                ax.set_ylim(0, 100)
                ax.grid(axis="y", alpha=0.3)
                ax.set_axisbelow(True)
            axes[0].set_ylabel("category average (0-100)")
            fig.legend(loc="outside upper center", ncols=len(labels), frameon=False)
            pngs["categories"] = _png(fig)

        # --- per-task primary metric, horizontal grouped bars
        tnames = [t for sec, _ in SECTIONS for t in _section_tasks(data, sec)]
        if tnames:
            per_task = 0.13 * len(labels) + 0.12
            fig = Figure(figsize=(11.5, 1.3 + per_task * len(tnames)), layout="constrained")
            ax = fig.subplots()
            height = 0.8 / len(labels)
            for i, lab in enumerate(labels):
                ys, xs = [], []
                for j, t in enumerate(tnames):
                    d = data["tasks"][t]
                    v = d["metrics"][d["primary"]]["display"][lab]
                    if v is not None:
                        ys.append(j - 0.4 + height * (i + 0.5))
                        xs.append(v)
                ax.barh(ys, xs, height * 0.92, color=colours[lab], label=_plot_label(lab, cjk))
            ticks = []
            for t in tnames:
                d = data["tasks"][t]
                md = d["metrics"][d["primary"]]
                arrow = " (lower=better)" if not md["higher_is_better"] else ""
                ticks.append(_plot_label(f"[{d['language']}] {t}: {d['primary']}{arrow}", cjk))
            ax.set_yticks(range(len(tnames)), ticks)
            ax.set_ylim(len(tnames) - 0.5, -0.5)
            ax.set_xlabel("primary metric (0-100)")
            ax.grid(axis="x", alpha=0.3)
            ax.set_axisbelow(True)
            ax.set_title("Primary metric per task", fontsize=11)
            fig.legend(loc="outside upper center", ncols=len(labels), frameon=False)
            pngs["tasks"] = _png(fig)
    return pngs


# ----------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans KR","Noto Sans CJK KR",
"NanumGothic","Apple SD Gothic Neo","Malgun Gothic","DejaVu Sans",sans-serif;
margin:24px auto;max-width:1200px;padding:0 16px;color:#1f2328;background:#fff;line-height:1.4}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:28px 0 8px;
border-bottom:2px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;font-size:13px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f4f6;font-weight:600;text-align:center}
td.l,th.l{text-align:left}
table.zebra tbody tr:nth-child(even),tr.alt{background:#f8f9fb}
tr.avg td{font-weight:600;border-top:2px solid #8c959f}
.d{font-size:12px;margin-left:4px}
.better{color:#1a7f37}.worse{color:#cf222e}.same{color:#6e7781}
.warn{border:2px solid #cf222e;background:#fff1f0;padding:8px 14px;margin:14px 0;
border-radius:6px}.warn b{color:#cf222e}
.notes{font-size:12px;color:#57606a}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.primary{font-weight:600}.flag{color:#cf222e}
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _html_avg(cell: dict | None, is_base: bool) -> str:
    if cell is None or cell["mean"] is None:
        return DASH
    s = _e(_fmt(cell["mean"]))
    if cell.get("differs_from_baseline"):
        s += DAGGER
    if not is_base and cell["delta"] is not None:
        s += (f'<span class="d {_verdict(cell["delta"], True)}">'
              f'{_e(_fmt_delta(cell["delta"]))}</span>')
    return s


def render_html(data: dict, pngs: dict[str, str]) -> str:
    labels = [c["label"] for c in data["checkpoints"]]
    base = data["baseline"]
    h = ['<!DOCTYPE html>', '<html lang="ko"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{_e(data['title'])}</title>", f"<style>{_CSS}</style></head><body>",
         f"<h1>{_e(data['title'])}</h1>",
         f'<div class="meta">Generated {_e(data["generated"])} by hcx · baseline for deltas: '
         f"<b>{_e(base)}</b> (the first run) · scores on a 0-100 scale (0..1 metrics ×100)</div>"]

    h.append('<h2>Checkpoints</h2><table class="zebra"><thead><tr>')
    h += [f'<th class="l">{x}</th>' for x in
          ["", "name", "kind", "step", "limit", "tasks", "path", "run directory"]]
    h.append("</tr></thead><tbody>")
    for i, c in enumerate(data["checkpoints"]):
        swatch = (f'<span style="display:inline-block;width:10px;height:10px;'
                  f'background:{PALETTE[i % len(PALETTE)]};margin-right:6px"></span>')
        lim = _e(_str(c["limit"], "none"))
        if c["limit"] is not None:
            lim = f'<span class="flag">{lim} ⚠</span>'
        h.append(f'<tr><td class="l">{swatch}<b>{_e(c["label"])}</b></td>'
                 f'<td class="l">{_e(c["name"])}</td><td class="l">{_e(_str(c["kind"]))}</td>'
                 f"<td>{_e(_str(c['step']))}</td><td>{lim}</td><td>{c['tasks']}</td>"
                 f'<td class="l">{_e(_str(c["path"]))}</td><td class="l">{_e(c["run_dir"])}</td>'
                 "</tr>")
    h.append("</tbody></table>")
    if data["warnings"]:
        h.append('<div class="warn"><b>⚠ WARNING — read before quoting these numbers</b><ul>')
        h += [f"<li>{_e(w)}</li>" for w in data["warnings"]]
        h.append("</ul></div>")

    # summary
    h.append("<h2>Summary · 요약</h2><p class=\"meta\">Category averages of each task's primary "
             "metric, Korean and English side by side.</p>")
    cats = sorted({c for lang in LANGS for c in data["categories"][lang]}, key=_category_key)
    if cats:
        h.append('<table class="zebra"><thead><tr><th class="l" rowspan="2">Category</th>')
        h += [f'<th colspan="{len(LANGS)}">{_e(lab)}</th>' for lab in labels]
        h.append("</tr><tr>")
        h += [f"<th>{LANG_SHORT[lang]}</th>" for _ in labels for lang in LANGS]
        h.append("</tr></thead><tbody>")
        for cat in cats:
            h.append(f'<tr><td class="l">{_e(cat)}</td>')
            h += [f"<td>{_html_avg(data['categories'][lang].get(cat, {}).get(lab), lab == base)}"
                  "</td>" for lab in labels for lang in LANGS]
            h.append("</tr>")
        if data["macro"]:
            h.append('<tr class="avg"><td class="l">average</td>')
            h += [f"<td>{_html_avg(data['macro'].get(lang, {}).get(lab), lab == base)}</td>"
                  for lab in labels for lang in LANGS]
            h.append("</tr>")
        h.append("</tbody></table>")
    if data["translation"]:
        h.append('<table class="zebra"><thead><tr>'
                 '<th class="l" rowspan="2">Translation · 번역</th>')
        h += [f'<th colspan="{len(TRANSLATION_METRICS)}">{_e(lab)}</th>' for lab in labels]
        h.append("</tr><tr>")
        h += [f"<th>{name}</th>" for _ in labels for _, name in TRANSLATION_METRICS]
        h.append("</tr></thead><tbody>")
        for direction, per_metric in data["translation"].items():
            h.append(f'<tr><td class="l">{_e(_direction(direction))}</td>')
            h += [f"<td>{_html_avg(per_metric.get(mkey, {}).get(lab), lab == base)}</td>"
                  for lab in labels for mkey, _ in TRANSLATION_METRICS]
            h.append("</tr>")
        h.append("</tbody></table>")
    notes = _notes(data, md=False)
    if notes:
        h.append('<div class="notes">' + "<br>".join(_e(n) for n in notes) + "</div>")

    if pngs:
        h.append("<h2>Charts · 그래프</h2>")
        if "categories" in pngs:
            h.append(f'<img alt="category averages, Korean and English" '
                     f'src="data:image/png;base64,{pngs["categories"]}">')
        if "tasks" in pngs:
            h.append(f'<img alt="primary metric per task" '
                     f'src="data:image/png;base64,{pngs["tasks"]}">')

    for section, heading in SECTIONS:
        tnames = _section_tasks(data, section)
        if not tnames:
            continue
        h.append(f"<h2>{_e(heading)}</h2><table><thead><tr>")
        h += [f'<th class="l">{x}</th>' for x in ["Task", "Lang", "Category", "n", "Metric"]]
        h += [f"<th>{_e(lab)}</th>" for lab in labels]
        h.append("</tr></thead><tbody>")
        for ti, t in enumerate(tnames):
            d = data["tasks"][t]
            nm = len(d["metrics"])
            first = True
            for m, md in d["metrics"].items():
                h.append('<tr class="alt">' if ti % 2 else "<tr>")
                if first:
                    n_txt = _e(_n_text(d))
                    if d["n_mismatch"]:
                        n_txt = f'<span class="flag" title="runs scored different n">{n_txt}</span>'
                    h.append(f'<td class="l" rowspan="{nm}"><b>{_e(t)}</b></td>'
                             f'<td class="l" rowspan="{nm}">{_e(_direction(d["language"]))}</td>'
                             f'<td class="l" rowspan="{nm}">{_e(d["category"])}</td>'
                             f'<td rowspan="{nm}">{n_txt}</td>')
                    first = False
                cls = ' class="l primary"' if m == d["primary"] else ' class="l"'
                h.append(f"<td{cls}>{_e(_metric_label(m, md, d['primary']))}</td>")
                for lab in labels:
                    s = _e(_value_pm(md["runs"][lab], md["scale"]))
                    dl = md["delta"].get(lab) if lab != base else None
                    if md["runs"][lab] is not None and dl is not None:
                        s += (f'<span class="d {_verdict(dl, md["higher_is_better"])}">'
                              f"{_e(_fmt_delta(dl))}</span>")
                    h.append(f"<td>{s}</td>")
                h.append("</tr>")
        h.append("</tbody></table>")
    h.append('<p class="notes">* primary metric · ↓ lower is better · '
             f"value ± standard error · {DASH} task not run · deltas vs {_e(base)}: "
             '<span class="better">green better</span>, <span class="worse">red worse</span></p>')
    h.append("</body></html>")
    return "\n".join(h) + "\n"


# ----------------------------------------------------------------------------- writing

def build_report(run_dirs: list[Path], out_dir: Path, title: str | None = None) -> dict[str, Path]:
    """Compare evaluation runs (the first is the baseline) and write ``report.md``,
    ``report.html`` and ``report.json`` into ``out_dir``; returns their paths by format."""
    runs = [load_run(p) for p in run_dirs]
    data = merge_runs(runs, title)
    pngs = render_plots(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html",
             "json": out_dir / "report.json"}
    write_text_atomic(paths["json"], json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(paths["md"], render_markdown(data))
    write_text_atomic(paths["html"], render_html(data, pngs))
    return paths
