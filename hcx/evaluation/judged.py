"""Judged tasks (``kind: judged``): MT-Bench and KoMT-Bench, chat graded by an LLM judge.

As FastChat's ``llm_judge`` (and the HyperCLOVA X report, which evaluates chat so):

1. the model answers every question's first user turn (chat messages), then its second
   turn with its own first answer in the conversation: one batched ``generate`` call per
   turn, greedy unless ``judge.category_temperatures`` asks for FastChat's sampling;
2. the judge (``hcx eval --judge``, :class:`hcx.evaluation.judges.Judge`) grades each
   turn 1-10 with FastChat's prompts: ``single-v1`` for turn 1, ``single-v1-multi-turn``
   for turn 2, and the ``single-math-v1`` pair with the reference answer (joined by
   question id) for the categories that need one (math, reasoning, coding);
3. optionally (``judge.language_penalty``, KoMT-Bench) a rating r of an answer not in
   the questions' language becomes sqrt(r), except for the listed question ids.

Metrics (mean over the turns whose verdict was parsed, with standard errors): ``score``
(both turns), ``score_turn1``, ``score_turn2``; ``unparsed`` (the share of turns whose
verdict could not be read; they are left out of the scores, as FastChat drops its -1
ratings) and ``penalised`` (the share of answers the language rule deducted). The counts
are in the task's ``judging`` note, and per-category scores in its ``breakdown``.
"""

from __future__ import annotations

import json
import math
import re

from hcx.evaluation.judges import Judge, JudgeError, SingleCase, load_prompts
from hcx.evaluation.metrics import MetricValue, mean_stderr
from hcx.evaluation.models import GenerationRequest, LanguageModel
from hcx.evaluation.tasks import PROMPT_NAME_KEYS, Task, TaskError, data_file


# --- the language of an answer -------------------------------------------------------

# Hangul syllables, jamo and compatibility jamo.
_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]+")
_LETTERS = re.compile(r"[^\W\d_]+")
_CODE = re.compile(r"```.*?(```|$)|`[^`\n]*`", re.DOTALL)


def answer_language(text: str) -> str | None:
    """``"ko"`` if the answer is written in Korean, ``"other"`` if in another language,
    None when it has no letters to tell (numbers, symbols, an empty answer).

    Told by script, not by a statistical detector: code (fenced or inline) is set aside,
    the rest is cut into runs of letters of one script ("Python의" is two runs), and the
    answer is Korean when at least half of the runs are Hangul. Korean prose attaches
    Hangul particles and endings to any English term it uses, so it stays above half
    however many English words it borrows; an English (or other-language) answer has no
    Hangul runs but quoted words. langdetect (installed for IFEval) answers a different
    question, the most likely language of an n-gram profile: it is randomised unless
    seeded, and unreliable on short answers and on Korean mixed with English terms, code
    or maths, the usual MT-Bench answer; KoMT-Bench's own detector (a mediapipe model) is
    not available offline. What the penalty needs, "is this answer in Korean", is what the
    script tells deterministically."""
    prose = _CODE.sub(" ", text)
    hangul = other = 0
    for run in _LETTERS.findall(prose):
        # a run of letters may mix scripts ("Python의"): count each script's part
        parts = _HANGUL.findall(run)
        hangul += len(parts)
        other += len([p for p in _HANGUL.split(run) if p])
    if hangul + other == 0:
        return None
    return "ko" if hangul >= (hangul + other) / 2 else "other"


def penalise(rating: float, rule: str) -> float:
    """KoMT-Bench's deduction (detector.py): sqrt of the rating."""
    if rule != "sqrt":
        raise ValueError(f"unknown penalty rule {rule!r}")
    return math.sqrt(rating)


# --- the task ------------------------------------------------------------------------


def make_judge(task: Task, judge_model: LanguageModel | None) -> Judge:
    """The task's judge: its prompts (checked: every grading the task makes can fill its
    prompt's placeholders) on ``judge_model``. Raises naming the task when the task
    cannot be judged; ``judge_model`` None only checks (``hcx eval`` does so before any
    model is opened)."""
    spec = task.spec.judge
    assert spec is not None
    try:
        prompts = load_prompts(data_file(task, spec.prompts))
        names = {PROMPT_NAME_KEYS[k]: v for k, v in spec.prompt_names.items()}
        judge = Judge(judge_model, prompts, spec.max_new_tokens, names)  # type: ignore[arg-type]
        for turn in (1, 2):
            judge.check_single(turn, reference=False)
            if spec.reference_categories:
                judge.check_single(turn, reference=True)
    except JudgeError as e:
        raise TaskError(f"task {task.name} ({task.file}): {e}") from None
    return judge


