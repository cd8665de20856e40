"""``report.html``: one self-contained page (inline CSS, the plots as base64 PNG ``data:``
URIs; no script, no external URL, no web font)."""

from __future__ import annotations

import html
from typing import Any

from hcx.evaluation.report.formatting import (
    DAGGER, DASH, LANG_SHORT, delta_text, delta_verdict, direction_text, examples_text,
    footnotes, metric_label, score_text, sections_with_tasks, summary_categories, text_or_dash,
    value_with_stderr)
from hcx.evaluation.report.merge import LANGS, TRANSLATION_METRICS
from hcx.evaluation.report.plots import run_colours

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
    s = _e(score_text(cell["mean"]))
    if cell.get("differs_from_baseline"):
        s += DAGGER
    if not is_base and cell["delta"] is not None:
        s += (f'<span class="d {delta_verdict(cell["delta"], True)}">'
              f'{_e(delta_text(cell["delta"]))}</span>')
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
    colours = run_colours(labels)
    for c in data["checkpoints"]:
        swatch = (f'<span style="display:inline-block;width:10px;height:10px;'
                  f'background:{colours[c["label"]]};margin-right:6px"></span>')
        lim = _e(text_or_dash(c["limit"], "none"))
        if c["limit"] is not None:
            lim = f'<span class="flag">{lim} ⚠</span>'
        h.append(f'<tr><td class="l">{swatch}<b>{_e(c["label"])}</b></td>'
                 f'<td class="l">{_e(c["name"])}</td><td class="l">{_e(text_or_dash(c["kind"]))}</td>'
                 f"<td>{_e(text_or_dash(c['step']))}</td><td>{lim}</td><td>{c['tasks']}</td>"
                 f'<td class="l">{_e(text_or_dash(c["path"]))}</td><td class="l">{_e(c["run_dir"])}</td>'
                 "</tr>")
    h.append("</tbody></table>")
    if data["warnings"]:
        h.append('<div class="warn"><b>⚠ WARNING — read before quoting these numbers</b><ul>')
        h += [f"<li>{_e(w)}</li>" for w in data["warnings"]]
        h.append("</ul></div>")

    # summary
    h.append("<h2>Summary · 요약</h2><p class=\"meta\">Category averages of each task's primary "
             "metric, Korean and English side by side.</p>")
    cats = summary_categories(data)
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
            h.append(f'<tr><td class="l">{_e(direction_text(direction))}</td>')
            h += [f"<td>{_html_avg(per_metric.get(mkey, {}).get(lab), lab == base)}</td>"
                  for lab in labels for mkey, _ in TRANSLATION_METRICS]
            h.append("</tr>")
        h.append("</tbody></table>")
    notes = footnotes(data)
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

    for heading, tnames in sections_with_tasks(data):
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
                    n_txt = _e(examples_text(d))
                    if d["n_mismatch"]:
                        n_txt = f'<span class="flag" title="runs scored different n">{n_txt}</span>'
                    h.append(f'<td class="l" rowspan="{nm}"><b>{_e(t)}</b></td>'
                             f'<td class="l" rowspan="{nm}">{_e(direction_text(d["language"]))}</td>'
                             f'<td class="l" rowspan="{nm}">{_e(d["category"])}</td>'
                             f'<td rowspan="{nm}">{n_txt}</td>')
                    first = False
                cls = ' class="l primary"' if m == d["primary"] else ' class="l"'
                h.append(f"<td{cls}>{_e(metric_label(m, md, d['primary']))}</td>")
                for lab in labels:
                    s = _e(value_with_stderr(md["runs"][lab], md["scale"]))
                    dl = md["delta"].get(lab) if lab != base else None
                    if md["runs"][lab] is not None and dl is not None:
                        s += (f'<span class="d {delta_verdict(dl, md["higher_is_better"])}">'
                              f"{_e(delta_text(dl))}</span>")
                    h.append(f"<td>{s}</td>")
                h.append("</tr>")
        h.append("</tbody></table>")
    h.append('<p class="notes">* primary metric · ↓ lower is better · '
             f"value ± standard error · {DASH} task not run · deltas vs {_e(base)}: "
             '<span class="better">green better</span>, <span class="worse">red worse</span></p>')
    h.append("</body></html>")
    return "\n".join(h) + "\n"
