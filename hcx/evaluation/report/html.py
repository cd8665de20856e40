"""``report.html``: one self-contained page (inline CSS, the plots as base64 PNG ``data:``
URIs; no script, no external URL, no web font), rendered from the Jinja2 template
``hcx/evaluation/templates/report.html.j2``, shipped as package data."""

from __future__ import annotations

import functools

from hcx.evaluation.report.formatting import (
    DAGGER, DASH, LANG_SHORT, delta_text, delta_verdict, direction_text, examples_text,
    footnotes, metric_label, noise_mark, score_text, sections_with_tasks, summary_categories,
    text_or_dash, value_with_stderr)
from hcx.evaluation.report.markdown import judged_value
from hcx.evaluation.report.merge import LANGS, TRANSLATION_METRICS
from hcx.evaluation.report.plots import run_colours

TEMPLATE = "report.html.j2"

# The text helpers report.md uses, as template filters: both pages print the same numbers.
FILTERS = {f.__name__: f for f in (delta_text, delta_verdict, direction_text, examples_text,
                                   metric_label, noise_mark, score_text, text_or_dash,
                                   value_with_stderr, judged_value)}


@functools.cache
def _environment():
    """Built once. Autoescaped: every value from the run directories (titles, labels, task
    names, warnings) is escaped as html.escape escaped it before the page had a template.
    Undefined names raise, so that a misspelt field fails instead of printing nothing.
    Block tags leave no blank lines, so that the template can be laid out readably."""
    from hcx.errors import require

    jinja2 = require("jinja2", "eval", package="Jinja2", purpose="the report's HTML page")
    env = jinja2.Environment(loader=jinja2.PackageLoader("hcx.evaluation", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(FILTERS)
    return env


def render_html(data: dict, pngs: dict[str, str]) -> str:
    """The page for the merged data (``merge_runs``) and the plots (``render_plots``)."""
    labels = [c["label"] for c in data["checkpoints"]]
    return _environment().get_template(TEMPLATE).render(
        data=data, labels=labels, base=data["baseline"], colours=run_colours(labels),
        languages=list(LANGS), lang_short=LANG_SHORT, categories=summary_categories(data),
        translation_metrics=TRANSLATION_METRICS, notes=footnotes(data),
        sections=sections_with_tasks(data), pngs=pngs, dash=DASH, dagger=DAGGER)
