"""Tasks as data (eval/tasks, eval/suites) and how each task kind is scored, with a
scripted model whose answers are known, so every metric is checked against values
computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hcx.evaluation import kinds
from hcx.evaluation import tasks as T
from hcx.evaluation.models import Budget, LanguageModel, Score, encode_choices
from hcx.evaluation.runner import evaluate


class Scripted(LanguageModel):
    """Characters are tokens; a continuation's log-likelihood and a prompt's output come
    from tables keyed by text, so each test decides what the model "prefers"."""

    kind = "hf"

    def __init__(self, scores: dict[str, float] | None = None, outputs=None):
        self.name, self.path, self.max_length = "scripted", "/scripted", 4096
        self.budget = Budget(batch_size=3, max_tokens=50)
        self.scores = scores or {}
        self.outputs = outputs or (lambda prompt: "")
        self.calls: list[int] = []

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    @property
    def eot_id(self):
        return 0

    def _score(self, requests):
        self.calls.append(len(requests))
        return [[Score(self.scores.get(self.decode(c).strip(), -10.0), False)
                 for c in r.continuations] for r in requests]

    def _generate(self, prompts, max_new_tokens, stops):
        return [self.outputs(self.decode(p)) for p in prompts]


def write_task(tmp_path: Path, spec: dict, docs: list[dict]) -> T.Task:
    data = tmp_path / f"{spec['name']}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    spec = {"language": "en", "category": "test", "dataset": {"files": str(data)}, **spec}
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return T.load_task(str(path))


# --- the shipped tasks and suites --------------------------------------------------

#: Shipped tasks whose data is on the Hub only (no copy under <data root>/hub is shipped).
HUB_ONLY = {"haerae"}


def offline(task: T.Task) -> bool:
    """Whether a shipped task's data can be read here: a hub task needs its local copy."""
    hub = task.spec.dataset.hub
    if hub is None or T.hub_mirror(hub) is not None:
        return True
    assert task.name in HUB_ONLY, f"{task.name}: a hub task nobody expects to be offline"
    return False



def test_every_shipped_task_renders_on_its_data():
    """Each task's templates and expressions evaluate on (the start of) its real data and
    give a valid target; a label-format slip in a YAML file fails here."""
    root = T.data_root()
    if not (root / "eval").is_dir():
        pytest.skip(f"no evaluation data at {root}/eval (set HCX_DATA_DIR)")
    names = T.available_tasks()
    assert len(names) >= 30
    for task in T.resolve_tasks(names):
        spec = task.spec
        if not offline(task):
            continue  # tests/evaluation/test_hub.py runs it on a fixture
        docs = T.load_docs(task, limit=40)
        shots = T.FewShot(task)
        for doc in docs:
            if spec.kind == "judged":  # a prompt per user turn (tests/evaluation/test_judges.py)
                from hcx.evaluation.judged import questions_of

                (asked,) = questions_of(task, [doc])
                assert all(t.strip() for t in asked["turns"]) and asked["category"], task.name
                continue
            prompt = task.prompt(doc)
            assert prompt and not any(ord(c) < 9 for c in prompt), (task.name, prompt)
            if spec.kind in ("multiple_choice", "bias"):
                choices = task.expr("contexts" if spec.contexts else "choices", doc)
                target = kinds._index(task, doc, task.expr("target", doc), [str(c) for c in choices])
                assert 0 <= target < len(choices) >= 2, task.name
            elif spec.kind in ("generation", "translation"):
                assert kinds._references(task, doc)[0].strip(), task.name
            assert len(shots.examples(doc)) == spec.fewshot.n, task.name
        assert task.spec.primary in task.spec.metrics


def test_suites_cover_the_report_languages():
    members = {s: T.suite_members(s) for s in ("korean", "english", "safety", "translation")}
    everything = T.suite_members("all")
    assert everything == [t for s in members.values() for t in s]
    langs = {s: {T.load_task(t).spec.language for t in ts} for s, ts in members.items()}
    assert langs["korean"] == {"ko"} and langs["english"] == {"en"}
    assert langs["translation"] == {"ko-en", "en-ko"}
    assert {"kobbq", "bbq"} <= set(members["safety"])
    kinds_in_all = {T.load_task(t).spec.kind for t in everything}
    # judged tasks need --judge: they are in the chat suite, not in `all`
    assert kinds_in_all == set(T.KIND_METRICS) - {"judged"}
    assert {T.load_task(t).spec.kind for t in T.suite_members("chat")} == {"judged"}
    # suites run offline: tasks whose data is on the Hub only are in none
    in_suites = {t for s in T.available_suites() for t in T.suite_members(s)}
    assert not in_suites & HUB_ONLY


