"""Paired tests between two runs on the same examples, by hand, and the report marking
deltas within noise."""

import json

import pytest

from hcx.evaluation.metrics import mcnemar_p, paired_bootstrap_p, paired_test
from hcx.evaluation.report import build_report


def test_mcnemar_by_hand():
    # discordant: a right only once, b right only 6 times: n = 7,
    # p = 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128 = 0.125
    a = [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert mcnemar_p(a, b) == pytest.approx(0.125)
    assert mcnemar_p(b, a) == pytest.approx(0.125)
    assert mcnemar_p([1] * 10, [1] * 10) == 1.0  # no discordant example
    # 10 discordant all one way: 2 / 2^10
    assert mcnemar_p([0] * 10, [1] * 10) == pytest.approx(2 / 1024)
    assert mcnemar_p([0, 1, 0, 1], [1, 0, 1, 0]) == 1.0  # an even split: capped at 1
    assert paired_test(a, b) == ("mcnemar", pytest.approx(0.125))


def test_paired_bootstrap():
    assert paired_bootstrap_p([0.2, 0.4], [0.2, 0.4]) == 1.0  # no difference at all
    assert paired_bootstrap_p([0.1, 0.2, 0.3], [0.5, 0.6, 0.7]) == 0.0  # always better
    a = [0.5, 0.1, 0.9, 0.4, 0.3, 0.8, 0.2, 0.7]
    b = [0.6, 0.0, 1.0, 0.4, 0.5, 0.7, 0.3, 0.9]
    # the same resamples either way round: symmetric
    assert paired_bootstrap_p(a, b) == paired_bootstrap_p(b, a)
    # differences: mean 0.0625, standard error 0.042 (ddof 1): the two-sided normal
    # approximation gives p = 0.137; the bootstrap (0.138 with seed 0) lands near it
    assert paired_bootstrap_p(a, b) == pytest.approx(0.137, abs=0.03)
    assert paired_test(a, b)[0] == "paired bootstrap"
    with pytest.raises(Exception, match="a has 1 items but b has 2"):
        paired_bootstrap_p([1.0], [1.0, 0.0])


def _run(root, name, per_task):
    d = root / name
    (d / "samples").mkdir(parents=True)
    tasks = {}
    for task, acc in per_task.items():
        tasks[task] = {"language": "ko", "category": "reasoning", "kind": "multiple_choice",
                       "n": len(acc), "primary": "acc",
                       "metrics": {"acc": {"value": sum(acc) / len(acc), "stderr": 0.05,
                                           "higher_is_better": True}}}
        (d / "samples" / f"{task}.jsonl").write_text("".join(
            json.dumps({"prompt": f"q{i}", "acc": v}) + "\n" for i, v in enumerate(acc)))
    (d / "scores.json").write_text(json.dumps({"format": 1, "model": {"name": name},
                                               "tasks": tasks}))
    return d


def test_report_marks_deltas_within_noise(tmp_path):
    base = _run(tmp_path, "base", {"big": [0] * 40, "small": [0, 1] * 20})
    new = _run(tmp_path, "new", {"big": [1] * 40,  # 40 discordant one way: p ~ 1.8e-12
                                 "small": [1, 0] * 1 + [0, 1] * 19})  # 1 each way: p = 1
    files = build_report([base, new], tmp_path / "report")
    data = json.loads(files["json"].read_text())
    big = data["tasks"]["big"]["metrics"]["acc"]["paired"]["new"]
    small = data["tasks"]["small"]["metrics"]["acc"]["paired"]["new"]
    assert big["test"] == "mcnemar" and big["p"] == pytest.approx(2 / 2 ** 40) and not big["noise"]
    assert small["p"] == 1.0 and small["noise"]
    md = files["md"].read_text()
    assert "(+100.0)" in md and "(0.0≈)" in md and "≈ within noise" in md
    assert "≈" in files["html"].read_text()
    # other examples (another --limit): no test, no mark
    other = _run(tmp_path, "other", {"big": [1] * 30})
    files = build_report([base, other], tmp_path / "report2")
    assert "paired" not in json.dumps(json.loads(files["json"].read_text())["tasks"]["big"]
                                      ["metrics"]["acc"]).replace('"paired": {}', "")
