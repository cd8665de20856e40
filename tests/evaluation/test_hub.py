"""``dataset.hub`` tasks read from a local copy of the Hub repository
(``<data root>/hub/<id>``), several configs joined, and the shipped HAE-RAE Bench task run
on a small fixture written here in that form. The fixture's questions are made up (toy
items in HAE-RAE's layout), not HAE-RAE's data, which is not available offline."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from hcx.evaluation import kinds
from hcx.evaluation import tasks as T
from tests.evaluation.test_tasks import Scripted

HAERAE = "HAERAE-HUB/HAE_RAE_BENCH"


def write_hub_dataset(root: Path, hub: str, configs: dict[str, list[dict]], split: str = "test") -> Path:
    """A Hub dataset repository as ``huggingface-cli download`` leaves it: a README.md
    whose YAML header names each config's data files, and those files (JSON Lines)."""
    repo = root / "hub" / hub
    header = ["---", "configs:"]
    for name, rows in configs.items():
        (repo / name).mkdir(parents=True, exist_ok=True)
        (repo / name / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        header += [f"- config_name: {name}", "  data_files:", f"  - split: {split}",
                   f"    path: {name}/{split}.jsonl"]
    (repo / "README.md").write_text("\n".join(header + ["---", "# test fixture", ""]), encoding="utf-8")
    return repo


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty data root, with the datasets cache inside the test's folder."""
    import datasets

    monkeypatch.setenv("HCX_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def _hub_task(tmp_path: Path, dataset: dict) -> T.Task:
    spec = {"name": "toy_hub", "language": "en", "category": "test", "kind": "multiple_choice",
            "dataset": dataset, "prompt": "{{ q }}", "choices": "['x', 'y']", "target": "gold",
            "metrics": ["acc"]}
    path = tmp_path / "toy_hub.yaml"
    path.write_text(json.dumps(spec))
    return T.load_task(str(path))


def test_hub_task_reads_the_local_copy_and_joins_configs(data_root):
    write_hub_dataset(data_root, "someone/toy", {
        "first": [{"q": "a", "gold": 0}, {"q": "b", "gold": 1}],
        "second": [{"q": "c", "gold": 1}]})
    assert T.hub_mirror("someone/toy") == data_root / "hub/someone/toy"
    assert T.hub_mirror("someone/other") is None

    one = _hub_task(data_root, {"hub": "someone/toy", "config": "second"})
    docs = T.load_docs(one)
    assert [(d["q"], d["__config__"], d["__where__"]) for d in docs] == [
        ("c", "second", "someone/toy:second[0]")]

    both = _hub_task(data_root, {"hub": "someone/toy", "config": ["second", "first"]})
    docs = T.load_docs(both)
    assert [d["q"] for d in docs] == ["c", "a", "b"]  # in the order of the list
    assert [d["__where__"] for d in docs] == ["someone/toy:second[0]", "someone/toy:first[0]",
                                              "someone/toy:first[1]"]
    assert [d["q"] for d in T.load_docs(both, limit=2)] == ["c", "a"]


def test_hub_errors_name_the_task_the_key_and_the_remedy(data_root, monkeypatch):
    import datasets

    write_hub_dataset(data_root, "someone/toy", {"first": [{"q": "a", "gold": 0}]})
    task = _hub_task(data_root, {"hub": "someone/toy", "config": ["first", "missing"]})
    with pytest.raises(T.TaskError) as e:
        T.load_docs(task)
    msg = str(e.value)
    assert "task toy_hub" in msg and "dataset.hub someone/toy (config missing" in msg
    assert str(data_root / "hub/someone/toy") in msg

    # no local copy: the Hub is asked (here: it cannot be reached), and the message says
    # where a copy would be read from
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/absent' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    task = _hub_task(data_root, {"hub": "someone/absent", "config": "c1"})
    with pytest.raises(T.TaskError) as e:
        T.load_docs(task)
    msg = str(e.value)
    assert "task toy_hub" in msg and "someone/absent (config c1, split test)" in msg
    assert f"put a copy of the dataset repository at {data_root / 'hub/someone/absent'}" in msg
    assert "ConnectionError" in msg

    for dataset, why in (({"files": "x.jsonl", "config": "c"}, "dataset.config is for dataset.hub"),
                         ({"hub": "someone/toy", "config": []}, "dataset.config is an empty list")):
        with pytest.raises(T.TaskError, match=rf"toy_hub.yaml.*dataset.*{why}"):
            _hub_task(data_root, dataset)


# --- HAE-RAE Bench on a fixture ------------------------------------------------------------


def _haerae_row(question: str, options: list[str], answer: int) -> dict:
    """A row in the layout lm-eval's haerae task reads (``query`` holding the question and
    its options, ``answer`` the label) plus the option texts as a list literal."""
    listed = "\n".join(f"({'ABCDE'[i]}) {o}" for i, o in enumerate(options))
    query = (f"다음 질문을 읽고 정답으로 가장 알맞은 것을 고르시요.\n\n### 질문: \n{question}\n\n"
             f"### 선택지: \n{listed}\n\n### 정답:")
    return {"query": query, "answer": f"({'ABCDE'[answer]})", "options": str(options)}


OPTS = ["가", "나", "다", "라", "마"]
# subset: the golds of its rows (0 = (A)); a model always answering (B) gets
# general_knowledge 1 of 3, history 1 of 1, loan_words 0 of 1, rare_words 1 of 1,
# standard_nomenclature 0 of 1.
GOLDS = {"general_knowledge": [1, 0, 0], "history": [1], "loan_words": [2], "rare_words": [1],
         "standard_nomenclature": [4]}


@pytest.fixture
def haerae(data_root):
    write_hub_dataset(data_root, HAERAE, {
        name: [_haerae_row(f"{name} 문제 {i}", [f"{o}{i}" for o in OPTS], g) for i, g in enumerate(golds)]
        for name, golds in GOLDS.items()})
    return T.load_task("haerae")


def test_haerae_scores_by_hand_with_a_per_subset_breakdown(haerae):
    docs = T.load_docs(haerae)
    assert len(docs) == 7 and {d["__config__"] for d in docs} == set(GOLDS)
    model = Scripted(scores={"(B)": -1.0})  # every other label: -10
    out = kinds.run(haerae, docs, model)
    # the prompt is the query, the choices the labels after a space (lm-eval's haerae)
    assert out.samples[0]["prompt"] == docs[0]["query"]
    assert out.samples[0]["choices"] == ["(A)", "(B)", "(C)", "(D)", "(E)"]
    assert [r["target"] for r in out.samples] == [g for gs in GOLDS.values() for g in gs]
    # right: gk 0, history 0, rare_words 0 -> 3 of 7; stderr = std(ddof=1)/sqrt(7) with
    # std^2 = (3*(4/7)^2 + 4*(3/7)^2)/6 = (48/49 + 36/49)/6 = 2/7
    acc = out.metrics["acc"]
    assert acc.value == pytest.approx(3 / 7)
    assert acc.stderr == pytest.approx(math.sqrt(2 / 7) / math.sqrt(7))
    subset = out.notes["breakdown"]["subset"]
    assert {g: (t["n"], t["acc"]["value"]) for g, t in subset["groups"].items()} == {
        "general_knowledge": (3, pytest.approx(1 / 3)), "history": (1, 1.0), "loan_words": (1, 0.0),
        "rare_words": (1, 1.0), "standard_nomenclature": (1, 0.0)}
    assert subset["macro"]["acc"] == pytest.approx((1 / 3 + 1 + 0 + 1 + 0) / 5)  # 7/15


def test_haerae_in_generate_mode(haerae):
    """Generate mode lists the options field under the question (the query's own option
    lines dropped) with A.-E. and reads the answer: doc 0 answers "(B)" (right), doc 1
    the text of its option A (right), doc 2 "잘 모르겠습니다" (unparseable)."""
    task = T.with_settings(haerae, mc_mode="generate")
    docs = T.load_docs(task, limit=3)
    assert [d["__config__"] for d in docs] == ["general_knowledge"] * 3
    replies = {"문제 0": "정답은 (B)입니다.", "문제 1": "가1", "문제 2": "잘 모르겠습니다"}
    seen = []

    def outputs(prompt):
        seen.append(prompt)
        return next(v for k, v in replies.items() if k in prompt)

    out = kinds.run(task, docs, Scripted(outputs=outputs))
    assert seen[0] == ("다음 질문을 읽고 정답으로 가장 알맞은 것을 고르시요.\n\n### 질문: \n"
                       "general_knowledge 문제 0\n\n### 선택지:\n"
                       "A. 가0\nB. 나0\nC. 다0\nD. 라0\nE. 마0\n### 정답:")
    assert [r["pred"] for r in out.samples] == [1, 0, None]
    assert out.metrics["acc"].value == pytest.approx(2 / 3)
    assert out.metrics["unparseable"].value == pytest.approx(1 / 3)
    assert out.notes["breakdown"]["subset"]["groups"]["general_knowledge"]["acc"]["value"] == \
        pytest.approx(2 / 3)

    # shuffled, each question's gold option keeps its text
    shuffled = T.with_settings(haerae, mc_mode="generate", shuffle_seed=2)
    for doc in T.load_docs(shuffled):
        asked = kinds.choice_prompts(shuffled, doc)
        shown = [asked["options"][j] for j in asked["order"]]
        assert shown[asked["shuffled_gold"]] == ast.literal_eval(doc["options"])[
            "ABCDE".index(doc["answer"][1])]