def test_unknown_task_suggests_the_closest():
    with pytest.raises(T.TaskError, match="did you mean 'kobest_copa'"):
        T.resolve_tasks(["kobest_cpoa"])


def test_missing_data_names_task_path_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("HCX_DATA_DIR", str(tmp_path))
    task = T.load_task("kobest_copa")
    with pytest.raises(T.TaskError) as e:
        T.load_docs(task)
    msg = str(e.value)
    assert "kobest_copa" in msg and str(tmp_path / "eval/kobest_copa/test.jsonl") in msg
    assert "--data-dir" in msg and "kobest_copa.yaml" in msg


def test_bad_task_files_name_key_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nlanguage: ko\ncategory: x\nkind: multiple_choice\n"
                    "dataset: {files: x.jsonl}\nprompt: hi\nchoices: \"['a']\"\ntarget: '0'\n"
                    "metrics: [acc, bleu]\n")
    with pytest.raises(T.TaskError, match=r"bad.yaml.*bleu.*not computed by kind"):
        T.load_task(str(path))
    path.write_text(path.read_text().replace("metrics: [acc, bleu]", "metrics: [acc]\nchoises: x"))
    with pytest.raises(T.TaskError, match=r"bad.yaml:10.*unknown key 'choises'.*did you mean 'choices'"):
        T.load_task(str(path))


def test_template_errors_name_task_and_example(tmp_path):
    task = write_task(tmp_path, {"name": "t", "kind": "multiple_choice", "prompt": "{{ nope }}",
                                 "choices": "['a', 'b']", "target": "0", "metrics": ["acc"]},
                      [{"q": 1}])
    with pytest.raises(T.TaskError, match=r"task t .*prompt failed on doc t.jsonl:1.*nope"):
        task.prompt(T.load_docs(task)[0])


def test_encode_choices_is_lm_evals_encode_pair():
    """Trailing context spaces move to the continuation; the continuation is what the
    whole adds after the context (lm-eval's HFLM._encode_pair), for every choice."""
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    assert encode_choices(enc, "Q: A: ", ["yes"], 0) == (enc("Q: A:"), [enc(" yes")])
    assert encode_choices(enc, "", ["yes"], 7) == ([7], [enc("yes")])
    assert encode_choices(enc, "Q: ", ["a", "bc"], 0) == (enc("Q:"), [enc(" a"), enc(" bc")])


# --- the kinds, on a scripted model ---------------------------------------------------


def test_multiple_choice_acc_and_acc_norm(tmp_path):
    # doc 1: "bb" (-2) beats "a" (-3) on raw log-likelihood; per character "a" -3/1 < -2/2=-1, so
    #        acc_norm also picks "bb". gold 1 -> acc 1, acc_norm 1.
    # doc 2: "ccc" -4.5 (per char -1.5) vs "d" -2.0: raw picks "d" (index 1), norm picks "ccc"
    #        (index 0). gold 0 -> acc 0, acc_norm 1.
    # acc = 0.5 with stderr sqrt(0.5/2)/... = std([1,0], ddof=1)/sqrt(2) = 0.7071/1.4142 = 0.5
    task = write_task(tmp_path, {"name": "mc", "kind": "multiple_choice", "prompt": "{{ q }}",
                                 "choices": "opts", "target": "gold", "metrics": ["acc", "acc_norm"]},
                      [{"q": "first", "opts": ["a", "bb"], "gold": 1},
                       {"q": "second", "opts": ["ccc", "d"], "gold": 0}])
    model = Scripted({"a": -3.0, "bb": -2.0, "ccc": -4.5, "d": -2.0})
    out = kinds.run(task, T.load_docs(task), model)
    assert out.metrics["acc"].value == 0.5 and out.metrics["acc_norm"].value == 1.0
    assert out.metrics["acc"].stderr == pytest.approx(0.5)
    assert [s["pred"] for s in out.samples] == [1, 1]
    assert out.samples[1]["loglikelihoods"] == [-4.5, -2.0]


