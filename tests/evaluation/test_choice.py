"""Generative multiple choice (mode: generate): answers read back from real-looking model
outputs by strict rules, shuffling that keeps the gold answer, every shipped
multiple_choice task rendered in generate mode, and the metrics on a scripted model."""

from __future__ import annotations

import pytest

from hcx.evaluation import kinds
from hcx.evaluation import tasks as T
from hcx.evaluation.choice import (DEFAULT_ANSWER_PATTERN, extract_choice, labels_for,
                                   render_options, shuffle_order)
from tests.evaluation.test_tasks import Scripted, offline, write_task

EN = ["Paris", "London", "Berlin", "Rome"]
KO = ["서울", "부산", "대구", "광주"]

# (answer text, options, label style, expected index or None = refused)
TABLE = [
    # letters, English
    ("B", EN, "letters", 1),
    (" B", EN, "letters", 1),
    ("(B)", EN, "letters", 1),
    ("[C]", EN, "letters", 2),
    ("B.", EN, "letters", 1),
    ("B)", EN, "letters", 1),
    ("Answer: B", EN, "letters", 1),
    ("answer: (D)", EN, "letters", 3),
    ("The answer is B.", EN, "letters", 1),
    ("The correct answer is (A).", EN, "letters", 0),
    ("**B**", EN, "letters", 1),
    ("B. London", EN, "letters", 1),
    ("B) London is the capital", EN, "letters", 1),
    ("B. London\n\nQuestion: next one", EN, "letters", 1),
    ("Berlin", EN, "letters", 2),
    ("berlin.", EN, "letters", 2),
    ("Answer: Rome", EN, "letters", 3),
    # refused (English)
    ("", EN, "letters", None),
    ("   \n", EN, "letters", None),
    ("b", EN, "letters", None),                      # lower case: a word, not a label
    ("A good question.", EN, "letters", None),       # the article
    ("I think it is B", EN, "letters", None),        # no answer prefix: not guessed
    ("B or C", EN, "letters", None),
    ("A, B", EN, "letters", None),
    ("E", EN, "letters", None),                      # out of range for four options
    ("B. Paris", EN, "letters", None),               # the label and another option's text
    ("B. The answer is C.", EN, "letters", None),    # contradicts itself
    ("None of the above", EN, "letters", None),
    ("Answer:", EN, "letters", None),
    ("AB", EN, "letters", None),
    # Korean, circled labels (the Korean default)
    ("③", KO, "circled", 2),
    ("정답은 ③", KO, "circled", 2),
    ("정답은 ③입니다.", KO, "circled", 2),
    ("정답: ②", KO, "circled", 1),
    ("정답은 2번입니다.", KO, "circled", 1),
    ("3번", KO, "circled", 2),
    ("2", KO, "circled", 1),
    ("답: ④", KO, "circled", 3),
    ("정답은 ③입니다. 왜냐하면 대구는 경상도에 있기 때문입니다.", KO, "circled", 2),
    ("① 서울", KO, "circled", 0),
    ("서울", KO, "circled", 0),
    ("정답은 부산입니다.", KO, "circled", 1),
    # Korean refused
    ("잘 모르겠습니다", KO, "circled", None),
    ("정답은 없습니다.", KO, "circled", None),
    ("②, ③", KO, "circled", None),
    ("⑤", KO, "circled", None),
    ("12", KO, "circled", None),
    ("정답은 ③입니다. 정답은 ①입니다.", KO, "circled", None),
    ("① 부산", KO, "circled", None),
    # Korean text, letter labels (KMMLU's official prompt)
    ("정답은 B", KO, "letters", 1),
    ("정답：C", KO, "letters", 2),
    ("2", KO, "letters", None),                      # numbers do not name lettered options
    # numbers
    ("2", EN, "numbers", 1),
    ("2.", EN, "numbers", 1),
    ("Answer: 4", EN, "numbers", 3),
    ("②", EN, "numbers", 1),
    ("5", EN, "numbers", None),
    # an option whose text is a number: the label and the text must agree
    ("2", ["3", "5", "7", "2"], "numbers", None),
    ("3", ["3", "5", "7", "11"], "numbers", None),
    ("4", ["3", "5", "7", "4"], "numbers", 3),
    # duplicate option texts cannot be told apart
    ("yes", ["yes", "no", "yes"], "letters", None),
]


@pytest.mark.parametrize("text,options,style,want", TABLE)
def test_extraction_table(text, options, style, want):
    assert extract_choice(text, options, style) == want


