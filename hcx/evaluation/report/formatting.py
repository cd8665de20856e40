"""How the report's numbers, labels and notes read, and the order its sections list
tasks in: one place for what the Markdown page, the HTML page and the plots share, so
that the three show the same text."""

from __future__ import annotations

from typing import Any

from hcx.evaluation.report.merge import LANGS, category_key, language_key

LANG_SHORT = {"ko": "KO", "en": "EN"}
SECTIONS = [("ko", "Korean tasks · 한국어"), ("en", "English tasks · 영어"),
            ("translation", "Translation · 번역"), ("safety", "Safety · 안전성"),
            ("other", "Other tasks")]
DASH = "—"
MINUS = "\u2212"
DAGGER = "†"


def score_text(x: float | None) -> str:
    return DASH if x is None else f"{x:.1f}"


def delta_text(d: float | None) -> str:
    """A signed delta at the tables' precision; one that rounds to zero reads 0.0."""
    if d is None:
        return ""
    r = round(d, 1)
    if r == 0:
        return "0.0"
    return f"+{r:.1f}" if r > 0 else f"{MINUS}{-r:.1f}"


NOISE = "≈"  # marks a delta within noise by its paired test


def noise_mark(metric: dict, label: str) -> str:
    """``≈`` after a delta whose paired test (same examples) finds no significant change."""
    return NOISE if metric.get("paired", {}).get(label, {}).get("noise") else ""


def delta_verdict(d: float | None, higher_is_better: bool) -> str:
    """``better``, ``worse`` or ``same`` (what rounds to 0.0 is the same)."""
    if d is None or round(d, 1) == 0:
        return "same"
    return "better" if (d > 0) == higher_is_better else "worse"


def value_with_stderr(run: dict | None, scale: float) -> str:
    """One run's metric on the display scale, ``value ± stderr``."""
    if run is None:
        return DASH
    s = score_text(run["value"] * scale)
    if run.get("stderr") is not None:
        s += f" ± {run['stderr'] * scale:.1f}"
    return s


def direction_text(lang: str) -> str:
    return lang.replace("-", "→")


def examples_text(task: dict) -> str:
    """The examples a task scored: one number, or every run's with a warning sign when
    they differ."""
    ns = [n for n in task["n"].values() if n is not None]
    if not ns:
        return DASH
    if task["n_mismatch"]:
        return "/".join(str(task["n"][k]) if task["n"][k] is not None else DASH
                        for k in task["n"]) + " ⚠"
    return str(ns[0])


def metric_label(m: str, md: dict, primary: str) -> str:
    s = m + (" ↓" if not md["higher_is_better"] else "")
    return s + (" *" if m == primary else "")


def text_or_dash(x: Any, none: str = DASH) -> str:
    return none if x is None else str(x)


def section_tasks(data: dict, section: str) -> list[str]:
    ts = [t for t, d in data["tasks"].items() if d["section"] == section]
    return sorted(ts, key=lambda t: (category_key(data["tasks"][t]["category"]),
                                     language_key(data["tasks"][t]["language"]), t))


def sections_with_tasks(data: dict) -> list[tuple[str, list[str]]]:
    """The task sections in report order, as (heading, tasks); empty sections left out."""
    out = [(heading, section_tasks(data, section)) for section, heading in SECTIONS]
    return [(heading, tnames) for heading, tnames in out if tnames]


def summary_categories(data: dict) -> list[str]:
    """The rows of the summary table: every category either language averages."""
    return sorted({c for lang in LANGS for c in data["categories"][lang]}, key=category_key)


def footnotes(data: dict) -> list[str]:
    """What the summary tables need said under them: unlike-for-like averages, tasks
    missing from some runs, tasks left out of the averages."""
    notes = []
    if any(c.get("differs_from_baseline") for lang in data["categories"].values()
           for row in lang.values() for c in row.values()) or any(
            c.get("differs_from_baseline") for cells in data["macro"].values()
            for c in cells.values()) or any(
            c.get("differs_from_baseline") for pm in data["translation"].values()
            for row in pm.values() for c in row.values()):
        notes.append(f"{DAGGER} averaged over a different task set than the baseline's, so its "
                     "delta is not like-for-like.")
    if any(v.get("noise") for task in data["tasks"].values() for m in task["metrics"].values()
           for v in m.get("paired", {}).values()):
        notes.append(f"{NOISE} within noise: on the same examples, the paired test (McNemar for "
                     "right/wrong scores, else a paired bootstrap) gives p ≥ 0.05 against the "
                     "baseline.")
    if data["missing_tasks"]:
        notes.append("Tasks not in every run: " + "; ".join(data["missing_tasks"]) + ".")
    if data["excluded_from_averages"]:
        notes.append("Not averaged (primary metric lower-is-better): "
                     + ", ".join(data["excluded_from_averages"]) + ".")
    return notes