def test_shared_context_is_one_request_per_question(tmp_path):
    """Four choices cost one request (one context pass), not four; batches honour the
    budget (3 questions each here)."""
    docs = [{"q": f"q{i}", "gold": 0} for i in range(7)]
    task = write_task(tmp_path, {"name": "four", "kind": "multiple_choice", "prompt": "{{ q }}",
                                 "choices": "['w', 'x', 'y', 'z']", "target": "gold",
                                 "metrics": ["acc"]}, docs)
    model = Scripted({"w": -1.0})
    out = kinds.run(task, T.load_docs(task), model)
    assert sum(model.calls) == 7 and model.calls == [3, 3, 1]
    assert out.metrics["acc"].value == 1.0


def test_partial_scoring_with_one_context_per_choice(tmp_path):
    """WinoGrande: each option fills the blank in its own context; the shared rest of the
    sentence is what is scored."""
    task = write_task(tmp_path, {"name": "wino", "kind": "multiple_choice", "contexts": "ctx",
                                 "prompt": "{{ rest }}", "target": "gold", "metrics": ["acc"]},
                      [{"ctx": ["A went", "B went"], "rest": "home.", "gold": 1}])

    class ByContext(Scripted):
        def _score(self, requests):
            return [[Score(-1.0 if self.decode(r.context).startswith("B") else -5.0, False)]
                    for r in requests]

    out = kinds.run(task, T.load_docs(task), ByContext())
    assert out.samples[0]["loglikelihoods"] == [-5.0, -1.0] and out.metrics["acc"].value == 1.0


def test_fewshot_prefix_and_preamble(tmp_path):
    docs = [{"q": f"Q{i}", "a": f"A{i}", "s": "x" if i < 3 else "y"} for i in range(5)]
    task = write_task(tmp_path, {"name": "shots", "kind": "multiple_choice", "preamble": "About {{ s }}.\n",
                                 "prompt": "{{ q }}:", "choices": "[a, 'no']", "target": "0",
                                 "metrics": ["acc"], "fewshot": {"n": 2, "same": "s", "separator": "|"}},
                      docs)
    loaded = T.load_docs(task)
    shots = T.FewShot(task)
    prefix = shots.prefix(loaded[0], kinds._choice_answer(task))
    # the two other docs with s == "x" (Q1, Q2), in a seeded order, never Q0 itself
    assert prefix.startswith("About x.\n") and "Q0" not in prefix
    assert sorted(prefix[len("About x.\n"):].split("|")[:2]) == ["Q1: A1", "Q2: A2"]
    assert prefix == shots.prefix(loaded[0], kinds._choice_answer(task))  # deterministic


def test_limit_neither_changes_shots_nor_starves_them(tmp_path):
    """Shots come from all of the task's examples: a --limit smaller than the shot count
    works, and a doc's prompt is the same with or without a limit."""
    docs = [{"q": f"Q{i}", "a": f"A{i}"} for i in range(6)]
    task = write_task(tmp_path, {"name": "lim", "kind": "multiple_choice", "prompt": "{{ q }}:",
                                 "choices": "[a, 'no']", "target": "0", "metrics": ["acc"],
                                 "fewshot": {"n": 3}}, docs)
    limited = kinds.run(task, T.load_docs(task, limit=1), Scripted())
    full = kinds.run(task, T.load_docs(task), Scripted())
    assert limited.samples[0]["prompt"] == full.samples[0]["prompt"]
    assert limited.samples[0]["prompt"].count(":") == 4  # 3 shots + the question


def test_truthfulqa_mc2(tmp_path):
    # true answers have log-likelihoods log 0.3 and log 0.1, false ones log 0.2 and log 0.4:
    # mc2 = (0.3 + 0.1) / (0.3 + 0.1 + 0.2 + 0.4) = 0.4
    task = write_task(tmp_path, {"name": "tqa", "kind": "multiple_choice", "prompt": "Q",
                                 "choices": "t.keys() | list", "target": "0",
                                 "labels": "t.values() | list", "metrics": ["mc2"]},
                      [{"t": {"t1": 1, "t2": 1, "f1": 0, "f2": 0}}])
    model = Scripted({"t1": math.log(0.3), "t2": math.log(0.1), "f1": math.log(0.2), "f2": math.log(0.4)})
    out = kinds.run(task, T.load_docs(task), model)
    assert out.metrics["mc2"].value == pytest.approx(0.4)


