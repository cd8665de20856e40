"""Results in lm-evaluation-harness's schema: hcx eval writes them, lm-eval's own table
code reads them, and hcx report reads lm-eval's results files as runs."""

import json

import pytest

from hcx.evaluation.interchange import lm_eval_results, metrics_from_lm_eval, scores_from_lm_eval
from hcx.evaluation.report import build_report, load_run
from hcx.evaluation.runner import evaluate
from tests.evaluation.test_tasks import Scripted, write_task


def test_run_dir_has_lm_eval_results_that_lm_eval_reads(tmp_path):
    task = write_task(tmp_path, {"name": "mc", "kind": "multiple_choice", "prompt": "{{ q }}",
                                 "choices": "['a', 'b']", "target": "0", "metrics": ["acc"]},
                      [{"q": "x"}, {"q": "y"}, {"q": "z"}, {"q": "w"}])
    model = Scripted({"a": -1.0, "b": -2.0})
    evaluate(model, [task], tmp_path / "run", log=lambda m: None)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["results"]["mc"]["acc,none"] == 1.0 and res["results"]["mc"]["acc_stderr,none"] == 0.0
    assert res["n-shot"] == {"mc": 0} and res["n-samples"]["mc"] == {"original": 4, "effective": 4}
    assert res["higher_is_better"] == {"mc": {"acc": True}}
    assert res["config"]["model_args"] == "checkpoint=/scripted" and res["versions"]["mc"]
    from lm_eval.utils import make_table

    table = make_table(res)
    row = [c.strip() for c in table.splitlines()[2].split("|")]
    assert row[1:7] == ["mc", res["versions"]["mc"], "none", "0", "acc", "↑"], table
    assert float(row[7]) == 1.0 and float(row[9]) == 0.0


def test_round_trip_and_hand_written_lm_eval_file(tmp_path):
    scores = {"format": 1, "model": {"name": "m", "path": "/m"}, "limit": None,
              "tasks": {"kobest_copa": {"language": "ko", "category": "reasoning", "n": 10,
                                        "num_fewshot": 0, "primary": "acc", "kind": "multiple_choice",
                                        "metrics": {"acc": {"value": 0.6, "stderr": 0.163,
                                                            "higher_is_better": True},
                                                    "ter": {"value": 80.0, "stderr": None,
                                                            "higher_is_better": False}}}}}
    back = scores_from_lm_eval(lm_eval_results(scores), "x")
    t = back["tasks"]["kobest_copa"]
    assert (t["language"], t["category"], t["primary"], t["n"]) == ("ko", "reasoning", "acc", 10)
    assert t["metrics"] == scores["tasks"]["kobest_copa"]["metrics"]
    # lm-eval's own file: several filters (the first wins), a group with no scores of its own,
    # a task hcx ships (its language and category come from hcx's YAML) and one it does not
    lm = {"results": {"kobest_boolq": {"alias": "kobest_boolq", "acc,none": 0.5,
                                       "acc_stderr,none": 0.1, "acc,other": 0.9,
                                       "f1,none": 0.4, "f1_stderr,none": "N/A"},
                      "mmlu": {"alias": "mmlu"},
                      "my_task": {"alias": "my_task", "exact_match,strict": 0.25}},
          "higher_is_better": {"kobest_boolq": {"acc": True, "f1": True}},
          "n-samples": {"kobest_boolq": {"original": 1404, "effective": 20}},
          "config": {"model": "hf", "model_args": "pretrained=/models/x", "limit": 20},
          "model_name": "/models/x", "date": 1733212800.0}
    got = scores_from_lm_eval(lm, "dir")["tasks"]
    assert set(got) == {"kobest_boolq", "my_task"}
    assert got["kobest_boolq"]["metrics"]["acc"]["value"] == 0.5
    assert got["kobest_boolq"]["metrics"]["f1"]["stderr"] is None
    assert (got["kobest_boolq"]["language"], got["kobest_boolq"]["n"]) == ("ko", 20)
    assert (got["my_task"]["language"], got["my_task"]["primary"]) == ("?", "exact_match")
    assert metrics_from_lm_eval({"acc,none": True}, {}) == {}

    # hcx report puts an lm-eval run (a folder as lm_eval --output_path leaves it) beside
    # an hcx run
    hcx_dir = tmp_path / "hcx-run"
    hcx_dir.mkdir()
    (hcx_dir / "scores.json").write_text(json.dumps(scores))
    lm_dir = tmp_path / "lm-eval-run"
    (lm_dir / "models__x").mkdir(parents=True)
    (lm_dir / "models__x" / "results_2026-12-03T10-00-00.json").write_text(json.dumps(lm))
    run = load_run(lm_dir)
    assert run.model["name"] == "/models/x" and run.limit == 20
    files = build_report([hcx_dir, lm_dir], tmp_path / "report")
    report = json.loads(files["json"].read_text())
    assert "kobest_boolq" in json.dumps(report) and "/models/x" in files["md"].read_text()


def test_unreadable_lm_eval_file_is_named(tmp_path):
    from hcx.evaluation.report import ReportError

    bad = tmp_path / "results_x.json"
    bad.write_text(json.dumps({"results": {"t": {"alias": "t"}}}))
    with pytest.raises(ReportError, match=rf"{bad}: tasks: missing or empty"):
        load_run(bad)
