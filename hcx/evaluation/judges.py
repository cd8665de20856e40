"""LLM judges: a language model grading answers with prompts that are data.

A :class:`Judge` wraps any :class:`~hcx.evaluation.models.LanguageModel` (an hcx
checkpoint, a Hugging Face directory, an endpoint: anything that answers ``generate``
with chat messages) and a set of judge prompts in FastChat's ``llm_judge`` format
(``judge_prompts.jsonl``: one prompt per line with ``name``, ``type`` single|pairwise,
``system_prompt``, ``prompt_template`` and ``output_format``), or the same fields in a
YAML file. It knows nothing of tasks: plain questions and answers go in, verdicts come
out, so evaluation (MT-Bench, :mod:`hcx.evaluation.judged`) and alignment use the same
code.

What it does, as FastChat (``fastchat/llm_judge/common.py``) does:

- **single-answer grading**: the judge reads a question and an answer (turn 1:
  ``single-v1``; turn 2 reads the whole conversation and grades the second answer:
  ``single-v1-multi-turn``), with a reference answer for the categories that need one
  (``single-math-v1`` and ``single-math-v1-multi-turn``), and writes a rating ``[[n]]``,
  1 to 10;
- **pairwise comparison**: the judge reads two answers and writes ``[[A]]``, ``[[B]]`` or
  ``[[C]]`` (a tie). Each pair is judged in both orders (position bias): the same winner
  both times wins; a tie in either order or two different winners is a tie; an order
  whose verdict cannot be read makes the pair unparsed (FastChat drops such games).

Every prompt goes to the judge as ``[system, user]`` chat messages, decoded greedily (as
FastChat's temperature 0) up to ``max_new_tokens`` (2048, FastChat's ``max_tokens``).
All requests of a call go to the model in one ``generate`` call, which batches them.

Parsing is strict and never guesses (FastChat takes the first ``[[n]]``, else a single
``[n]``): a rating is read only from ``[[n]]`` with 1 <= n <= 10, ``n`` an integer or a
decimal (``[[5.5]]`` reads 5.5: FastChat's pattern allows decimals and a judge writing
half points has given a clear rating); the same rating written twice counts once; two
different ratings, none, a rating out of range (``[[0]]``, ``[[11]]``) or only single
brackets leave the verdict unparsed (``rating`` None), which callers count and report.
A pairwise verdict must name exactly one of ``[[A]]``, ``[[B]]``, ``[[C]]``.

Templates are filled strictly: a template naming a placeholder the judge cannot fill
(``{ref_answer_1}`` without a reference, ``{question_2}`` when grading turn 1) is an
error naming the prompt file, the prompt and the placeholder, never an empty string.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hcx.errors import HcxError
from hcx.evaluation.models import GenerationRequest, LanguageModel


class JudgeError(HcxError, ValueError):
    pass


#: FastChat's judge max_tokens.
DEFAULT_MAX_NEW_TOKENS = 2048

#: The prompt each grading uses by default: FastChat's names (``make_judge_single`` and
#: ``make_judge_pairwise`` in gen_judgment.py). Keys: ``(type, with reference, turn)``.
DEFAULT_PROMPTS: dict[tuple[str, bool, int], str] = {
    ("single", False, 1): "single-v1",
    ("single", True, 1): "single-math-v1",
    ("single", False, 2): "single-v1-multi-turn",
    ("single", True, 2): "single-math-v1-multi-turn",
    ("pairwise", False, 1): "pair-v2",
    ("pairwise", True, 1): "pair-math-v1",
    ("pairwise", False, 2): "pair-v2-multi-turn",
    ("pairwise", True, 2): "pair-math-v1-multi-turn",
}

_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_rating(judgment: str) -> float | None:
    """The rating ``[[n]]`` of a judgment (1 <= n <= 10), or None: no rating, two
    different ratings, or one out of range (see the module's docstring)."""
    found = {float(m) for m in _RATING.findall(judgment)}
    if len(found) != 1:
        return None
    (rating,) = found
    return rating if 1 <= rating <= 10 else None


def parse_verdict(judgment: str) -> Literal["A", "B", "C"] | None:
    """``A``, ``B`` or ``C`` (tie) when the judgment names exactly one of ``[[A]]``,
    ``[[B]]``, ``[[C]]`` (repeats allowed), else None."""
    found = set(_VERDICT.findall(judgment))
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


# --- prompts -------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePrompt:
    """One judge prompt (FastChat's fields) and the file it came from."""

    name: str
    type: Literal["single", "pairwise"]
    system_prompt: str
    prompt_template: str
    output_format: str
    file: str

    def placeholders(self) -> list[str]:
        """The ``{name}`` fields of the template, in order (``{{`` is a literal brace)."""
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template)
                      if f is not None]
        except ValueError as e:
            raise JudgeError(f"{self.file}: judge prompt {self.name!r}: its prompt_template "
                             f"is not a format string ({e})") from None
        return list(dict.fromkeys(fields))

    def check(self, available: set[str], what: str) -> None:
        """Raise unless every placeholder is one of ``available``."""
        for name in self.placeholders():
            if name not in available:
                raise JudgeError(
                    f"{self.file}: judge prompt {self.name!r} names the placeholder "
                    f"{{{name}}}, which {what} does not fill (it fills "
                    f"{', '.join('{' + a + '}' for a in sorted(available))})")

    def fill(self, values: dict[str, str], what: str) -> str:
        self.check(set(values), what)
        return self.prompt_template.format(**values)


