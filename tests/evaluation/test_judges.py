"""LLM judges (hcx.evaluation.judges) and judged tasks (hcx.evaluation.judged): verdict
parsing, FastChat's position-swap rule, strict prompt templates, and MT-Bench scored by
hand on made-up questions with scripted models; then the command line with a tiny judge."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from hcx.evaluation import judged as J
from hcx.evaluation import kinds
from hcx.evaluation import tasks as T
from hcx.evaluation.judges import (Judge, JudgeError, PairCase, combine_orders, load_prompts,
                                   parse_rating, parse_verdict)
from hcx.evaluation.models import Budget, LanguageModel
from hcx.evaluation.runner import evaluate, settings_key
from tests.conftest import hcx


class Chat(LanguageModel):
    """Characters are tokens; a conversation is rendered as ``<role>content`` blocks, and
    ``reply`` maps the rendered prompt to the model's answer. Counts generate calls."""

    kind = "hf"

    def __init__(self, reply, name: str = "chat"):
        self.name, self.path, self.max_length = name, f"/{name}", 100_000
        self.budget = Budget(batch_size=4)
        self.reply = reply
        self.calls = 0
        self.prompts: list[str] = []

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    @property
    def eot_id(self):
        return 0

    def chat_prompt(self, prompt):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def generate(self, requests, desc="generate"):
        self.calls += 1
        return super().generate(requests, desc)

    def _score(self, requests):
        raise AssertionError("judged tasks do not score")

    def _generate(self, prompts, max_new_tokens, stops, sampling=None):
        texts = [self.decode(p) for p in prompts]
        self.prompts += texts
        return [self.reply(t) for t in texts]


# FastChat's prompt names and placeholders, with short made-up texts.
PROMPTS = [
    {"name": "single-v1", "type": "single", "system_prompt": "SYS-GENERAL",
     "prompt_template": "[Q]{question}[A]{answer}", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "SYS-MATH",
     "prompt_template": "[Q]{question}[REF]{ref_answer_1}[A]{answer}", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "SYS-GENERAL2",
     "prompt_template": "[Q1]{question_1}[A1]{answer_1}[Q2]{question_2}[A2]{answer_2}",
     "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "SYS-MATH2",
     "prompt_template": "[Q1]{question_1}[REF1]{ref_answer_1}[Q2]{question_2}[REF2]{ref_answer_2}"
                        "[A1]{answer_1}[A2]{answer_2}", "output_format": "[[rating]]"},
    {"name": "pair-v2", "type": "pairwise", "system_prompt": "SYS-PAIR",
     "prompt_template": "[Q]{question}[A]{answer_a}[B]{answer_b}", "output_format": "[[A]]"},
]


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


# --- parsing -------------------------------------------------------------------------