def test_chain_of_thought_reads_the_last_final_answer():
    cot = ("Let's think. Paris is in France, not the answer is A yet... Berlin is the capital "
           "of Germany.\nSo the answer is (C).")
    assert extract_choice(cot, EN, "letters", DEFAULT_ANSWER_PATTERN) == 2
    ko = "서울은 수도이고 부산은 항구 도시이다. 따라서 정답은 ②입니다."
    assert extract_choice(ko, KO, "circled", DEFAULT_ANSWER_PATTERN) == 1
    assert extract_choice("I am not sure.", EN, "letters", DEFAULT_ANSWER_PATTERN) is None
    assert extract_choice("Final: [[B]]", EN, "letters", r"\[\[(.)\]\]") == 1


def test_labels_and_rendering():
    assert labels_for("letters", 3) == ["A", "B", "C"]
    assert labels_for("circled", 4) == ["①", "②", "③", "④"]
    assert render_options(["x", "y"], "letters") == "A. x\nB. y"
    assert render_options(["x", "y"], "circled") == "① x\n② y"
    assert render_options(["x", "y"], "numbers") == "1. x\n2. y"


def test_shuffle_is_seeded_per_question_and_keeps_the_gold():
    orders = {shuffle_order(4, 7, f"q{i}.jsonl:{i}") == [0, 1, 2, 3] for i in range(20)}
    assert False in orders  # it does shuffle
    assert shuffle_order(4, 7, "k") == shuffle_order(4, 7, "k")
    assert shuffle_order(4, 7, "k") != shuffle_order(4, 8, "k") or shuffle_order(4, 7, "j") != \
        shuffle_order(4, 8, "j")


def _mc_task(tmp_path, docs, generate_mode=True, **generate):
    spec = {"name": "gen", "kind": "multiple_choice", "prompt": "Q: {{ q }}\nAnswer:",
            "choices": "opts", "target": "gold", "metrics": ["acc", "acc_norm"]}
    if generate_mode:
        spec.update(mode="generate", metrics=["acc"], generate=generate)
    return write_task(tmp_path, spec, docs)


def test_shuffling_keeps_the_gold_answers_identity(tmp_path):
    docs = [{"q": f"question {i}", "opts": ["w", "x", "y", "z"], "gold": i % 4} for i in range(12)]
    task = _mc_task(tmp_path, docs, shuffle_seed=3)
    moved = 0
    for doc in T.load_docs(task):
        asked = kinds.choice_prompts(task, doc)
        order, gold = asked["order"], asked["gold"]
        shown = [asked["options"][j] for j in order]
        assert sorted(order) == [0, 1, 2, 3]
        assert shown[asked["shuffled_gold"]] == doc["opts"][doc["gold"]]
        # the shuffled prompt lists the options in the shuffled order
        assert "A. " + shown[0] in asked["shuffled_prompt"] and "D. " + shown[3] in asked["shuffled_prompt"]
        moved += asked["shuffled_gold"] != gold
    assert moved > 0


def test_generate_mode_metrics_by_hand(tmp_path):
    """Three questions, options w/x/y/z, gold 0, 1, 2. The model answers by the text it
    sees: doc 0 "A" (right), doc 1 "Answer: (C)" (wrong), doc 2 "maybe" (unparseable).
    acc = 1/3, unparseable = 1/3, each with stderr std([1,0,0], ddof=1)/sqrt(3) =
    0.57735/1.73205 = 1/3."""
    docs = [{"q": f"q{i}", "opts": ["w", "x", "y", "z"], "gold": i} for i in range(3)]
    task = _mc_task(tmp_path, docs)
    answers = {"q0": "A\nmore", "q1": "Answer: (C)", "q2": "maybe"}
    seen = []

    def outputs(prompt):
        seen.append(prompt)
        return answers[prompt.split("Q: ")[1].split("\n")[0]]

    out = kinds.run(task, T.load_docs(task), Scripted(outputs=outputs))
    assert seen[0] == "Q: q0\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    m = {k: (v.value, v.stderr, v.higher_is_better) for k, v in out.metrics.items()}
    assert m["acc"] == (pytest.approx(1 / 3), pytest.approx(1 / 3), True)
    assert m["unparseable"] == (pytest.approx(1 / 3), pytest.approx(1 / 3), False)
    assert [r["pred"] for r in out.samples] == [0, 2, None]


