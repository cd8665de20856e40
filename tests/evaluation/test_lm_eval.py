"""lm-evaluation-harness integration: the ``hcx`` model inside lm-eval (its own command
line included), lm-eval's own Korean tasks on the local data (``hcx eval --backend
lm-eval``), and the cross-check that hcx's native KoBEST scores are lm-eval's exactly."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
LIMIT = 40


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def hf_dir(sft_checkpoint, tmp_path_factory) -> Path:
    """The session's small SFT checkpoint exported to a Hugging Face directory."""
    from hcx.interop.hf import export_hf

    return export_hf(sft_checkpoint, tmp_path_factory.mktemp("hf") / "sft", log=lambda *a: None)


def _samples(run_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples" / f"{task}.jsonl").read_text().splitlines()]


# --- the task list and the data conversion (no model) ----------------------------------


def test_unknown_task_names_it_and_lists_the_supported(tmp_path):
    from hcx.evaluation.lm_eval.backend import LmEvalBackendError, run_lm_eval

    with pytest.raises(LmEvalBackendError) as e:
        run_lm_eval("unused", ["kobest_copa", "kobest_nope"], tmp_path / "run")
    msg = str(e.value)
    assert "unknown task kobest_nope;" in msg
    for name in ("kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg",
                 "kobest_wic", "click", "kobest"):
        assert name in msg
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_local_rows_become_the_hub_schema_and_the_yaml_includes_lm_evals(tmp_path, shared_data):
    import yaml

    from hcx.evaluation.lm_eval.backend import lm_eval_tasks_dir, prepare, resolve

    include = prepare(resolve(["kobest", "click"]), tmp_path, shared_data)

    def rows(path: Path) -> list[dict]:
        return [json.loads(x) for x in path.read_text().splitlines()]

    copa = rows(tmp_path / "lm_eval_data/kobest_copa/test.jsonl")
    raw = rows(shared_data / "eval/kobest_copa/test.jsonl")
    assert len(copa) == len(raw) == 1000
    assert copa[0] == {"premise": raw[0]["sentence"], "question": raw[0]["question"],
                       "alternative_1": raw[0]["1"], "alternative_2": raw[0]["2"],
                       "label": int(raw[0]["Answer"]) - 1}
    boolq = rows(tmp_path / "lm_eval_data/kobest_boolq/test.jsonl")
    answers = [r["Answer"] for r in rows(shared_data / "eval/kobest_boolq/test.jsonl")]
    assert set(answers) == {"True", "TRUE", "False", "FALSE"}  # the case varies
    assert [b["label"] for b in boolq] == [int(a.lower() == "true") for a in answers]
    spec = yaml.safe_load((include / "kobest_copa.yaml").read_text())
    assert spec["include"] == str(lm_eval_tasks_dir() / "kobest/kobest_copa.yaml")
    assert spec["dataset_path"] == "json" and spec["dataset_name"] is None
    assert spec["test_split"] == "test" and spec["training_split"] is None
    assert set(spec["dataset_kwargs"]["data_files"]) == {"test", "validation"}
    assert len(list(include.glob("click_*.yaml"))) == 11  # every CLIcK subtask redirected


# --- the lm-eval plugin ------------------------------------------------------------------


def test_pth_hook_imports_nothing_at_start_up_and_registers_hcx_with_lm_evals_models(tmp_path):
    """What hcx-lm-eval.pth does, in a fresh interpreter: the start-up line imports
    nothing; importing lm-eval's model table adds "hcx" beside lm-eval's own models."""
    from hcx.evaluation.lm_eval.plugin import PTH_LINE

    setup_ns: dict = {"__file__": str(ROOT / "setup.py")}
    setup_src = (ROOT / "setup.py").read_text()
    exec(setup_src.split("class build_py_with_pth")[0].replace("from setuptools", "#"), setup_ns)
    assert setup_ns["PTH_LINE"] == PTH_LINE  # setup.py installs this very line

    code = f"""
import sys
before = set(sys.modules)
exec({PTH_LINE!r})  # as site.py does with a .pth line
assert set(sys.modules) == before, set(sys.modules) - before
from lm_eval.api.registry import get_model, model_registry
assert len(model_registry) == 0  # lm-eval fills it on the first get_model
assert get_model("dummy").__name__ == "DummyLM"
assert "hcx" in model_registry and "hf" in model_registry
assert "hcx.evaluation.lm_eval.model" not in sys.modules and "torch" not in sys.modules
cls = get_model("hcx")
assert cls.__module__ == "hcx.evaluation.lm_eval.model" and cls.__name__ == "HcxLM", cls
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, **OFFLINE})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_lm_eval_command_line_runs_the_hcx_model(tmp_path, sft_checkpoint, shared_data):
    """``lm_eval --model hcx`` from lm-eval's own console script, on lm-eval's kobest_copa
    pointed at the local data with --include_path."""
    from hcx.evaluation.lm_eval.backend import prepare, resolve

    installed = [Path(d) / "hcx-lm-eval.pth" for d in site.getsitepackages()]
    if not any(p.is_file() for p in installed):
        pytest.fail("hcx-lm-eval.pth is not in site-packages: reinstall hcx (pip install -e . "
                    "or make install) so that lm_eval finds --model hcx")
    include = prepare(resolve(["kobest_copa"]), tmp_path / "tasks", shared_data)
    lm_eval = Path(sys.executable).parent / "lm_eval"
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(lm_eval), "--model", "hcx", "--model_args", f"checkpoint={sft_checkpoint}",
         "--batch_size", "4", "--tasks", "kobest_copa", "--limit", "4",
         "--include_path", str(include), "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, **OFFLINE})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "kobest_copa" in proc.stdout and "acc" in proc.stdout
    [results] = out.glob("*/results_*.json")
    res = json.loads(results.read_text())
    assert res["results"]["kobest_copa"]["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert res["n-samples"]["kobest_copa"]["effective"] == 4
    assert res["config"]["model_kind"] == "hcx"


# --- the cross-check: native hcx == lm-eval, exactly -------------------------------------


def test_native_kobest_scores_equal_lm_evals_exactly(tmp_path, sft_checkpoint, hf_dir, shared_data):
    """hcx's native kobest_copa/kobest_boolq on the hcx checkpoint, lm-eval's own task
    definitions on the exported HF directory with lm-eval's ``hf`` model, and the same
    with hcx's adapter inside lm-eval: the same accuracies, the same per-example
    log-likelihoods (1e-4)."""
    from hcx.evaluation.lm_eval.backend import run_lm_eval
    from hcx.evaluation.models import Budget, open_model
    from hcx.evaluation.runner import evaluate
    from hcx.evaluation.tasks import resolve_tasks

    tasks = ["kobest_copa", "kobest_boolq"]
    model = open_model(str(sft_checkpoint), budget=Budget(batch_size=8), log=lambda *a: None)
    try:
        native = evaluate(model, resolve_tasks(tasks), tmp_path / "native", limit=LIMIT,
                          log=lambda *a: None)
    finally:
        model.close()
    ref = run_lm_eval(str(hf_dir), tasks, tmp_path / "lm-eval-hf", limit=LIMIT,
                      lm_eval_model="hf", batch_size=8, data_root=shared_data, log=lambda *a: None)
    ours = run_lm_eval(str(sft_checkpoint), tasks, tmp_path / "lm-eval-hcx", limit=LIMIT,
                       lm_eval_model="hcx", batch_size=8, data_root=shared_data, log=lambda *a: None)

    acc_by_task = {}
    for task in tasks:
        acc = {name: run["tasks"][task]["metrics"]["acc"]["value"]
               for name, run in (("native", native), ("lm-eval hf", ref), ("lm-eval hcx", ours))}
        assert acc["native"] == acc["lm-eval hf"] == acc["lm-eval hcx"], (task, acc)
        acc_by_task[task] = acc["native"]
        assert native["tasks"][task]["n"] == ref["tasks"][task]["n"] == LIMIT
        assert ref["tasks"][task]["metrics"]["acc"]["stderr"] == pytest.approx(
            native["tasks"][task]["metrics"]["acc"]["stderr"], rel=1e-9)

        n_samples = _samples(tmp_path / "native", task)
        h_samples = sorted(_samples(tmp_path / "lm-eval-hf", task), key=lambda r: r["doc_id"])
        o_samples = sorted(_samples(tmp_path / "lm-eval-hcx", task), key=lambda r: r["doc_id"])
        assert len(n_samples) == len(h_samples) == len(o_samples) == LIMIT
        for n, h, o in zip(n_samples, h_samples, o_samples):
            # the same prompt and continuations (lm-eval's continuation = delimiter + choice)
            assert h["arguments"][0][0] == n["prompt"]
            assert [a[1] for a in h["arguments"]] == [" " + c for c in n["choices"]]
            gold = h["target"]  # lm-eval's doc_to_target: the answer text (COPA) or index
            assert n["target"] == (n["choices"].index(gold) if gold in n["choices"] else int(gold))
            assert n["loglikelihoods"] == pytest.approx(h["loglikelihoods"], abs=1e-4)
            assert o["loglikelihoods"] == pytest.approx(h["loglikelihoods"], abs=1e-4)

    # the lm-eval run directory is what hcx report reads
    scores = json.loads((tmp_path / "lm-eval-hf" / "scores.json").read_text())
    assert scores["backend"] == "lm-eval" and scores["format"] == 1
    assert scores["model"]["kind"] == "hf" and scores["limit"] == LIMIT
    entry = scores["tasks"]["kobest_copa"]
    assert (entry["language"], entry["category"], entry["primary"]) == ("ko", "reasoning", "acc")
    assert ours["model"]["kind"] == "hcx"
    # and lm-eval's own results file (kept under lm_eval/) reads as a run with the same scores
    from hcx.evaluation.report import load_run

    raw = load_run(tmp_path / "lm-eval-hf" / "lm_eval" / "kobest_copa.json")
    assert raw.tasks["kobest_copa"]["metrics"]["acc"] == entry["metrics"]["acc"]
    assert raw.tasks["kobest_copa"]["language"] == "ko"
    # the native run's results.json, in lm-eval's schema, holds the native scores
    native_file = json.loads((tmp_path / "native" / "results.json").read_text())
    assert native_file["results"]["kobest_copa"]["acc,none"] == acc_by_task["kobest_copa"]


# --- the adapter's other request types ---------------------------------------------------


def test_rolling_loglikelihood_and_greedy_generation_match_lm_evals_hf_model(hf_dir):
    """HcxLM (here on the HF directory, through hcx's HFModel) against lm-eval's own HFLM
    on the same weights: whole-text log-likelihoods and greedy generations."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from hcx.evaluation.lm_eval.model import HcxLM, SamplingRefused

    ours = HcxLM(checkpoint=str(hf_dir), batch_size=4)
    ref = HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu", dtype="float32")
    texts = ["한국어와 영어를 함께 배우는 언어 모델입니다.", "The quick brown fox jumps over the lazy dog."]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(
        ref.loglikelihood_rolling(rolling), abs=1e-4)

    gen = [Instance("generate_until", {}, (t, {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}), i)
           for i, t in enumerate(["질문: 한국의 수도는? 답:", "Question: 2+2=? Answer:"])]
    assert ours.generate_until(gen) == ref.generate_until(gen)

    sampled = [Instance("generate_until", {}, ("x", {"until": ["\n"], "temperature": 0.7}), 0)]
    with pytest.raises(SamplingRefused, match="greedily"):
        ours.generate_until(sampled)


def test_hcx_checkpoint_scores_batches_without_padding_like_lm_evals_hf_model(sft_checkpoint, hf_dir):
    """HcxLM on the hcx checkpoint (HcxModel) against lm-eval's HFLM on its export when a
    batch has nothing to pad: one document, or documents of equal token lengths. (The
    continuation pass then has fewer queries than keys, where a default causal mask
    would be wrong.)"""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from hcx.evaluation.lm_eval.model import HcxLM

    ours = HcxLM(checkpoint=str(sft_checkpoint), batch_size=4)
    try:
        ref = HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu", dtype="float32")
        for texts in (["The quick brown fox."], ["aaa bbb", "ccc ddd"]):
            assert len({len(ours.tok_encode(t)) for t in texts}) == 1  # nothing to pad
            rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
            assert ours.loglikelihood_rolling(rolling) == pytest.approx(
                ref.loglikelihood_rolling(rolling), abs=1e-4), texts
        one = [Instance("loglikelihood", {}, ("서울은 한국의", " 수도이다. 부산은 항구이다."), 0)]
        [(lp, _)] = ours.loglikelihood(one)
        [(ref_lp, _)] = ref.loglikelihood(one)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
    finally:
        ours.close()