_FIELDS = ("name", "type", "system_prompt", "prompt_template", "output_format")


def load_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """Judge prompts by name from a FastChat ``judge_prompts.jsonl`` file, or a YAML file
    holding a list of prompts with the same fields (or a mapping name -> fields)."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"{path}: no such judge prompt file")
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[str, dict]] = []
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or []
        if isinstance(data, dict):
            data = [{"name": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
        if not isinstance(data, list):
            raise JudgeError(f"{path}: expected a list of judge prompts")
        rows = [(f"{path} (prompt {i + 1})", row) for i, row in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise JudgeError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    prompts: dict[str, JudgePrompt] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise JudgeError(f"{where}: expected an object with {', '.join(_FIELDS)}")
        missing = [f for f in _FIELDS if f not in row]
        if missing:
            raise JudgeError(f"{where}: judge prompt lacks {', '.join(missing)}")
        if row["type"] not in ("single", "pairwise"):
            raise JudgeError(f"{where}: judge prompt {row['name']!r}: type must be single or "
                             f"pairwise, not {row['type']!r}")
        prompt = JudgePrompt(**{f: str(row[f]) for f in _FIELDS}, file=str(path))
        prompt.placeholders()  # a malformed template fails here, at load time
        prompts[prompt.name] = prompt
    if not prompts:
        raise JudgeError(f"{path}: holds no judge prompts")
    return prompts


# --- verdicts ------------------------------------------------------------------------


@dataclass
class Verdict:
    """A single-answer grading: the rating (None: unparsed), the judge's text and the
    prompt it was asked with."""

    rating: float | None
    judgment: str
    prompt: str

    @property
    def parsed(self) -> bool:
        return self.rating is not None


@dataclass
class OrderVerdict:
    """One order of a pairwise comparison: ``A``/``B``/``C`` as the judge wrote it for
    that order (None: unparsed) and the judge's text."""

    verdict: Literal["A", "B", "C"] | None
    judgment: str


@dataclass
class PairVerdict:
    """A pairwise comparison judged in both orders: ``winner`` is ``"A"`` (the first
    answer given), ``"B"``, ``"tie"``, or None when an order could not be read.
    ``orders[0]`` showed (a, b), ``orders[1]`` (b, a), as the judge wrote them."""

    winner: Literal["A", "B", "tie"] | None
    orders: tuple[OrderVerdict, OrderVerdict]
    prompt: str

    @property
    def parsed(self) -> bool:
        return self.winner is not None