def test_generate_mode_shuffled_and_unshuffled(tmp_path):
    """A model that always answers with the option text "w": right whenever w is the
    gold, shuffled or not (the answer is read in the shown order and mapped back); a model
    always answering "A" is right only where the gold is shown first."""
    docs = [{"q": f"q{i}", "opts": ["w", "x", "y", "z"], "gold": 0 if i < 2 else 1} for i in range(8)]
    task = _mc_task(tmp_path, docs, shuffle_seed=11)
    assert task.spec.metrics == ["acc", "unparseable", "acc_unshuffled"]
    out = kinds.run(task, T.load_docs(task), Scripted(outputs=lambda p: "w"))
    assert out.metrics["acc"].value == out.metrics["acc_unshuffled"].value == 2 / 8
    out = kinds.run(task, T.load_docs(task), Scripted(outputs=lambda p: "A"))
    assert out.metrics["acc_unshuffled"].value == 2 / 8  # unshuffled, A is gold for docs 0, 1
    first_is_gold = [r["order"][0] == r["target"] for r in out.samples]
    assert out.metrics["acc"].value == pytest.approx(sum(first_is_gold) / 8)


def test_korean_default_circled_labels_cue_and_cot(tmp_path):
    docs = [{"q": "수도는?", "opts": KO, "gold": 0}]
    spec = {"name": "ko", "language": "ko", "kind": "multiple_choice", "mode": "generate",
            "prompt": "{{ q }}\n정답:", "choices": "opts", "target": "gold", "metrics": ["acc"],
            "generate": {"cot": "차근차근 생각해 봅시다."}}
    task = write_task(tmp_path, spec, docs)
    seen = []
    model = Scripted(outputs=lambda p: seen.append(p) or "서울은 수도다.\n\n따라서 정답은 ①입니다.")
    out = kinds.run(task, T.load_docs(task), model)
    assert seen == ["수도는?\n① 서울\n② 부산\n③ 대구\n④ 광주\n정답: 차근차근 생각해 봅시다."]
    assert out.metrics["acc"].value == 1.0


def test_mode_flag_switches_a_task_without_editing_it(tmp_path):
    docs = [{"q": "q", "opts": ["w", "x"], "gold": 1}]
    task = _mc_task(tmp_path, docs, generate_mode=False)
    gen = T.with_settings(task, mc_mode="generate", shuffle_seed=5)
    assert gen.spec.mode == "generate" and gen.spec.generate.shuffle_seed == 5
    assert gen.spec.metrics == ["acc", "unparseable", "acc_unshuffled"] and gen.spec.primary == "acc"
    assert gen.fingerprint != task.fingerprint and gen.spec.prompt == task.spec.prompt
    assert T.with_settings(task) is task
    out = kinds.run(gen, T.load_docs(gen), Scripted(outputs=lambda p: "B"))
    assert out.metrics["acc_unshuffled"].value == 1.0


def test_generate_mode_errors_name_task_and_key(tmp_path):
    docs = [{"q": "q", "gold": 0}]
    task = write_task(tmp_path, {"name": "letters", "kind": "multiple_choice", "mode": "generate",
                                 "prompt": "{{ q }}\nA. x\nB. y\nAnswer:", "choices": "['A', 'B']",
                                 "target": "gold", "metrics": ["acc"]}, docs)
    with pytest.raises(T.TaskError, match=r"task letters: .*generate.options"):
        kinds.run(task, T.load_docs(task), Scripted())
    for labels in ("['(A)', '(B)']", "['1', '2']"):
        task = write_task(tmp_path, {"name": "labels", "kind": "multiple_choice", "mode": "generate",
                                     "prompt": "{{ q }}", "choices": labels, "target": "gold",
                                     "metrics": ["acc"]}, docs)
        with pytest.raises(T.TaskError, match=r"task labels: its choices are the labels"):
            kinds.run(task, T.load_docs(task), Scripted())
    with pytest.raises(T.TaskError, match=r"bad_gen.yaml.*acc_norm.*mode generate"):
        write_task(tmp_path, {"name": "bad_gen", "kind": "multiple_choice", "mode": "generate",
                              "prompt": "q", "choices": "['a']", "target": "0",
                              "metrics": ["acc", "acc_norm"]}, docs)
    with pytest.raises(T.TaskError, match=r"bad_re.yaml.*answer_pattern"):
        write_task(tmp_path, {"name": "bad_re", "kind": "multiple_choice", "mode": "generate",
                              "prompt": "q", "choices": "['a']", "target": "0", "metrics": ["acc"],
                              "generate": {"answer_pattern": "(unclosed"}}, docs)
    with pytest.raises(T.TaskError, match=r"bad_kind.yaml.*mode: generate is for multiple_choice"):
        write_task(tmp_path, {"name": "bad_kind", "kind": "generation", "mode": "generate",
                              "prompt": "q", "target": "'a'", "metrics": ["exact_match"]}, docs)


