"""hcx.evaluation.report: the bilingual report from hand-written evaluation run directories,
its numbers checked against hand-computed averages and deltas, and its HTML rendered in
headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from hcx.errors import HcxError
from hcx.evaluation.report import PALETTE, ReportError, build_report, load_run


def _m(value, stderr=None, hib=True):
    return {"value": value, "stderr": stderr, "higher_is_better": hib}


def _task(language, category, primary, metrics, n=50):
    return {"language": language, "category": category, "kind": "multiple_choice", "n": n,
            "primary": primary, "seconds": 1.0, "metrics": metrics}


def _acc(language, category, value, n=50, primary="acc", **extra):
    metrics = {primary: _m(value, 0.07)}
    metrics.update({k: _m(v, 0.07) for k, v in extra.items()})
    return _task(language, category, primary, metrics, n)


def _mt(direction, chrf, bleu, ter):
    return _task(direction, "translation", "chrf",
                 {"bleu": _m(bleu, 0.5), "chrf": _m(chrf, 1.0), "ter": _m(ter, 2.0, hib=False)})


def _write_run(root: Path, name: str, step: int, limit, tasks: dict) -> Path:
    run = root / name
    (run / "samples").mkdir(parents=True)
    scores = {"format": 1,
              "model": {"name": name, "path": f"/abs/runs/{name}/checkpoints", "kind": "hcx",
                        "step": step},
              "created": "2026-11-23T01:02:03Z", "limit": limit, "hcx_version": "0.1.0",
              "tasks": tasks}
    (run / "scores.json").write_text(json.dumps(scores, ensure_ascii=False), encoding="utf-8")
    return run


def _runs(root: Path) -> list[Path]:
    """base -> sft -> dpo. Hand-computed (0-100 scale) in the tests below."""
    base = _write_run(root, "tiny-base", 100, 50, {
        "kobest_copa": _acc("ko", "reasoning", 0.52, acc_norm=0.50),
        "kobest_boolq": _acc("ko", "reasoning", 0.60),
        "kobest_hellaswag": _acc("ko", "commonsense", 0.40, primary="acc_norm", acc=0.38),
        "kmmlu": _acc("ko", "knowledge", 0.30),
        "ko_harmless": _acc("ko", "safety", 0.70, primary="safe_rate"),
        "click_culture": _acc("ko", "문화", 0.25),
        "arc_easy": _acc("en", "reasoning", 0.60),
        "hellaswag": _acc("en", "commonsense", 0.45, primary="acc_norm"),
        "mmlu": _acc("en", "knowledge", 0.35),
        "wikitext": _task("en", "language_modeling", "word_perplexity",
                          {"word_perplexity": _m(45.3, None, hib=False)}),
        "flores_ko_en": _mt("ko-en", 30.0, 8.0, 95.1),
        "flores_en_ko": _mt("en-ko", 20.0, 0.8, 99.0),
    })
    sft = _write_run(root, "tiny-sft", 200, 50, {
        "kobest_copa": _acc("ko", "reasoning", 0.58, acc_norm=0.56),
        "kobest_boolq": _acc("ko", "reasoning", 0.64),
        "kobest_hellaswag": _acc("ko", "commonsense", 0.42, primary="acc_norm", acc=0.41),
        # kmmlu not run
        "ko_harmless": _acc("ko", "safety", 0.75, primary="safe_rate"),
        "click_culture": _acc("ko", "문화", 0.28),
        "arc_easy": _acc("en", "reasoning", 0.62, n=100),
        "hellaswag": _acc("en", "commonsense", 0.47, primary="acc_norm"),
        "mmlu": _acc("en", "knowledge", 0.33),
        "wikitext": _task("en", "language_modeling", "word_perplexity",
                          {"word_perplexity": _m(40.0, None, hib=False)}),
        "flores_ko_en": _mt("ko-en", 33.5, 9.0, 90.1),
        "flores_en_ko": _mt("en-ko", 22.0, 0.9, 98.0),
    })
    dpo = _write_run(root, "tiny-dpo", 300, None, {
        "kobest_copa": _acc("ko", "reasoning", 0.60, acc_norm=0.58),
        "kobest_boolq": _acc("ko", "reasoning", 0.66),
        "kobest_hellaswag": _acc("ko", "commonsense", 0.41, primary="acc_norm", acc=0.40),
        "kmmlu": _acc("ko", "knowledge", 0.31),
        "ko_harmless": _acc("ko", "safety", 0.90, primary="safe_rate"),
        "click_culture": _acc("ko", "문화", 0.26),
        "arc_easy": _acc("en", "reasoning", 0.61),
        "hellaswag": _acc("en", "commonsense", 0.44, primary="acc_norm"),
        "mmlu": _acc("en", "knowledge", 0.36),
        "wikitext": _task("en", "language_modeling", "word_perplexity",
                          {"word_perplexity": _m(41.0, None, hib=False)}),
        "flores_ko_en": _mt("ko-en", 31.0, 8.5, 96.0),
        # flores_en_ko not run
    })
    return [base, sft, dpo]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runs")
    out = root / "report"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = build_report(_runs(root), out, title="tiny: base vs SFT vs DPO")
    glyphs = [str(w.message) for w in caught if "glyph" in str(w.message).lower()]
    assert not glyphs, glyphs
    return paths


def test_files_written_atomically(report):
    assert set(report) == {"md", "html", "json"}
    out = report["md"].parent
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in report.values())


def test_markdown_summary_by_hand(report):
    md = report["md"].read_text(encoding="utf-8")
    assert "# tiny: base vs SFT vs DPO" in md
    assert ("| Category | tiny-base KO | tiny-base EN | tiny-sft KO | tiny-sft EN "
            "| tiny-dpo KO | tiny-dpo EN |") in md
    # reasoning KO: base (52+60)/2=56, sft (58+64)/2=61, dpo (60+66)/2=63; EN: 60, 62, 61
    assert "| reasoning | 56.0 | 60.0 | 61.0 (+5.0) | 62.0 (+2.0) | 63.0 (+7.0) | 61.0 (+1.0) |" in md
    # kmmlu is missing from the SFT run: a dash, not a failure
    assert "| knowledge | 30.0 | 35.0 | — | 33.0 (−2.0) | 31.0 (+1.0) | 36.0 (+1.0) |" in md
    assert "| commonsense | 40.0 | 45.0 | 42.0 (+2.0) | 47.0 (+2.0) | 41.0 (+1.0) | 44.0 (−1.0) |" in md
    assert "| safety | 70.0 | — | 75.0 (+5.0) | — | 90.0 (+20.0) | — |" in md
    assert "| 문화 | 25.0 | — | 28.0 (+3.0) | — | 26.0 (+1.0) | — |" in md
    # macro KO: base (30+56+40+70+25)/5=44.2, sft (61+42+75+28)/4=51.5 (other task set: †),
    # dpo (31+63+41+90+26)/5=50.2; EN: 140/3=46.7, 142/3=47.3, 141/3=47.0
    assert "| **average** | 44.2 | 46.7 | 51.5† (+7.3) | 47.3 (+0.7) | 50.2 (+6.0) | 47.0 (+0.3) |" in md
    # translation per direction, chrF then BLEU (BLEU 0.8 stays 0.8: already 0..100)
    assert "| ko→en | 30.0 | 8.0 | 33.5 (+3.5) | 9.0 (+1.0) | 31.0 (+1.0) | 8.5 (+0.5) |" in md
    assert "| en→ko | 20.0 | 0.8 | 22.0 (+2.0) | 0.9 (+0.1) | — | — |" in md
    # perplexity (lower is better) stays out of the averages, and says so
    assert "Not averaged (primary metric lower-is-better): wikitext." in md
    assert "kmmlu (missing in tiny-sft)" in md


def test_markdown_task_tables_and_warnings(report):
    md = report["md"].read_text(encoding="utf-8")
    for heading in ("## Korean tasks", "## English tasks", "## Translation", "## Safety"):
        assert heading in md
    assert "| kobest_copa | ko | reasoning | 50 | acc * | 52.0 ± 7.0 | 58.0 ± 7.0 (+6.0) " \
           "| 60.0 ± 7.0 (+8.0) |" in md
    assert "| kmmlu | ko | knowledge | 50 | acc * | 30.0 ± 7.0 | — | 31.0 ± 7.0 (+1.0) |" in md
    # TER: lower is better, its own delta sign
    assert "| flores_ko_en | ko→en | translation | 50 | ter ↓ | 95.1 ± 2.0 | 90.1 ± 2.0 (−5.0) " \
           "| 96.0 ± 2.0 (+0.9) |" in md
    assert "| arc_easy | en | reasoning | 50/100/50 ⚠ |" in md
    assert "WARNING" in md and "--limit" in md and "NOT comparable with published" in md
    assert "different --limit values" in md
    assert "arc_easy: the runs scored different numbers of examples" in md


def test_report_json(report):
    data = json.loads(report["json"].read_text(encoding="utf-8"))
    assert data["baseline"] == "tiny-base"
    assert [c["label"] for c in data["checkpoints"]] == ["tiny-base", "tiny-sft", "tiny-dpo"]
    assert [c["limit"] for c in data["checkpoints"]] == [50, 50, None]
    ko = data["categories"]["ko"]
    assert ko["reasoning"]["tiny-sft"]["mean"] == pytest.approx(61.0)
    assert ko["reasoning"]["tiny-sft"]["delta"] == pytest.approx(5.0)
    assert ko["knowledge"]["tiny-sft"]["mean"] is None
    assert ko["knowledge"]["tiny-sft"]["delta"] is None
    assert data["macro"]["ko"]["tiny-sft"]["mean"] == pytest.approx(51.5)
    assert data["macro"]["ko"]["tiny-sft"]["differs_from_baseline"] is True
    assert data["macro"]["en"]["tiny-dpo"]["delta"] == pytest.approx(141 / 3 - 140 / 3)
    ter = data["tasks"]["flores_ko_en"]["metrics"]["ter"]
    assert ter["higher_is_better"] is False and ter["scale"] == 1.0
    assert ter["delta"] == {"tiny-sft": pytest.approx(-5.0), "tiny-dpo": pytest.approx(0.9)}
    acc = data["tasks"]["kobest_copa"]["metrics"]["acc"]
    assert acc["scale"] == 100.0
    assert acc["runs"]["tiny-base"] == {"value": 0.52, "stderr": 0.07}
    assert data["tasks"]["kmmlu"]["metrics"]["acc"]["runs"]["tiny-sft"] is None
    assert data["tasks"]["arc_easy"]["n_mismatch"] is True
    assert data["translation"]["en-ko"]["bleu"]["tiny-sft"]["delta"] == pytest.approx(0.1)
    assert data["translation"]["en-ko"]["chrf"]["tiny-dpo"]["mean"] is None
    assert data["excluded_from_averages"] == ["wikitext"]


def test_html_self_contained(report):
    page = report["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    pngs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 2
    import base64

    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # coloured deltas respect higher_is_better: TER down is better, up is worse
    assert '<span class="d better">−5.0</span>' in page
    assert '<span class="d worse">+0.9</span>' in page
    assert '<span class="d worse">−2.0</span>' in page  # mmlu EN knowledge
    assert "문화" in page and "class=\"warn\"" in page


def test_errors_name_the_problem(tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(HcxError, match=r"not_a_run.*hcx eval CKPT --out"):
        build_report([empty], tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scores.json").write_text('{"format": 1, "tasks": {', encoding="utf-8")
    with pytest.raises(ReportError, match=re.escape(str(bad / "scores.json")) + ".*not valid JSON"):
        load_run(bad)
    wrong = _write_run(tmp_path, "wrong", 1, None,
                       {"t": _task("ko", "reasoning", "acc", {"f1": _m(0.5)})})
    with pytest.raises(ReportError, match=r"tasks\.t\.primary.*'acc' is not one of its metrics"):
        load_run(wrong)
    assert not (tmp_path / "out").exists()


def _colour_count(img: np.ndarray, hex_colour: str, tol: int = 4) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(int) - rgb).max(axis=-1) <= tol).sum())


def test_html_renders_in_chromium(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium not installed: `apt-get install -y chromium` "
                    "(`make test` installs it when run as root)")
    shot = tmp_path / "report.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1280,2000", report["html"].resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    import matplotlib.image

    img = matplotlib.image.imread(shot)  # PNG: floats in 0..1, no Pillow needed
    assert img.shape[:2] == (2000, 1280)
    img = np.rint(img[..., :3] * 255).astype(np.uint8)
    non_white = (img.min(axis=-1) < 245).mean()
    assert non_white > 0.03, f"page looks blank: {non_white:.1%} non-white pixels"
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    assert colours > 50, f"only {colours} distinct colours"
    # the category chart's bars, in the first and second checkpoints' colours (the
    # checkpoint table's swatches are 10x10 px, far fewer than a bar's pixels)
    for colour in PALETTE[:3]:
        assert _colour_count(img, colour) > 1500, colour


def test_plots_without_a_hangul_font_stay_ascii(tmp_path, monkeypatch):
    """Without a Hangul-capable font, labels such as the category 문화 are made ASCII rather
    than drawn as missing glyphs (no warnings either way; the fixture covers the other case)."""
    from hcx.evaluation.report import merge_runs, plots

    monkeypatch.setattr(plots, "cjk_font", lambda: None)
    assert plots.plot_label("문화 culture", cjk=False) == "? culture"
    runs = [load_run(p) for p in _runs(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pngs = plots.render_plots(merge_runs(runs))
    assert set(pngs) == {"categories", "tasks"}
    assert not [w for w in caught if "glyph" in str(w.message).lower()]


def test_how_tasks_were_asked_is_shown_and_differences_warned(tmp_path):
    """A task asked another way than the plain one (sampled, generated answers) says so
    beside its name; runs that asked a task differently get a warning (their delta
    compares different measurements)."""
    from hcx.evaluation.report.merge import how_asked

    sampled = {**_acc("en", "math", 0.30, primary="maj@8"), "samples": 8, "temperature": 0.6,
               "top_p": 0.95}
    plain = _acc("ko", "knowledge", 0.30)
    generated = {**_acc("ko", "knowledge", 0.40), "mode": "generate", "shuffle_seed": 1, "cot": False}
    a = _write_run(tmp_path, "a", 1, None, {"gsm8k": sampled, "kmmlu": plain})
    b = _write_run(tmp_path, "b", 2, None, {"gsm8k": sampled, "kmmlu": generated})
    md = build_report([a, b], tmp_path / "report")["md"].read_text(encoding="utf-8")
    assert "| gsm8k (8 samples, T=0.6, top-p 0.95) | en | math |" in md
    assert "kmmlu: the runs asked it differently (a: default, b: generated answer, options " \
           "shuffled)" in md
    assert how_asked({"mode": "loglikelihood"}) == ""
    assert how_asked({"mode": "generate", "cot": True}) == "generated answer, CoT"
    assert how_asked({"judging": {"judge": {"name": "gpt-4o"}}}) == "judged by gpt-4o"
