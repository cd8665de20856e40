"""``report.md``: header, warnings, summary tables and per-language task tables."""

from __future__ import annotations

from typing import Any

from hcx.evaluation.report.formatting import (
    DAGGER, DASH, LANG_SHORT, delta_text, direction_text, examples_text, footnotes, noise_mark,
    metric_label, score_text, sections_with_tasks, summary_categories, text_or_dash,
    value_with_stderr)
from hcx.evaluation.report.merge import LANGS, TRANSLATION_METRICS


#: The judged tasks' category chart, written beside report.md when there are any.
JUDGED_PNG = "judged_categories.png"


def judged_value(x: float | None) -> str:
    """A judge score on its own 1-10 scale."""
    return DASH if x is None else f"{x:.2f}"


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
    s = score_text(cell["mean"])
    if cell.get("differs_from_baseline"):
        s += DAGGER
    if not is_base and cell["delta"] is not None:
        s += f" ({delta_text(cell['delta'])})"
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
                         [[c["label"], c["name"], c["kind"] or DASH, text_or_dash(c["step"]),
                           text_or_dash(c["limit"], "none"), str(c["tasks"]),
                           text_or_dash(c["path"]), c["run_dir"]] for c in data["checkpoints"]],
                         ["l"] * 3 + ["r"] * 3 + ["l"] * 2))
    out.append("")
    if data["warnings"]:
        out.append("> **⚠ WARNING — read before quoting these numbers**")
        out.append(">")
        out += [f"> - {w}" for w in data["warnings"]]
        out.append("")

    out += ["## Summary", "", "Category averages of each task's primary metric."]
    out.append("")
    cats = summary_categories(data)
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
            row = [direction_text(direction)]
            for lab in labels:
                for mkey, _ in TRANSLATION_METRICS:
                    cell = per_metric.get(mkey, {}).get(lab)
                    row.append(_md_avg(cell, lab == base) if cell else DASH)
            rows.append(row)
        out.append(_md_table(header, rows))
        out.append("")
    notes = footnotes(data)
    out += [f"- {n}" for n in notes] + ([""] if notes else [])

    for heading, tnames in sections_with_tasks(data):
        out += [f"## {heading}", ""]
        header = ["Task", "Lang", "Category", "n", "Metric"] + labels
        rows = []
        for t in tnames:
            d = data["tasks"][t]
            for m, md in d["metrics"].items():
                name = f"{t} ({d['asked']})" if d.get("asked") else t
                row = [name, direction_text(d["language"]), d["category"], examples_text(d),
                       metric_label(m, md, d["primary"])]
                for lab in labels:
                    s = value_with_stderr(md["runs"][lab], md["scale"])
                    if lab != base and md["runs"][lab] is not None and md["delta"][lab] is not None:
                        s += f" ({delta_text(md['delta'][lab])}{noise_mark(md, lab)})"
                    row.append(s)
                rows.append(row)
        out.append(_md_table(header, rows, ["l"] * 5 + ["r"] * len(labels)))
        out.append("")
    if data.get("judged"):
        out += ["## Judged tasks by category", "",
                "Each question category's mean judge score, on the judge's 1-10 scale (the "
                "tables above show judged scores ×10).", ""]
        for task, d in data["judged"].items():
            out += [f"**{task}**", ""]
            out.append(_md_table(["Category"] + labels,
                                 [[c] + [judged_value(d["runs"][lab][c]) for lab in labels]
                                  for c in d["categories"]]))
            out.append("")
        out += [f"![score per category of the judged tasks]({JUDGED_PNG})", ""]
    out.append("`*` primary metric; `↓` lower is better; value ± standard error; "
               f"{DASH} task not run.")
    out.append("")
    return "\n".join(out)