def test_generation_gsm8k_extraction(tmp_path):
    task = write_task(tmp_path, {"name": "math", "kind": "generation", "prompt": "Question: {{ q }}\nAnswer:",
                                 "target": "answer", "answer": "gsm8k",
                                 "metrics": ["exact_match", "exact_match_flexible"]},
                      [{"q": "1+1", "answer": "1+1=2\n#### 2"},
                       {"q": "2*3", "answer": "#### 6"},
                       {"q": "big", "answer": "#### 1,000"}])
    outputs = {"1+1": " 1 plus 1 is 2.\n#### 2", "2*3": " so it is 6", "big": " #### 1,000"}
    model = Scripted(outputs=lambda p: outputs[p.split("Question: ")[-1].split("\n")[0]])
    out = kinds.run(task, T.load_docs(task), model)
    # strict needs "#### N": docs 1 and 3; flexible takes the last number: all three
    assert [s["exact_match"] for s in out.samples] == [1.0, 0.0, 1.0]
    assert out.metrics["exact_match"].value == pytest.approx(2 / 3)
    assert out.metrics["exact_match_flexible"].value == 1.0


def test_generation_korquad_em_f1(tmp_path):
    task = write_task(tmp_path, {"name": "qa", "kind": "generation", "prompt": "{{ q }}",
                                 "target": "answers", "answer": "korquad", "metrics": ["f1", "exact_match"],
                                 "generation": {"stop": ["\n"]}},
                      [{"q": "a", "answers": ["100만 명"]}, {"q": "b", "answers": ["서울"]},
                       {"q": "c", "answers": ["서울"]}])
    # doc a: "100만명" vs "100만 명": EM compares normalised strings, which keep the space
    #        -> 0; F1 compares characters with spaces removed -> 1
    # doc b: "서울" exactly (after the stop string) -> EM 1, F1 1
    # doc c: "서울특별시" vs "서울": character F1, precision 2/5, recall 2/2 -> 2*0.4*1/1.4 = 4/7
    outs = {"a": " 100만명\nmore", "b": " 서울", "c": " 서울특별시"}
    out = kinds.run(task, T.load_docs(task), Scripted(outputs=lambda p: outs[p]))
    assert [s["exact_match"] for s in out.samples] == [0.0, 1.0, 0.0]
    assert [s["f1"] for s in out.samples] == [1.0, 1.0, pytest.approx(4 / 7)]
    assert out.metrics["f1"].value == pytest.approx((2 + 4 / 7) / 3)


def test_translation_perfect_and_empty(tmp_path):
    docs = [{"ko": f"문장 {i}", "en": f"This is sentence number {i} of the test."} for i in range(4)]
    task = write_task(tmp_path, {"name": "tr", "kind": "translation", "language": "ko-en",
                                 "prompt": "{{ ko }} =", "target": "en", "metrics": ["bleu", "chrf", "ter"]},
                      docs)
    refs = {d["ko"]: d["en"] for d in docs}
    perfect = kinds.run(task, T.load_docs(task), Scripted(outputs=lambda p: " " + refs[p[:-2]] + "\nx"))
    assert perfect.metrics["bleu"].value == pytest.approx(100.0)
    assert perfect.metrics["chrf"].value == pytest.approx(100.0)
    assert perfect.metrics["ter"].value == pytest.approx(0.0)
    assert perfect.metrics["ter"].higher_is_better is False
    empty = kinds.run(task, T.load_docs(task), Scripted(outputs=lambda p: ""))
    assert empty.metrics["bleu"].value == 0.0 and empty.metrics["chrf"].value == 0.0