@pytest.mark.parametrize("text, rating", [
    ("Good answer. Rating: [[7]]", 7.0),
    ("[[10]]", 10.0),
    ("[[1]]", 1.0),
    ("Rating: [[5.5]]", 5.5),              # a decimal rating is read (FastChat's pattern)
    ("[[8]] ... so, Rating: [[8]]", 8.0),  # the same rating twice counts once
    ("[[0]]", None),                       # out of range
    ("[[11]]", None),
    ("Rating: [[3]], no wait, [[6]]", None),  # two different ratings: never guessed
    ("Rating: [5]", None),                 # single brackets (FastChat's fallback) are not read
    ("I would give it a seven.", None),
    ("[[rating]]", None),
    ("", None),
])
def test_rating_parsing(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize("text, verdict", [
    ("[[A]]", "A"), ("so [[B]]", "B"), ("tie: [[C]]", "C"), ("[[A]] ... [[A]]", "A"),
    ("[[A]] or [[B]]", None), ("A is better", None), ("[A]", None),
])
def test_verdict_parsing(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("first, second, winner", [
    ("A", "B", "A"),      # a wins in both orders (second order shows b as A)
    ("B", "A", "B"),
    ("A", "A", "tie"),    # inconsistent: position bias
    ("B", "B", "tie"),
    ("C", "C", "tie"),
    ("A", "C", "tie"),    # a tie in either order
    ("C", "B", "tie"),
    ("A", None, None),    # an order unparsed: the pair is unparsed (FastChat drops it)
    (None, "B", None),
])
def test_pairwise_position_swap_rule(first, second, winner):
    assert combine_orders(first, second) == winner


def test_pairwise_judges_both_orders_in_one_call(tmp_path):
    def reply(prompt):  # prefers the answer "good" wherever it is shown
        return "[[A]]" if "[A]good" in prompt else "[[B]]" if "[B]good" in prompt else "hmm"

    model = Chat(reply)
    judge = Judge(model, load_prompts(write_prompts(tmp_path / "p.jsonl")))
    cases = [PairCase(["q1"], ["good"], ["bad"]), PairCase(["q2"], ["bad"], ["good"]),
             PairCase(["q3"], ["x"], ["y"])]
    v = judge.pairwise_many(cases)
    assert model.calls == 1 and len(model.prompts) == 6
    assert [x.winner for x in v] == ["A", "B", None]
    assert [[o.verdict for o in x.orders] for x in v] == [["A", "B"], ["B", "A"], [None, None]]
    assert model.prompts[0] == "<system>SYS-PAIR<user>[Q]q1[A]good[B]bad<assistant>"
    assert model.prompts[1] == "<system>SYS-PAIR<user>[Q]q1[A]bad[B]good<assistant>"


def test_single_grading_messages_and_strict_templates(tmp_path):
    model = Chat(lambda p: "Rating: [[6]]")
    judge = Judge(model, load_prompts(write_prompts(tmp_path / "p.jsonl")), max_new_tokens=7)
    v = judge.single(["2+2?", "and 3+3?"], ["4", "6"], reference=["four", "six"], turn=2)
    assert (v.rating, v.prompt, v.judgment) == (6.0, "single-math-v1-multi-turn", "Rating: [[6]]")
    assert model.prompts == ["<system>SYS-MATH2<user>[Q1]2+2?[REF1]four[Q2]and 3+3?[REF2]six"
                             "[A1]4[A2]6<assistant>"]
    # a turn-1 template naming a turn-2 placeholder cannot be filled: an error naming all
    bad = [dict(PROMPTS[0], prompt_template="[Q]{question}[A]{answer}[Q2]{question_2}")]
    judge = Judge(model, load_prompts(write_prompts(tmp_path / "bad.jsonl", bad)))
    with pytest.raises(JudgeError, match=r"bad\.jsonl: judge prompt 'single-v1' names the "
                                         r"placeholder \{question_2\}"):
        judge.single(["q"], ["a"])
    with pytest.raises(JudgeError, match="no judge prompt 'single-math-v1'"):
        judge.single(["q"], ["a"], reference=["r"])


def test_prompts_from_yaml(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("single-v1:\n  type: single\n  system_prompt: ''\n"
                    "  prompt_template: 'Q: {question} A: {answer}'\n  output_format: '[[rating]]'\n")
    model = Chat(lambda p: "[[3]]")
    v = Judge(model, load_prompts(path)).single(["q"], ["a"])
    assert v.rating == 3.0 and model.prompts == ["<user>Q: q A: a<assistant>"]  # no empty system


# --- a judged task by hand -------------------------------------------------------------

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["시를 써 주세요", "더 짧게 써 주세요"]},
    {"question_id": 2, "category": "math", "turns": ["2+2는?", "3+3은?"]},
    {"question_id": 3, "category": "extraction", "turns": ["JSON으로 답하세요", "다시"]},
]
REFERENCES = [{"question_id": 2, "choices": [{"index": 0, "turns": ["REF-4", "REF-6"]}]},
              {"question_id": 99, "choices": [{"index": 0, "turns": ["no such question"]}]}]
ANSWERS = {"시를 써 주세요": "봄이 왔어요, Python의 list처럼", "더 짧게 써 주세요": "Spring came",
           "2+2는?": "답은 4입니다", "3+3은?": "The answer is 6",
           "JSON으로 답하세요": '{"answer": "value"}', "다시": "ok"}
# what the judge says of each (question, turn): turn 2 of question 3 has no rating
VERDICTS = {("시를", 1): "[[9]]", ("시를", 2): "Rating: [[4]]", ("2+2", 1): "[[8]]",
            ("2+2", 2): "[[9]]", ("JSON", 1): "[[7]]", ("JSON", 2): "I cannot rate this"}


def judged_task(tmp_path: Path, prompts=PROMPTS, penalty=True) -> T.Task:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS))
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in REFERENCES))
    judge = {"prompts": str(write_prompts(tmp_path / "judge_prompts.jsonl", prompts)),
             "references": str(refs), "max_new_tokens": 50}
    if penalty:
        judge["language_penalty"] = {"language": "ko", "rule": "sqrt", "except": [3]}
    spec = {"name": "mini_mt", "language": "ko", "category": "chat", "kind": "judged",
            "dataset": {"files": str(data)}, "prompt": "{{ turn }}", "judge": judge,
            "generation": {"max_new_tokens": 40},
            "metrics": ["score", "score_turn1", "score_turn2", "unparsed", "penalised"]}
    path = tmp_path / "mini_mt.yaml"
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return T.load_task(str(path))