def need_judge(tasks: list[Task], judge: object | None) -> None:
    """Raise, naming them, when judged tasks are asked for without a judge."""
    names = [t.name for t in tasks if t.spec.kind == "judged"]
    if names and judge is None:
        raise TaskError(f"task{'s' if len(names) > 1 else ''} {', '.join(names)} "
                        f"{'are' if len(names) > 1 else 'is'} graded by an LLM judge: give one "
                        "with --judge (hcx.evaluate: judge=): an hcx checkpoint, a Hugging "
                        "Face directory or an endpoint URL (docs/eval.md, 'Judged tasks')")


def check(task: Task) -> None:
    """Raise now if a judged task's prompts or reference file are unusable."""
    make_judge(task, None)
    if task.spec.judge.references:
        read_references(task)


def read_references(task: Task) -> dict[str, list[str]]:
    """Reference answers by question id (as text): FastChat's ``choices[0].turns``."""
    path = data_file(task, task.spec.judge.references)
    refs: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                refs[str(row["question_id"])] = [str(t) for t in row["choices"][0]["turns"]]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                raise TaskError(f"task {task.name}: {path}:{lineno}: not a reference answer "
                                f"(question_id, choices[0].turns): {e!r}") from None
    return refs


def questions_of(task: Task, docs: list[dict]) -> list[dict]:
    """Each doc as the judged task asks it: ``id``, ``category`` and ``turns`` (each user
    turn rendered with the task's ``prompt``, the turn's text as ``turn``)."""
    out = []
    for doc in docs:
        turns = list(task.expr("judge.turns", doc))
        if not 1 <= len(turns) <= 2:
            raise TaskError(f"task {task.name}: doc {doc['__where__']} has {len(turns)} turns; "
                            "judged tasks grade 1 or 2 (FastChat's judge prompts)")
        out.append({"id": task.expr("judge.id", doc), "category": str(task.expr("judge.group", doc)),
                    "turns": [task.prompt(doc, turn=t, turn_index=i + 1) for i, t in enumerate(turns)]})
    return out


def _answer_requests(task: Task, questions: list[dict], answers: list[list[str]],
                     turn: int) -> tuple[list[int], list[GenerationRequest]]:
    """The chat requests of turn ``turn`` (1-based) of every question that has it: the
    earlier turns with the model's own answers, then the turn's question."""
    gen, temps = task.spec.generation, task.spec.judge.category_temperatures
    owners, requests = [], []
    for i, q in enumerate(questions):
        if len(q["turns"]) < turn:
            continue
        messages = []
        for t in range(turn - 1):
            messages += [{"role": "user", "content": q["turns"][t]},
                         {"role": "assistant", "content": answers[i][t]}]
        messages.append({"role": "user", "content": q["turns"][turn - 1]})
        temperature = temps.get(q["category"], gen.temperature)
        owners.append(i)
        requests.append(GenerationRequest(messages, gen.max_new_tokens, tuple(gen.stop), True,
                                          temperature, gen.top_p, gen.seed + 2 * i + turn - 1))
    return owners, requests


