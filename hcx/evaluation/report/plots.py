"""The report's charts, drawn with matplotlib as base64 PNGs for the HTML page:
category averages (Korean and English panels), each task's primary metric, and the
judged tasks' (MT-Bench's) score per question category."""

from __future__ import annotations

import base64
import io
import os
import re

from hcx.evaluation.report.merge import LANGS
from hcx.evaluation.report.formatting import sections_with_tasks

#: Bar colours of the plots, one per checkpoint in run order (matplotlib's tab10).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def run_colours(labels: list[str]) -> dict[str, str]:
    """Each run's colour, by label in run order: its bars, and its swatch in the HTML page."""
    return {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}


_CJK_FONTS = ["Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "NanumBarunGothic",
              "Source Han Sans KR", "UnDotum", "Malgun Gothic", "Apple SD Gothic Neo",
              "AppleGothic", "Noto Sans CJK JP", "Noto Sans CJK SC"]
# Fonts installed after matplotlib built its font cache are not in it: look for these too.
_CJK_FILES = ["/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
              "/usr/share/fonts/truetype/nanum/NanumBarunGothic.ttf",
              "/usr/share/fonts/truetype/unfonts-core/UnDotum.ttf"]


def cjk_font() -> str | None:
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


def plot_label(s: str, cjk: bool) -> str:
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
    """base64 PNGs: ``categories`` (KO and EN panels), ``tasks`` (per-task primary) and,
    when judged tasks were run, ``judged`` (their per-category scores)."""
    from hcx.errors import require

    matplotlib = require("matplotlib", "eval", purpose="the report's plots")
    from matplotlib.figure import Figure  # Agg canvas on savefig; pyplot's backend untouched

    labels = [c["label"] for c in data["checkpoints"]]
    colours = run_colours(labels)
    font = cjk_font()
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
                           color=colours[lab], label=plot_label(lab, cjk) if ax is axes[0]
                           else None)
                ax.set_xticks(range(len(cats)), [plot_label(c, cjk) for c in cats],
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
        tnames = [t for _, tasks in sections_with_tasks(data) for t in tasks]
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
                ax.barh(ys, xs, height * 0.92, color=colours[lab], label=plot_label(lab, cjk))
            ticks = []
            for t in tnames:
                d = data["tasks"][t]
                md = d["metrics"][d["primary"]]
                arrow = " (lower=better)" if not md["higher_is_better"] else ""
                ticks.append(plot_label(f"[{d['language']}] {t}: {d['primary']}{arrow}", cjk))
            ax.set_yticks(range(len(tnames)), ticks)
            ax.set_ylim(len(tnames) - 0.5, -0.5)
            ax.set_xlabel("primary metric (0-100)")
            ax.grid(axis="x", alpha=0.3)
            ax.set_axisbelow(True)
            ax.set_title("Primary metric per task", fontsize=11)
            fig.legend(loc="outside upper center", ncols=len(labels), frameon=False)
            pngs["tasks"] = _png(fig)

        if data.get("judged"):
            pngs["judged"] = _png(_judged_figure(data["judged"], labels, colours, cjk))
    return pngs


def _judged_figure(judged: dict, labels: list[str], colours: dict[str, str], cjk: bool):
    """One panel per judged task: its score per question category (the judge's 1-10
    scale), a bar per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.5, 4.2 * len(judged)), layout="constrained")
    axes = fig.subplots(len(judged), 1, squeeze=False)[:, 0]
    width = 0.8 / len(labels)
    for ax, (task, d) in zip(axes, judged.items()):
        cats = d["categories"]
        for i, lab in enumerate(labels):
            pts = [(j - 0.4 + width * (i + 0.5), d["runs"][lab][c]) for j, c in enumerate(cats)]
            pts = [(x, y) for x, y in pts if y is not None]
            ax.bar([x for x, _ in pts], [y for _, y in pts], width * 0.92, color=colours[lab],
                   label=plot_label(lab, cjk) if ax is axes[0] else None)
        ax.set_xticks(range(len(cats)), [plot_label(c, cjk) for c in cats])
        ax.set_xlim(-0.6, len(cats) - 0.4)
        ax.set_ylim(0, 10)
        ax.set_ylabel("judge score (1-10)")
        ax.set_title(f"{task}: score per category", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.legend(loc="outside upper center", ncols=len(labels), frameon=False)
    return fig