def answering_model() -> Chat:
    def reply(prompt):
        last = prompt.rsplit("<user>", 1)[1].removesuffix("<assistant>")
        return ANSWERS[last]
    return Chat(reply, "answerer")


def judging_model() -> Chat:
    def reply(prompt):
        turn = 2 if "[Q2]" in prompt else 1
        key = next(k for k in ("시를", "2+2", "JSON") if k in prompt)
        return VERDICTS[(key, turn)]
    return Chat(reply, "judge")


def test_judged_task_scored_by_hand(tmp_path):
    task = judged_task(tmp_path)
    model, judge = answering_model(), judging_model()
    out = kinds.run(task, T.load_docs(task), model, judge=judge)
    # one generate call per turn, one for the judge
    assert model.calls == 2 and judge.calls == 1 and len(judge.prompts) == 6
    # turn 2 is asked with the model's own turn-1 answer in the conversation
    assert ("<user>2+2는?<assistant>답은 4입니다<user>3+3은?<assistant>") in model.prompts
    # the math question is graded with the reference prompts and references
    math_prompts = sorted(p for p in judge.prompts if "2+2" in p)  # (batched longest first)
    assert math_prompts == sorted([
        "<system>SYS-MATH<user>[Q]2+2는?[REF]REF-4[A]답은 4입니다<assistant>",
        "<system>SYS-MATH2<user>[Q1]2+2는?[REF1]REF-4[Q2]3+3은?[REF2]REF-6"
        "[A1]답은 4입니다[A2]The answer is 6<assistant>"])
    # the general turn-2 prompt holds the turn-1 answer
    assert any(p.startswith("<system>SYS-GENERAL2<user>[Q1]시를 써 주세요[A1]봄이 왔어요")
               for p in judge.prompts)
    recs = {r["question_id"]: r for r in out.samples}
    assert recs[2]["judge_prompts"] == ["single-math-v1", "single-math-v1-multi-turn"]
    assert recs[1]["judge_prompts"] == ["single-v1", "single-v1-multi-turn"]
    assert recs[1]["answers"] == ["봄이 왔어요, Python의 list처럼", "Spring came"]
    # English answers to Korean questions: sqrt(4) = 2, sqrt(9) = 3; question 3 is exempt
    # (its JSON answer is not Korean either) and its turn 2 is unparsed
    assert recs[1]["languages"] == ["ko", "other"] and recs[3]["languages"] == ["other", "other"]
    assert recs[1]["judge_ratings"] == [9.0, 4.0] and recs[1]["ratings"] == [9.0, 2.0]
    assert recs[2]["ratings"] == [8.0, 3.0] and recs[2]["penalised"] == [False, True]
    assert recs[3]["ratings"] == [7.0, None] and recs[3]["penalised"] == [False, False]
    assert recs[3]["judgments"][1] == "I cannot rate this"
    m = {k: v.value for k, v in out.metrics.items()}
    assert m["score_turn1"] == pytest.approx(8.0)           # (9 + 8 + 7) / 3
    assert m["score_turn2"] == pytest.approx(2.5)           # (2 + 3) / 2, one unparsed
    assert m["score"] == pytest.approx(29 / 5)              # the five parsed turns
    assert m["unparsed"] == pytest.approx(1 / 6) and m["penalised"] == pytest.approx(2 / 6)
    ratings = [9, 8, 7, 2, 3]
    sd = math.sqrt(sum((r - 29 / 5) ** 2 for r in ratings) / 4)
    assert out.metrics["score"].stderr == pytest.approx(sd / math.sqrt(5))
    judging = out.notes["judging"]
    assert (judging["judged_turns"], judging["unparsed"], judging["penalised"]) == (6, 1, 2)
    assert judging["unparsed_by_turn"] == {"turn1": 0, "turn2": 1}
    groups = out.notes["breakdown"]["category"]["groups"]
    assert {g: v["score"]["value"] for g, v in groups.items()} == {
        "extraction": 7.0, "math": 5.5, "writing": 5.5}


