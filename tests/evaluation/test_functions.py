"""Tasks as data all the way: a benchmark of a new shape (a regression scored by
correlation) is a YAML file and a small user module; task and recipe files anywhere
extend the shipped ones by name."""

import json
import math

import pytest
import yaml

from hcx.evaluation import kinds
from hcx.evaluation import tasks as T
from hcx.evaluation.functions import TaskFunctionError
from tests.evaluation.test_tasks import Scripted

USER_MODULE = '''
def keep_scored(docs):
    return [d for d in docs if d.get("score") is not None]


def pearson(predictions, references):
    xs = [float(p) for p in predictions]
    ys = [float(r[0]) for r in references]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / (sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys)) ** 0.5
'''


def regression_task(tmp_path, **extra):
    (tmp_path / "user_fns.py").write_text(USER_MODULE)
    docs = [{"s": "a", "score": 2}, {"s": "b", "score": 4}, {"s": "dropped", "score": None},
            {"s": "c", "score": 7}]
    (tmp_path / "sts.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {"name": "sts_toy", "language": "ko", "category": "similarity", "kind": "generation",
            "dataset": {"files": str(tmp_path / "sts.jsonl")}, "prompt": "{{ s }} 점수:",
            "target": "score | string", "metrics": ["pearson", "exact_match"],
            "process_docs": "user_fns.py:keep_scored",
            "metric_functions": {"pearson": "user_fns.py:pearson"}, **extra}
    (tmp_path / "sts_toy.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    return T.load_task(str(tmp_path / "sts_toy.yaml"))


def test_regression_task_scored_by_a_user_correlation(tmp_path):
    task = regression_task(tmp_path)
    docs = T.load_docs(task)
    assert [d["s"] for d in docs] == ["a", "b", "c"]  # process_docs dropped the unscored one
    outputs = {"a 점수:": " 1", "b 점수:": " 2", "c 점수:": " 3"}
    out = kinds.run(task, docs, Scripted(outputs=lambda p: outputs[p]))
    # by hand: x = 1, 2, 3; y = 2, 4, 7: cov = 5, sum dx^2 = 2, sum dy^2 = 38/3,
    # r = 5 / sqrt(2 * 38/3) = 0.99340
    assert out.metrics["pearson"].value == pytest.approx(5 / math.sqrt(2 * 38 / 3))
    assert out.metrics["pearson"].stderr is not None  # bootstrap over the 3 examples
    assert out.metrics["exact_match"].value == 0.0  # the built-in metrics still work beside it


def test_bad_functions_are_named(tmp_path):
    task = regression_task(tmp_path, process_docs="user_fns.py:nope")
    with pytest.raises(TaskFunctionError, match=r"task sts_toy: process_docs='user_fns.py:nope': "
                                                r".*has no function 'nope'"):
        T.load_docs(task)
    task = regression_task(tmp_path, metric_functions={"pearson": "no_such_module_x:f"})
    docs = T.load_docs(task)
    with pytest.raises(TaskFunctionError, match=r"metric_functions.pearson='no_such_module_x:f':"
                                                r" cannot import"):
        kinds.run(task, docs, Scripted(outputs=lambda p: " 1"))
    with pytest.raises(T.TaskError, match="metric_functions are for generation tasks"):
        (tmp_path / "mc.yaml").write_text(yaml.safe_dump({
            "name": "mc", "language": "en", "category": "x", "kind": "multiple_choice",
            "dataset": {"files": "x.jsonl"}, "prompt": "q", "choices": "['a']", "target": "0",
            "metrics": ["acc"], "metric_functions": {"acc2": "m:f"}}))
        T.load_task(str(tmp_path / "mc.yaml"))


def test_task_and_recipe_files_anywhere_extend_the_shipped_ones_by_name(tmp_path):
    (tmp_path / "my_copa.yaml").write_text("base: kobest_copa\nname: my_copa\n"
                                           "metrics: [acc]\n")
    mine, shipped = T.load_task(str(tmp_path / "my_copa.yaml")), T.load_task("kobest_copa")
    assert mine.spec.prompt == shipped.spec.prompt and mine.spec.metrics == ["acc"]
    (tmp_path / "mt.yaml").write_text("base: ko_en\nname: mt\nmetrics: [chrf]\n"
                                      "dataset: {files: x.jsonl}\n")
    mt = T.load_task(str(tmp_path / "mt.yaml"))  # eval/tasks/_base/ko_en.yaml, by name
    assert (mt.spec.kind, mt.spec.language, mt.spec.fewshot.n) == ("translation", "ko-en", 3)
    from hcx.config import load_recipe

    (tmp_path / "run.yaml").write_text("base: tiny.yaml\nname: mine\ntrain: {steps: 30}\n")
    recipe = load_recipe(tmp_path / "run.yaml")
    assert recipe.name == "mine" and recipe.train.steps == 30 and recipe.model.num_layers == 4