def test_shuffle_true_uses_the_default_seed(tmp_path):
    docs = [{"q": "q", "opts": ["w", "x", "y"], "gold": 1}]
    base = {"kind": "multiple_choice", "prompt": "{{ q }}", "choices": "opts", "target": "gold",
            "mode": "generate", "metrics": ["acc"]}
    task = write_task(tmp_path, {**base, "name": "shuffled", "generate": {"shuffle": True}}, docs)
    g = task.spec.generate
    assert (g.shuffle, g.shuffle_seed) == (True, T.DEFAULT_SHUFFLE_SEED)
    assert task.spec.metrics == ["acc", "unparseable", "acc_unshuffled"]
    seeded = write_task(tmp_path, {**base, "name": "seeded", "generate": {"shuffle_seed": 9}}, docs)
    assert (seeded.spec.generate.shuffle, seeded.spec.generate.shuffle_seed) == (True, 9)
    with pytest.raises(T.TaskError, match=r"both.yaml.*generate.*shuffle: false contradicts shuffle_seed: 9"):
        write_task(tmp_path, {**base, "name": "both", "generate": {"shuffle": False, "shuffle_seed": 9}}, docs)
    # --shuffle-seed turns shuffling on in a task whose YAML does not shuffle
    plain = write_task(tmp_path, {**base, "name": "plain"}, docs)
    assert plain.spec.generate.shuffle is None
    flagged = T.with_settings(plain, shuffle_seed=4)
    assert (flagged.spec.generate.shuffle, flagged.spec.generate.shuffle_seed) == (True, 4)


def test_every_shipped_multiple_choice_task_renders_in_generate_mode():
    """Each shipped multiple_choice task, switched to generate mode (and shuffled), gives
    a prompt that lists its options with labels once, and a gold index in range."""
    root = T.data_root()
    if not (root / "eval").is_dir():
        pytest.skip(f"no evaluation data at {root}/eval (set HCX_DATA_DIR)")
    names = [t.name for t in T.resolve_tasks(T.available_tasks())
             if t.spec.kind == "multiple_choice" and offline(t)]  # haerae: test_hub.py
    assert len(names) >= 18
    for name in names:
        task = T.with_settings(T.load_task(name), mc_mode="generate", shuffle_seed=1)
        shots = T.FewShot(task)
        style = kinds._style(task)
        for doc in T.load_docs(task, limit=5):
            asked = kinds.choice_prompts(task, doc, shots)
            labels = labels_for(style, len(asked["options"]))
            last = asked["prompt"].rsplit("\n\n", 1)[-1] if task.spec.fewshot.n else asked["prompt"]
            for label, option in zip(labels, asked["options"]):
                line = f"{label}{' ' if style == 'circled' else '. '}{option.splitlines()[0]}"
                assert line in last, (name, line, last[-500:])
            first = f"{labels[0]}{' ' if style == 'circled' else '. '}"
            assert ("\n" + last).count("\n" + first) == 1, (name, last)
            assert 0 <= asked["gold"] < len(asked["options"]) >= 2, name
            assert asked["options"][asked["gold"]] == \
                [asked["options"][j] for j in asked["order"]][asked["shuffled_gold"]]


# --- KMMLU and KR-HumanEval ---------------------------------------------------------------