def test_without_the_penalty_ratings_stand(tmp_path):
    task = judged_task(tmp_path, penalty=False)
    out = kinds.run(task, T.load_docs(task), answering_model(), judge=judging_model())
    assert out.metrics["score_turn2"].value == pytest.approx(6.5)  # (4 + 9) / 2
    assert out.metrics["penalised"].value == 0


@pytest.mark.parametrize("text, language", [
    ("안녕하세요. 오늘 날씨가 좋네요.", "ko"),
    ("Python의 list comprehension은 매우 유용합니다.", "ko"),   # English terms in Korean prose
    ("다음 코드를 보세요:\n```python\ndef add(a, b):\n    return a + b\n```\n간단합니다.", "ko"),
    ("The answer is 4.", "other"),
    ("The Korean word 사랑 means love.", "other"),
    ("42 + 7 = 49", None),
])
def test_answer_language(text, language):
    assert J.answer_language(text) == language


def test_bad_judge_placeholder_names_task_prompt_and_placeholder(tmp_path):
    bad = [dict(p) for p in PROMPTS]
    bad[1]["prompt_template"] = "[Q]{question}[REF]{reference_answer}[A]{answer}"
    task = judged_task(tmp_path, prompts=bad)
    with pytest.raises(T.TaskError, match=r"task mini_mt .*judge_prompts\.jsonl: judge prompt "
                                          r"'single-math-v1' names the placeholder "
                                          r"\{reference_answer\}"):
        J.check(task)
    with pytest.raises(T.TaskError, match="single-math-v1"):  # evaluating checks it too
        evaluate(answering_model(), [task], tmp_path / "run", judge=judging_model(), log=lambda m: None)