def combine_orders(first: str | None, second: str | None) -> Literal["A", "B", "tie"] | None:
    """FastChat's rule for the two orders (``show_result.py``): ``first`` judged (a, b),
    ``second`` judged (b, a), each ``A``/``B``/``C`` or None. Unparsed in either: None;
    the same answer winning both: that answer; else (a tie in either, or inconsistent
    winners): a tie."""
    if first is None or second is None:
        return None
    winners = {"A": "A", "B": "B", "C": "tie"}[first], {"A": "B", "B": "A", "C": "tie"}[second]
    return winners[0] if winners[0] == winners[1] and winners[0] != "tie" else "tie"


@dataclass
class SingleCase:
    """One answer to grade: the question's user turns, the assistant's answers (as many
    as ``turn``), reference answers per turn (or None) and the turn graded (1 or 2)."""

    questions: list[str]
    answers: list[str]
    reference: list[str] | None = None
    turn: int = 1


@dataclass
class PairCase:
    """Two assistants' answers to one question, graded at ``turn``."""

    questions: list[str]
    answers_a: list[str]
    answers_b: list[str]
    reference: list[str] | None = None
    turn: int = 1


@dataclass
class Judge:
    """A language model that grades answers with the prompts in ``prompts`` (by name).
    ``names`` overrides which prompt a grading uses (keys as :data:`DEFAULT_PROMPTS`)."""

    model: LanguageModel
    prompts: dict[str, JudgePrompt]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    names: dict[tuple[str, bool, int], str] = field(default_factory=dict)

    def prompt_for(self, kind: str, reference: bool, turn: int) -> JudgePrompt:
        """The prompt of a ``kind`` (single|pairwise) grading at ``turn``, with or
        without a reference answer."""
        if turn not in (1, 2):
            raise JudgeError(f"judges grade turn 1 or 2 (FastChat's prompts), not turn {turn}")
        name = self.names.get((kind, reference, turn), DEFAULT_PROMPTS[(kind, reference, turn)])
        prompt = self.prompts.get(name)
        if prompt is None:
            files = sorted({p.file for p in self.prompts.values()})
            raise JudgeError(f"{', '.join(files)}: no judge prompt {name!r} (for {kind} grading, "
                             f"turn {turn}{', with a reference' if reference else ''}); it "
                             f"holds {', '.join(sorted(self.prompts))}")
        if prompt.type != kind:
            raise JudgeError(f"{prompt.file}: judge prompt {name!r} is of type {prompt.type}, "
                             f"used for {kind} grading")
        return prompt

    # --- single-answer grading -------------------------------------------------------

    @staticmethod
    def single_values(case: SingleCase) -> dict[str, str]:
        """What a single grading fills: ``question``/``answer`` (the graded turn's),
        ``question_i``/``answer_i`` up to the graded turn, ``ref_answer_i`` per
        reference turn."""
        t = case.turn
        if len(case.questions) < t or len(case.answers) < t:
            raise JudgeError(f"grading turn {t} needs {t} questions and answers, got "
                             f"{len(case.questions)} and {len(case.answers)}")
        values = {"question": case.questions[t - 1], "answer": case.answers[t - 1]}
        for i in range(t):
            values[f"question_{i + 1}"] = case.questions[i]
            values[f"answer_{i + 1}"] = case.answers[i]
        for i, ref in enumerate(case.reference or []):
            values[f"ref_answer_{i + 1}"] = ref
        return values

    def check_single(self, turn: int, reference: bool, reference_turns: int = 2) -> JudgePrompt:
        """Raise now (before any model runs) if the prompt of this grading names a
        placeholder it cannot fill; returns the prompt."""
        prompt = self.prompt_for("single", reference, turn)
        case = SingleCase(["q"] * turn, ["a"] * turn, ["r"] * reference_turns if reference else None, turn)
        prompt.check(set(self.single_values(case)), _what("single", turn, reference))
        return prompt

    def single(self, questions: list[str], answers: list[str], reference: list[str] | None = None,
               turn: int = 1) -> Verdict:
        """Grade one answer (see :meth:`single_many`)."""
        return self.single_many([SingleCase(questions, answers, reference, turn)])[0]

    def single_many(self, cases: list[SingleCase], desc: str = "judge") -> list[Verdict]:
        """Grade every case with one ``generate`` call; verdicts in the input order."""
        chosen, messages = [], []
        for case in cases:
            prompt = self.prompt_for("single", case.reference is not None, case.turn)
            user = prompt.fill(self.single_values(case),
                               _what("single", case.turn, case.reference is not None))
            chosen.append(prompt)
            messages.append(judge_messages(prompt, user))
        texts = self._ask(messages, desc)
        return [Verdict(parse_rating(t), t, p.name) for p, t in zip(chosen, texts)]

    # --- pairwise comparison -----------------------------------------------------------

    @staticmethod
    def pair_values(case: PairCase, swap: bool) -> dict[str, str]:
        """What a pairwise grading fills: ``question``, ``answer_a``/``answer_b`` (the
        graded turn's), ``question_i``, ``answer_a_i``/``answer_b_i`` up to the turn,
        ``ref_answer_i``; ``swap`` shows b as A."""
        a, b = (case.answers_b, case.answers_a) if swap else (case.answers_a, case.answers_b)
        t = case.turn
        if min(len(case.questions), len(a), len(b)) < t:
            raise JudgeError(f"grading turn {t} needs {t} questions and answers of each side")
        values = {"question": case.questions[t - 1], "answer_a": a[t - 1], "answer_b": b[t - 1]}
        for i in range(t):
            values[f"question_{i + 1}"] = case.questions[i]
            values[f"answer_a_{i + 1}"] = a[i]
            values[f"answer_b_{i + 1}"] = b[i]
        for i, ref in enumerate(case.reference or []):
            values[f"ref_answer_{i + 1}"] = ref
        return values

    def pairwise(self, questions: list[str], answers_a: list[str], answers_b: list[str],
                 reference: list[str] | None = None, turn: int = 1) -> PairVerdict:
        """Compare two answers in both orders (see :meth:`pairwise_many`)."""
        return self.pairwise_many([PairCase(questions, answers_a, answers_b, reference, turn)])[0]

    def pairwise_many(self, cases: list[PairCase], desc: str = "judge") -> list[PairVerdict]:
        """Compare every pair in both orders, all with one ``generate`` call."""
        chosen, messages = [], []
        for case in cases:
            prompt = self.prompt_for("pairwise", case.reference is not None, case.turn)
            what = _what("pairwise", case.turn, case.reference is not None)
            chosen.append(prompt)
            for swap in (False, True):
                user = prompt.fill(self.pair_values(case, swap), what)
                messages.append(judge_messages(prompt, user))
        texts = self._ask(messages, desc)
        out = []
        for i, prompt in enumerate(chosen):
            first, second = (OrderVerdict(parse_verdict(t), t) for t in texts[2 * i:2 * i + 2])
            out.append(PairVerdict(combine_orders(first.verdict, second.verdict),
                                   (first, second), prompt.name))
        return out

    def _ask(self, messages: list[list[dict]], desc: str) -> list[str]:
        if not messages:
            return []
        requests = [GenerationRequest(m, self.max_new_tokens) for m in messages]  # greedy
        return self.model.generate(requests, desc=desc)


def judge_messages(prompt: JudgePrompt, user: str) -> list[dict]:
    """The chat messages a judge is asked with: the prompt's system message (when it has
    one) and ``user``, the filled template. Training data for a judge (SELF-JUDGE's JSFT)
    is built with the same function, so the judge is trained on what it is asked."""
    system = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
    return [*system, {"role": "user", "content": user}]


def _what(kind: str, turn: int, reference: bool) -> str:
    return f"a turn-{turn} {kind} grading {'with' if reference else 'without'} a reference"
