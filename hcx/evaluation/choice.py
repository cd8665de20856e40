"""Generative multiple choice (``mode: generate``): the options are listed under the
question with labels (A./B./C./D., ①②③④ or 1./2./3./4.), the model writes its answer, and
the answer is read back from the text by strict rules. A text the rules cannot read is
*unparseable*: it counts as wrong and is reported as its own metric; it is never guessed.

The rules (:func:`extract_choice`), applied to the first line of the answer (or, with a
chain of thought, to what ``answer_pattern`` captured, its last match):

1. An answer prefix is removed: ``Answer:``, ``The answer is``, ``The correct answer is``,
   ``Final answer:`` (any case), ``정답은``, ``정답:``, ``정답은 바로``, ``답:``, ``답은``.
2. The first sentence is a label, alone: ``B``, ``(B)``, ``[B]``, ``B.``, ``B)``, ``B:``,
   optionally followed by ``번`` and a copula (``입니다``, ``이다``, ``임``, ``이에요``,
   ``예요``): ``3번입니다``, ``③입니다``. Or a label, a separator (space, ``.``, ``:``,
   ``)``) and that option's own text (``B. Paris``). Letters are capitals only (a lone
   ``a`` or ``I`` is a word, not a label). With circled or number labels, ``③``, ``3``
   and ``3번`` all mean the third option; with letter labels only letters count.
3. Otherwise the line (or its first sentence) is one option's text exactly (case,
   surrounding spaces, a final period and a copula aside): that option.
4. Refused: no rule matches; a label out of range (``E`` of four); two readings that
   disagree (a label and another option's text, or a later ``the answer is C`` after
   ``B.``); an option text that several options share.
"""

from __future__ import annotations

import random
import re

from hcx.errors import HcxError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CIRCLED = "①②③④⑤⑥⑦⑧⑨⑩⑪⑫⑬⑭⑮⑯⑰⑱⑲⑳"
DEFAULT_CUE = {"ko": "정답:", "en": "Answer:"}
#: The final-answer pattern of a chain of thought when a task sets none (last match wins).
DEFAULT_ANSWER_PATTERN = r"(?:[Tt]he (?:final |correct )?answer is|[Aa]nswer:|정답은|정답:)\s*(.+)"

_PREFIX = re.compile(r"^(?:(?i:(?:the\s+)?(?:correct\s+|final\s+)?answer\s*(?:is\s*:?|:))"
                     r"|정답\s*(?:은|는)?\s*(?:바로)?\s*[:：]?|답\s*(?:은|는)?\s*[:：]?)\s*")
_COPULA = r"(?:입니다|이다|임|이에요|예요)"
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")


class ChoiceError(HcxError, ValueError):
    pass


def labels_for(style: str, n: int) -> list[str]:
    """The labels of ``n`` options in a style: letters, circled or numbers."""
    table = {"letters": LETTERS, "circled": CIRCLED}.get(style)
    if table is None:
        if style != "numbers":
            raise ChoiceError(f"unknown label style {style!r}: letters, circled or numbers")
        return [str(i + 1) for i in range(n)]
    if n > len(table):
        raise ChoiceError(f"{n} options are more than the {len(table)} {style} labels")
    return list(table[:n])


def render_options(options: list[str], style: str) -> str:
    """One line per option: ``A. text``, ``① text`` or ``1. text``."""
    sep = " " if style == "circled" else ". "
    return "\n".join(f"{label}{sep}{text}" for label, text in zip(labels_for(style, len(options)), options))


def shuffle_order(n: int, seed: int, key: str) -> list[int]:
    """A permutation of ``range(n)`` seeded by ``seed`` and the question's ``key``:
    position i shows original option ``order[i]``. The same for a question whatever
    else is evaluated (or ``--limit``)."""
    order = list(range(n))
    random.Random(f"{seed}:{key}").shuffle(order)
    return order


def _spellings(style: str, n: int) -> dict[str, int]:
    """Every accepted spelling of each label, to its index."""
    out = {label: i for i, label in enumerate(labels_for(style, n))}
    if style in ("circled", "numbers"):
        for i in range(min(n, len(CIRCLED))):
            out[CIRCLED[i]] = i
            out[str(i + 1)] = i
    return out


def _norm(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip()).casefold()
    text = re.sub(_COPULA + r"?[.。!]*$", "", text).strip()
    return text


def _label_reading(sentence: str, spell: dict[str, int], options: list[str]) -> int | None:
    alternatives = "|".join(re.escape(s) for s in sorted(spell, key=len, reverse=True))
    m = re.match(rf"^(?P<open>[(\[]?)\s*(?P<label>{alternatives})(?![0-9])(?P<after>.*)$", sentence,
                 re.S)
    if not m:
        return None
    index, after = spell[m.group("label")], m.group("after")
    if m.group("open"):
        if not after.startswith((")", "]")):
            return None
        after = after[1:]
    rest = re.sub(rf"^\s*번?\s*{_COPULA}?\s*[.:。)]?\s*", "", after, count=1)
    if not rest.strip():
        return index
    # a label, a separator, then the option's own text: "B. Paris"
    if not re.match(r"^[\s.:)]", after):
        return None
    option = _norm(options[index])
    return index if option and _norm(rest).startswith(option) else None


def _text_reading(text: str, options: list[str]) -> int | None:
    norm = _norm(text)
    hits = [i for i, o in enumerate(options) if _norm(o) and _norm(o) == norm]
    return hits[0] if len(hits) == 1 else None


def extract_choice(text: str, options: list[str], style: str = "letters",
                   answer_pattern: str | None = None) -> int | None:
    """The option index a generated answer names, by the module's strict rules; None
    when it cannot be read. ``answer_pattern`` (a chain of thought's final answer): the
    text its last match captured (first group, else the match) is read instead."""
    if answer_pattern is not None:
        matches = list(re.finditer(answer_pattern, text))
        if not matches:
            return None
        last = matches[-1]
        text = last.group(1) if last.re.groups else last.group(0)
    lines = [line for line in text.replace("**", "").replace("`", "").split("\n") if line.strip()]
    if not lines:
        return None
    line = _PREFIX.sub("", lines[0].strip(), count=1).strip()
    if not line:
        return None
    sentences = _SENTENCE_END.split(line)
    spell = _spellings(style, len(options))
    by_label = _label_reading(sentences[0], spell, options)
    by_text = _text_reading(line, options)
    if by_text is None and len(sentences) > 1:
        by_text = _text_reading(sentences[0], options)
    if by_label is not None and by_text is not None and by_label != by_text:
        return None
    if by_label is not None and len(sentences) > 1:
        # "B. Paris" where Paris is option A: the label and the text disagree
        following = _norm(" ".join(sentences[1:]))
        owners = [i for i, o in enumerate(options) if _norm(o) and following.startswith(_norm(o))]
        if owners and by_label not in owners:
            return None
    found = by_label if by_label is not None else by_text
    if found is None:
        return None
    # a later claim of another answer contradicts the first: "B. The answer is C."
    for later in sentences[1:] + lines[1:]:
        m = _PREFIX.match(later.strip())
        if m and m.group(0).strip():
            other = _label_reading(later.strip()[m.end():].strip(), spell, options)
            if other is not None and other != found:
                return None
    return found
