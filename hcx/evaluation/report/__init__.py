"""The bilingual evaluation report: Korean and English side by side, the way the
HyperCLOVA X technical report lays out its results.

``build_report(run_dirs, out_dir)`` reads the ``scores.json`` of each evaluation run
directory (written by ``hcx eval``), the FIRST one being the baseline, and writes three
files into ``out_dir``:

* ``report.md``   - Markdown: header, warnings, summary tables, per-language task tables;
* ``report.html`` - one self-contained page (inline CSS, the plots as base64 PNG ``data:``
  URIs; no script, no external URL, no web font);
* ``report.json`` - the merged data (see ``merge_runs``; its scales, averages and deltas
  are described in :mod:`hcx.evaluation.report.merge`);
* ``judged_categories.png`` - only when judged tasks (MT-Bench) were run: their score per
  question category, the chart report.md links to (report.html has it inline).

The modules, in the order a report is built: ``runs`` (reading and checking run
directories), ``merge`` (the data: merged tasks, averages, deltas, warnings), ``plots``
(matplotlib charts), ``markdown`` and ``html`` (the two pages; ``formatting`` holds the
text they share).
"""

from __future__ import annotations

import json
from pathlib import Path

from hcx.evaluation.report.html import render_html
from hcx.evaluation.report.markdown import JUDGED_PNG, render_markdown
from hcx.evaluation.report.merge import merge_runs
from hcx.evaluation.report.plots import PALETTE, render_plots
from hcx.evaluation.report.runs import ReportError, Run, load_run
from hcx.files import write_text_atomic

__all__ = ["ReportError", "Run", "load_run", "merge_runs", "build_report", "PALETTE",
           "render_markdown", "render_html", "render_plots"]


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
    if "judged" in pngs:
        import base64

        from hcx.files import write_bytes_atomic

        paths["judged_png"] = out_dir / JUDGED_PNG
        write_bytes_atomic(paths["judged_png"], base64.b64decode(pngs["judged"]))
    write_text_atomic(paths["json"], json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(paths["md"], render_markdown(data))
    write_text_atomic(paths["html"], render_html(data, pngs))
    return paths