def test_breakdown_per_group_and_macro(tmp_path):
    """Three questions in group x (2 right) and one in y (wrong): acc (micro) 2/4; x 2/3,
    y 0; macro (2/3 + 0)/2 = 1/3."""
    docs = [{"q": f"q{i}", "g": "x" if i < 3 else "y", "gold": 0 if i < 2 else 1} for i in range(4)]
    task = write_task(tmp_path, {"name": "bd", "kind": "multiple_choice", "prompt": "{{ q }}",
                                 "choices": "['a', 'b']", "target": "gold", "metrics": ["acc"],
                                 "breakdown": {"group": "g", "upper": "g | upper"}}, docs)
    out = kinds.run(task, T.load_docs(task), Scripted({"a": -1.0, "b": -2.0}))
    assert out.metrics["acc"].value == 0.5
    groups = out.notes["breakdown"]["group"]["groups"]
    assert groups["x"]["n"] == 3 and groups["x"]["acc"]["value"] == pytest.approx(2 / 3)
    assert groups["y"]["acc"] == {"value": 0.0, "stderr": None, "higher_is_better": True}
    assert out.notes["breakdown"]["group"]["macro"]["acc"] == pytest.approx(1 / 3)
    assert set(out.notes["breakdown"]["upper"]["groups"]) == {"X", "Y"}


def test_kmmlu_official_prompt_subjects_and_categories():
    root = T.data_root()
    if not (root / "eval" / "kmmlu").is_dir():
        pytest.skip(f"no KMMLU data at {root}/eval/kmmlu")
    task = T.load_task("kmmlu")
    docs = T.load_docs(task)
    assert len(docs) == 35030
    subjects = {d["subject"] for d in docs}
    assert len(subjects) == 45
    categories = {}
    for s in subjects:
        doc = next(d for d in docs if d["subject"] == s)
        categories.setdefault(task.expr("breakdown.category", doc), set()).add(s)
    assert {c: len(v) for c, v in categories.items()} == {"STEM": 11, "Applied Science": 12,
                                                          "HUMSS": 11, "Other": 11}
    doc = docs[0]
    shots = T.FewShot(task)
    prompt = shots.prefix(doc, kinds._choice_answer(task)) + task.prompt(doc)
    # 5 shots from the dev split of the same subject, each answered " A".." D"
    assert [s["subject"] for s in shots.examples(doc)] == [doc["subject"]] * 5
    assert prompt.count("\n정답：") == 6 and prompt.endswith("\n정답：")
    assert prompt.startswith(shots.examples(doc)[0]["question"].strip() + "\nA. ")
    # answer is 1-based: 1 = A
    assert [kinds._index(task, d, task.expr("target", d), ["A", "B", "C", "D"]) for d in docs[:50]] == \
        [d["answer"] - 1 for d in docs[:50]]
    first = shots.examples(doc)[0]
    assert "정답： " + "ABCD"[first["answer"] - 1] + "\n\n" in prompt
    gen = T.with_settings(task, mc_mode="generate")
    asked = kinds.choice_prompts(gen, doc, T.FewShot(gen))
    assert asked["prompt"].endswith(f"{doc['question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\n"
                                    f"C. {doc['C']}\nD. {doc['D']}\n정답：")


def test_kr_humaneval_runs_the_canonical_solutions():
    """The Korean prompts with HumanEval's canonical solutions pass their tests (the
    first 5 problems, in the sandbox): the program template fits the data."""
    root = T.data_root()
    if not (root / "eval" / "kr_humaneval").is_dir():
        pytest.skip(f"no KR-HumanEval data at {root}/eval/kr_humaneval")
    task = T.load_task("kr_humaneval")
    docs = T.load_docs(task, limit=5)
    assert "다" in docs[0]["prompt"]  # Korean docstrings
    solutions = {task.prompt(d): d["canonical_solution"] for d in docs}
    out = kinds.run(task, docs, Scripted(outputs=lambda p: solutions[p]))
    assert out.metrics["pass@1"].value == 1.0
    assert "korean" in T.available_suites() and {"kmmlu", "kr_humaneval"} <= set(T.suite_members("korean"))


def test_runner_applies_run_settings_and_records_the_mode(tmp_path):
    from hcx.evaluation.runner import evaluate

    task = _mc_task(tmp_path, [{"q": "q", "opts": ["w", "x"], "gold": 1}], generate_mode=False)
    model = Scripted({"w": -1.0, "x": -2.0}, outputs=lambda p: "B")
    run = tmp_path / "run"
    plain = evaluate(model, [task], run, log=lambda m: None)["tasks"]["gen"]
    assert plain["mode"] == "loglikelihood" and plain["metrics"]["acc"]["value"] == 0.0
    gen = evaluate(model, [task], run, log=lambda m: None,
                   settings={"mc_mode": "generate"})["tasks"]["gen"]
    assert gen["mode"] == "generate" and gen["metrics"]["acc"]["value"] == 1.0
    assert gen["metrics"]["unparseable"] == {"value": 0.0, "stderr": None, "higher_is_better": False}