def judged(task: Task, docs: list[dict], model: LanguageModel,
           judge_model: LanguageModel | None) -> tuple[list[dict], dict[str, MetricValue], dict]:
    """Answer, judge and score a judged task's docs: ``(records, metrics, notes)``, what
    :class:`hcx.evaluation.kinds.Outcome` holds."""
    need_judge([task], judge_model)
    spec = task.spec.judge
    judge = make_judge(task, judge_model)
    refs = read_references(task) if spec.references else {}
    questions = questions_of(task, docs)
    for q in questions:
        q["reference"] = None
        if q["category"] in spec.reference_categories:
            q["reference"] = refs.get(str(q["id"]))
            if q["reference"] is None:
                raise TaskError(f"task {task.name}: question {q['id']} ({q['category']}) is graded "
                                f"with a reference answer, and "
                                f"{spec.references or 'no judge.references file'} has none for it")

    # 1. the model answers, turn by turn (turn 2 sees its own turn-1 answer)
    answers: list[list[str]] = [[] for _ in questions]
    for turn in (1, 2):
        owners, requests = _answer_requests(task, questions, answers, turn)
        if requests:
            for i, text in zip(owners, model.generate(requests, desc=f"{task.name} turn {turn}")):
                answers[i].append(text)

    # 2. the judge grades every turn, in one call
    cases, where = [], []
    for i, q in enumerate(questions):
        for turn in range(1, len(q["turns"]) + 1):
            cases.append(SingleCase(q["turns"], answers[i][:turn], q["reference"], turn))
            where.append((i, turn))
    try:
        verdicts = judge.single_many(cases, desc=f"{task.name} judge")
    except JudgeError as e:
        raise TaskError(f"task {task.name} ({task.file}): {e}") from None

    # 3. records, the language rule
    penalty = spec.language_penalty
    records = [{"doc": d["__where__"], "question_id": q["id"], "category": q["category"],
                "prompt": q["turns"][0], "turns": q["turns"], "answers": answers[i],
                "reference": q["reference"], "judge_prompts": [], "judgments": [],
                "ratings": [], "judge_ratings": [], "languages": [], "penalised": []}
               for i, (d, q) in enumerate(zip(docs, questions))]
    for (i, turn), verdict in zip(where, verdicts):
        rec = records[i]
        rating = verdict.rating
        language = answer_language(answers[i][turn - 1])
        hit = bool(penalty is not None and rating is not None and language == "other"
                   and str(rec["question_id"]) not in {str(x) for x in penalty.exempt})
        rec["judge_prompts"].append(verdict.prompt)
        rec["judgments"].append(verdict.judgment)
        rec["judge_ratings"].append(rating)
        rec["ratings"].append(penalise(rating, penalty.rule) if hit else rating)
        rec["languages"].append(language)
        rec["penalised"].append(hit)
    for rec in records:
        parsed = [r for r in rec["ratings"] if r is not None]
        rec["score"] = sum(parsed) / len(parsed) if parsed else None
    wanted = task.spec.metrics
    return (records, {m: v for m, v in metrics(records).items() if m in wanted},
            notes(records, task, judge_model))


def _mean(values: list[float], higher_is_better: bool = True) -> MetricValue:
    if not values:  # every verdict unparsed: no score (null in scores.json)
        return MetricValue(float("nan"), None, higher_is_better)
    return MetricValue(*mean_stderr(values), higher_is_better)


def metrics(records: list[dict]) -> dict[str, MetricValue]:
    """score / score_turn1 / score_turn2 over the parsed turns; unparsed and penalised
    as shares of the judged turns."""
    turns = [(t, r) for rec in records for t, r in enumerate(rec["ratings"], 1)]
    return {
        "score": _mean([r for _, r in turns if r is not None]),
        "score_turn1": _mean([r for t, r in turns if t == 1 and r is not None]),
        "score_turn2": _mean([r for t, r in turns if t == 2 and r is not None]),
        "unparsed": _mean([float(r is None) for _, r in turns], False),
        "penalised": _mean([float(p) for rec in records for p in rec["penalised"]], False),
    }


def notes(records: list[dict], task: Task, judge_model: LanguageModel) -> dict:
    """The counts behind the shares, the judge, and the per-category scores (in the
    shape of :func:`hcx.evaluation.kinds.breakdown`: ``breakdown.category``)."""
    turns = [r for rec in records for r in rec["ratings"]]
    by_turn = {f"turn{t}": sum(1 for rec in records if len(rec["ratings"]) >= t
                               and rec["ratings"][t - 1] is None) for t in (1, 2)}
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["category"], []).append(rec)
    table = {}
    for g, recs in sorted(groups.items()):
        table[g] = {"n": len(recs), **{m: v.to_json() for m, v in metrics(recs).items()
                                       if m in task.spec.metrics}}
    values = [t["score"]["value"] for t in table.values() if t["score"]["value"] is not None]
    return {
        "judging": {
            "judge": {"name": judge_model.name, "path": judge_model.path, "kind": judge_model.kind},
            "judged_turns": len(turns), "unparsed": sum(r is None for r in turns),
            "unparsed_by_turn": by_turn,
            "penalised": sum(p for rec in records for p in rec["penalised"]),
            "language_penalty": (task.spec.judge.language_penalty.model_dump(by_alias=True)
                                 if task.spec.judge.language_penalty else None),
        },
        "breakdown": {"category": {"groups": table,
                                   "macro": {"score": sum(values) / len(values) if values else None}}},
    }