def test_bias_kind_diff_bias(tmp_path):
    """A model that always picks the stereotyped answer: accuracy 0 in ambiguous contexts
    (the gold is 'unknown'), 1 in disambiguated contexts that confirm the stereotype and 0
    in those that contradict it. KoBBQ: diff-bias_amb = (biased - counter-biased answers) /
    ambiguous questions = (2 - 0) / 2 = 1; diff-bias_dis = acc(biased contexts) -
    acc(counter-biased contexts) = 1 - 0 = 1."""
    docs = [{"c": "amb", "gold": 2, "biased": 0}, {"c": "amb", "gold": 2, "biased": 1},
            {"c": "dis", "gold": 0, "biased": 0}, {"c": "dis", "gold": 1, "biased": 0}]
    task = write_task(tmp_path, {"name": "bb", "kind": "bias", "prompt": "{{ c }}",
                                 "choices": "['x', 'y', 'unknown']", "target": "gold",
                                 "bias": {"condition": "c ~ 'ig' if c == 'amb' else 'disambig'",
                                          "biased": "biased", "unknown": "2"},
                                 "metrics": ["acc_ambig", "acc_disambig", "diff_bias_ambig",
                                             "diff_bias_disambig"]}, docs)

    class Stereotyped(Scripted):
        def __init__(self, docs):
            super().__init__()
            self.docs = iter(docs)

        def _score(self, requests):
            out = []
            for r in requests:
                biased = next(self.docs)["biased"]
                out.append([Score(0.0 if i == biased else -9.0, False) for i in range(3)])
            return out

    model = Stereotyped(docs)
    model.budget = Budget(batch_size=1)
    out = kinds.run(task, T.load_docs(task), model)
    m = {k: v.value for k, v in out.metrics.items()}
    assert m == {"acc_ambig": 0.0, "acc_disambig": 0.5, "diff_bias_ambig": 1.0,
                 "diff_bias_disambig": 1.0}
    assert [s["answer_type"] for s in out.samples] == ["biased"] * 4


def test_code_kind_runs_tests_in_the_sandbox(tmp_path):
    docs = [{"p": "def add(a, b):\n", "t": "assert add(2, 3) == 5"},
            {"p": "def sub(a, b):\n", "t": "assert sub(2, 3) == -1"}]
    task = write_task(tmp_path, {"name": "code", "kind": "code", "prompt": "{{ p }}",
                                 "code": {"program": "{{ p }}{{ completion }}\n{{ t }}\n", "timeout_s": 5},
                                 "metrics": ["pass@1"]}, docs)
    answers = {"def add(a, b):\n": "    return a + b\n", "def sub(a, b):\n": "    return a + b\n"}
    out = kinds.run(task, T.load_docs(task), Scripted(outputs=lambda p: answers[p]))
    assert [s["status"] for s in out.samples] == ["passed", "failed"]
    assert out.metrics["pass@1"].value == 0.5


def test_runner_writes_a_run_dir_and_resumes(tmp_path):
    task = write_task(tmp_path, {"name": "mc", "kind": "multiple_choice", "prompt": "{{ q }}",
                                 "choices": "['a', 'b']", "target": "0", "metrics": ["acc"]},
                      [{"q": "x"}, {"q": "y"}, {"q": "z"}])
    model = Scripted({"a": -1.0, "b": -2.0})
    run = tmp_path / "run"
    scores = evaluate(model, [task], run, limit=2, log=lambda m: None)
    on_disk = json.loads((run / "scores.json").read_text())
    assert on_disk["tasks"]["mc"]["metrics"]["acc"] == {"value": 1.0, "stderr": 0.0,
                                                        "higher_is_better": True}
    assert on_disk["limit"] == 2 and on_disk["tasks"]["mc"]["n"] == 2
    assert len((run / "samples" / "mc.jsonl").read_text().splitlines()) == 2
    assert scores["tasks"]["mc"] == on_disk["tasks"]["mc"]
    model.calls.clear()
    evaluate(model, [task], run, limit=2, log=lambda m: None)
    assert model.calls == []  # same settings: kept, not re-run
    evaluate(model, [task], run, limit=3, log=lambda m: None)
    assert sum(model.calls) == 3  # another limit: re-run


def test_docs_list_every_task():
    """docs/eval.md's task table is the one generated from eval/tasks (regenerate it with
    hcx.evaluation.tasks.tasks_markdown after changing a task)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "eval.md").read_text()
    table = doc.split("<!-- tasks:begin -->\n")[1].split("<!-- tasks:end -->")[0]
    assert table == T.tasks_markdown()