def test_a_judged_task_needs_a_judge_and_keeps_results_per_judge(tmp_path):
    task = judged_task(tmp_path)
    with pytest.raises(T.TaskError, match="task mini_mt is graded by an LLM judge: give one "
                                          "with --judge"):
        evaluate(answering_model(), [task], tmp_path / "run", log=lambda m: None)
    model = answering_model()
    assert settings_key(task, model, None, False, judging_model()) != \
        settings_key(task, model, None, False, Chat(lambda p: "", "another-judge"))
    scores = evaluate(model, [task], tmp_path / "run", judge=judging_model(), log=lambda m: None)
    entry = scores["tasks"]["mini_mt"]
    assert entry["metrics"]["score"]["value"] == pytest.approx(29 / 5)
    assert entry["judging"]["judge"]["path"] == "/judge"
    lines = (tmp_path / "run" / "samples" / "mini_mt.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["ratings"] for x in lines] == [[9.0, 2.0], [8.0, 3.0], [7.0, None]]


def test_shipped_judged_tasks(tmp_path):
    """mt_bench and ko_mt_bench: 80 questions each, references for every math/reasoning/
    coding question, prompts that fill; in the chat suite only (the default `all` and
    `korean` suites run without a judge)."""
    if not (T.data_root() / "eval" / "mt_bench_en").is_dir():
        pytest.skip("no MT-Bench data")
    for name in ("mt_bench", "ko_mt_bench"):
        task = T.load_task(name)
        J.check(task)
        docs = T.load_docs(task)
        refs = J.read_references(task)
        assert len(docs) == 80
        needing = [d for d in docs if d["category"] in task.spec.judge.reference_categories]
        assert len(needing) == 30 and all(str(d["question_id"]) in refs for d in needing)
    assert T.load_task("ko_mt_bench").spec.judge.language_penalty.exempt == [138, 140]
    assert T.suite_members("chat") == ["ko_mt_bench", "mt_bench"]
    for suite in T.available_suites():
        if suite != "chat":
            assert not {"mt_bench", "ko_mt_bench"} & set(T.suite_members(suite)), suite


# --- the command line ------------------------------------------------------------------

def test_cli_mt_bench_with_a_tiny_judge_and_its_report(sft_checkpoint, tmp_path):
    """The tiny model judges itself: its verdicts go unparsed and are counted; the report
    draws the per-category chart."""
    no_judge = hcx("eval", str(sft_checkpoint), "--tasks", "chat", "--limit", "1",
                   "--out", str(tmp_path / "none"), check=False)
    assert no_judge.returncode != 0
    assert "tasks ko_mt_bench, mt_bench are graded by an LLM judge" in no_judge.stderr
    out = tmp_path / "run"
    hcx("eval", str(sft_checkpoint), "--tasks", "mt_bench", "--limit", "2", "--judge",
        str(sft_checkpoint), "--max-new-tokens", "8", "--out", str(out))
    entry = json.loads((out / "scores.json").read_text())["tasks"]["mt_bench"]
    judging = entry["judging"]
    assert judging["judged_turns"] == 4
    assert entry["metrics"]["unparsed"]["value"] == judging["unparsed"] / 4
    assert judging["judge"]["path"] == str(Path(sft_checkpoint).resolve())
    assert set(entry["breakdown"]["category"]["groups"]) == {"writing"}
    record = json.loads((out / "samples" / "mt_bench.jsonl").read_text().splitlines()[0])
    assert record["judge_prompts"] == ["single-v1", "single-v1-multi-turn"]
    assert len(record["answers"]) == len(record["judgments"]) == 2
    # another hcx checkpoint as the judge: two checkpoints open in one process
    other = tmp_path / "judge"
    shutil.copytree(sft_checkpoint, other)
    hcx("eval", str(sft_checkpoint), "--tasks", "ko_mt_bench", "--limit", "2", "--judge",
        str(other), "--max-new-tokens", "8", "--out", str(out))
    scores = json.loads((out / "scores.json").read_text())["tasks"]
    assert scores["ko_mt_bench"]["judging"]["judge"]["path"] == str(other.resolve())
    assert scores["ko_mt_bench"]["judging"]["judged_turns"] == 4 and "mt_bench" in scores
    hcx("report", str(out), "--out", str(tmp_path / "report"))
    png = tmp_path / "report" / "judged_categories.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Judged tasks by category" in md and "](judged_categories.png)" in md
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert 'alt="score per category of the judged tasks"' in html


# --- the report --------------------------------------------------------------------------

def _judged_run(root: Path, name: str, math_score: float, writing_score: float) -> Path:
    def m(v, hib=True):
        return {"value": v, "stderr": 0.5 if v is not None else None, "higher_is_better": hib}

    overall = (math_score + writing_score) / 2
    entry = {"language": "ko", "category": "chat", "kind": "judged", "n": 4, "primary": "score",
             "metrics": {"score": m(overall), "score_turn1": m(overall), "score_turn2": m(overall),
                         "unparsed": m(0.25, False)},
             "breakdown": {"category": {"groups": {
                 "math": {"n": 2, "score": m(math_score)},
                 "writing": {"n": 2, "score": m(writing_score)}}, "macro": {"score": overall}}}}
    run = root / name
    run.mkdir()
    (run / "scores.json").write_text(json.dumps({
        "format": 1, "model": {"name": name, "path": f"/{name}", "kind": "hcx"},
        "tasks": {"ko_mt_bench": entry}}))
    return run


def test_report_shows_judged_scores_per_category(tmp_path):
    from hcx.evaluation.report import build_report, load_run, merge_runs

    runs = [_judged_run(tmp_path, "base", 4.0, 6.0), _judged_run(tmp_path, "sft", 5.5, 7.25)]
    data = merge_runs([load_run(r) for r in runs])
    score = data["tasks"]["ko_mt_bench"]["metrics"]["score"]
    assert score["scale"] == 10.0 and score["display"] == {"base": 50.0, "sft": 63.75}
    assert data["tasks"]["ko_mt_bench"]["metrics"]["unparsed"]["scale"] == 100.0
    assert data["judged"] == {"ko_mt_bench": {"categories": ["math", "writing"], "runs": {
        "base": {"math": 4.0, "writing": 6.0}, "sft": {"math": 5.5, "writing": 7.25}}}}
    paths = build_report(runs, tmp_path / "report")
    md = paths["md"].read_text(encoding="utf-8")
    assert "| math | 4.00 | 5.50 |" in md and "| writing | 6.00 | 7.25 |" in md
    assert paths["judged_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text(encoding="utf-8")
    assert html.count("<img ") == 3 and "<td>7.25</td>" in html
