"""IFEval rule checks (Zhou et al. 2023, "Instruction-Following Evaluation for Large
Language Models"; google-research ``instruction_following_eval``).

A prompt carries one or more verifiable instructions (``instruction_id_list``) with
per-instruction keyword arguments (``kwargs``). :func:`check_instruction` tests one
response against one instruction, :func:`check_example` against all of a prompt's
instructions (strict and loose), and :func:`aggregate` turns a list of
:func:`check_example` results into the four IFEval accuracies with standard errors.

The 25 rules are re-implemented here rather than imported from lm-evaluation-harness:
``lm_eval.tasks.ifeval.instructions_util`` calls ``nltk.download("punkt_tab")`` at import
time when the data is missing, counts sentences with NLTK's trained Punkt model and
tokenizes words for ``capital_word_frequency`` with ``nltk.word_tokenize``; all three need
downloaded NLTK data. This module downloads nothing and needs no NLTK. The rule
definitions (regular expressions, thresholds, the strict and loose protocols) follow the
official code (Apache-2.0) one for one, except where noted below.

Differences from the official implementation, and limitations:

* Sentences (``length_constraints:number_sentences``) are counted by a rule-based
  splitter (:func:`split_sentences`) instead of NLTK Punkt: a sentence ends at ``.``,
  ``!``, ``?``, ``…`` (with any closing quotes or brackets) followed by whitespace or the
  end of the text, or at CJK ``。！？``. A period does not end a sentence after a known
  abbreviation (``Mr.``, ``Dr.``, ``e.g.``, ...), a single-letter initial, a list
  number at the start of a line (``1.``), or a number or dotted acronym (``U.S.``)
  followed by a word that starts in lower case (as Punkt's orthographic heuristic).
  An ellipsis ends a sentence only before an upper-case word. Counts agree with Punkt on ordinary prose;
  they can differ on unusual abbreviations and numbered lists (Punkt often splits after
  ``1.``). Newlines alone never end a sentence (as with Punkt). Korean prose (``...다.``,
  ``...요?``) is split the same way; Korean text without final punctuation counts as
  one sentence.
* Words (``length_constraints:number_words``) are runs of ``\\w`` characters, exactly as
  the official ``RegexpTokenizer(r"\\w+")``. For Korean this counts eojeol (space-separated
  units, particles attached), which is fewer than the English word count of the same
  content; Chinese and Japanese runs without spaces count as one word each.
* ``change_case:capital_word_frequency`` tokenizes with a regular expression that keeps
  ``U.S.``, ``STATE-OF-THE-ART`` as one token and splits English contractions
  (``DON'T`` -> ``DO`` + ``N'T``, ``CANNOT`` -> ``CAN`` + ``NOT``), approximating
  ``nltk.word_tokenize``; on the 541 IFEval prompts, as written and upper-cased, the
  capital-word count equals that of NLTK's Treebank word tokenizer on 1,079 of the
  1,082 texts (the rest hold a literal backslash sequence, ``\\n``). Hangul has no
  case, so Korean words never count as capitalized.
* ``keywords:letter_frequency`` counts the given character whatever it is (two rows ask
  for ``#`` and ``!``), as google-research does; lm-evaluation-harness 0.4.13 replaces a
  non a-z letter with a random one.
* Language detection (``language:response_language``, ``change_case:english_capital``,
  ``change_case:english_lowercase``) uses ``langdetect`` (bundled profiles, offline) like
  the official code, but with a private detector factory seeded with 0, so results are
  reproducible (the official code uses the unseeded global detector). When langdetect
  finds no features (e.g. only digits and punctuation) the rule counts as followed, as
  in the official code.
* Keywords, forbidden words, postscript markers and section splitters are matched
  literally (``re.escape``); the official code uses them as raw regular expressions,
  which only differs for values with regex metacharacters (none in the IFEval data).
* Keyword arguments are validated instead of being replaced by random values: a missing
  required argument, an unexpected one, a negative count or an unknown relation raises
  :class:`IfevalError`. ``None`` values (unused keys in the data file) are dropped first.
* ``combination:repeat_prompt`` uses ``prompt_to_repeat`` from the kwargs and falls back
  to the ``prompt`` argument when it is absent (the official code raises).
"""

from __future__ import annotations

import difflib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from hcx.errors import HcxError
from hcx.evaluation.metrics import mean_stderr

__all__ = [
    "INSTRUCTION_IDS",
    "IfevalError",
    "UnknownInstructionError",
    "aggregate",
    "check_example",
    "check_instruction",
    "count_sentences",
    "count_words",
    "loose_variants",
    "split_sentences",
]


class IfevalError(HcxError, ValueError):
    """Bad IFEval input: malformed kwargs, mismatched lists, an empty result list."""


class UnknownInstructionError(IfevalError):
    """An instruction id that this module does not implement."""

    def __init__(self, instruction_id: str):
        self.instruction_id = instruction_id
        close = difflib.get_close_matches(str(instruction_id), sorted(INSTRUCTION_IDS), n=1, cutoff=0.0)
        self.closest = close[0] if close else None
        hint = f"; closest known id: {self.closest!r}" if self.closest else ""
        super().__init__(f"unknown IFEval instruction id {instruction_id!r}{hint}")


# --------------------------------------------------------------------------------------
# Text utilities
# --------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Runs of word characters, as the official ``RegexpTokenizer(r"\\w+")``."""
    return len(_WORD_RE.findall(text))


# Never a sentence end after these (lower case, without the final period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs e.g i.e cf fig figs no nos vol approx ca "
    "dept est gen gov sen rep rev capt col lt sgt ft op ed eds al".split()
)
# A sentence end after these only when the next word starts in upper case.
_AMBIGUOUS_ABBREVIATIONS = frozenset(
    "etc inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec a.m p.m".split()
)
_CLOSERS = "\"'”’)]}»」』"
_BOUNDARY_RE = re.compile(
    r"(?P<term>[.!?…]+|[。！？]+|[．]+)(?P<close>[" + re.escape(_CLOSERS) + r"]*)"
)
_CJK_TERMINATORS = frozenset("。！？")


def _starts_lower(text: str) -> bool:
    for ch in text:
        if ch.isspace() or ch in _CLOSERS or ch in "\"'“‘([{*_":
            continue
        return ch.islower()
    return False


def _starts_upper(text: str) -> bool:
    for ch in text:
        if ch.isspace() or ch in "\"'“‘([{*_":
            continue
        return ch.isupper()
    return False


def _period_ends_sentence(text: str, start: int, end: int) -> bool:
    """Decide whether the single ``.`` at ``text[start]`` (closers up to ``end``) ends a sentence."""
    line_start = text.rfind("\n", 0, start) + 1
    word_start = start
    while word_start > line_start and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:start].lstrip("\"'“‘([{*_")
    after = text[end:]
    lw = word.lower()
    if not word:
        return True
    if lw in _ABBREVIATIONS:
        return False
    if lw in _AMBIGUOUS_ABBREVIATIONS:
        return _starts_upper(after)
    if len(word) == 1 and word.isalpha():  # an initial: "J. R. R. Tolkien"
        return False
    if re.fullmatch(r"(?:[^\W\d_]\.)+[^\W\d_]", word):  # dotted acronym: U.S., e.g.
        return not _starts_lower(after)
    if word.isdigit():
        if text[line_start:word_start].strip() == "":  # list number: "1. First point"
            return False
        return not _starts_lower(after)
    return True  # an ordinary word, as Punkt: "went home. then" still ends a sentence


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with rules that need no trained model (see the module
    docstring). Returns the stripped sentences that contain at least one word character."""
    sentences: list[str] = []
    last = 0
    for match in _BOUNDARY_RE.finditer(text):
        term = match.group("term")
        end = match.end()
        if term[0] in _CJK_TERMINATORS or term[0] == "．":
            is_end = True
        else:
            if end < len(text) and not text[end].isspace():
                continue  # "3.14", "e.g.x", "www.example.com", "?!" inside a word
            if term == ".":
                is_end = _period_ends_sentence(text, match.start(), end)
            elif set(term) <= {".", "…"}:  # ellipsis: ends only before an upper-case word
                is_end = end >= len(text) or _starts_upper(text[end:])
            else:  # ! or ? (possibly mixed with periods)
                is_end = True
        if is_end:
            sentences.append(text[last:end])
            last = end
    sentences.append(text[last:])
    return [s.strip() for s in sentences if _WORD_RE.search(s)]


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


_CONTRACTION_RE = re.compile(r"(?i)(n['’]t|['’](?:s|m|d|re|ve|ll))$")
_TOKEN_RE = re.compile(r"\w+(?:[-'’./]\w+)*")
# Words the Treebank tokenizer splits in two ("cannot" -> "can" + "not").
_SPLIT_WORDS_RE = re.compile(r"(?i)(can)(not)|(gim)(me)|(gon)(na)|(got)(ta)|(lem)(me)|(wan)(na)")


def _word_tokens(text: str) -> list[str]:
    """Word tokens for capital-word counting (approximates ``nltk.word_tokenize``, which
    splits contractions and ``cannot`` but keeps hyphens, slashes and inner periods)."""
    tokens: list[str] = []
    for token in _TOKEN_RE.findall(text):
        m = _CONTRACTION_RE.search(token)
        if m and m.start() > 0:
            tokens.extend((token[: m.start()], token[m.start():]))
        elif (m := _SPLIT_WORDS_RE.fullmatch(token)) is not None:
            tokens.extend(g for g in m.groups() if g)
        else:
            tokens.append(token)
    return tokens


_detector_lock = threading.Lock()
_detector_factory = None


def _detect_language(text: str) -> str | None:
    """ISO 639-1 code from langdetect (seeded, offline), or None when undetectable."""
    global _detector_factory
    from hcx.errors import require

    require("langdetect", "eval", purpose="IFEval's language rules")
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
    from langdetect.lang_detect_exception import LangDetectException
    with _detector_lock:
        if _detector_factory is None:
            factory = DetectorFactory()
            factory.load_profile(PROFILES_DIRECTORY)
            factory.set_seed(0)
            _detector_factory = factory
        detector = _detector_factory.create()
        detector.append(text)
        try:
            return detector.detect()
        except LangDetectException:
            return None


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------

_RELATIONS = ("less than", "at least")


def _compare(actual: int, relation: str, threshold: int) -> bool:
    return actual < threshold if relation == "less than" else actual >= threshold


def _language(args: Mapping[str, Any], value: str) -> bool:
    lang = _detect_language(value)
    return True if lang is None else lang == args["language"]


def _number_sentences(args, value):
    return _compare(count_sentences(value), args["relation"], args["num_sentences"])


def _number_placeholders(args, value):
    return len(re.findall(r"\[.*?\]", value)) >= args["num_placeholders"]


def _number_bullet_lists(args, value):
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == args["num_bullets"]


_CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained_response(args, value):
    value = value.strip()
    return any(option in value for option in _CONSTRAINED_RESPONSE_OPTIONS)


def _number_highlighted_sections(args, value):
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h[2:-2].strip())
    return n >= args["num_highlights"]


def _multiple_sections(args, value):
    pattern = r"\s?" + re.escape(args["section_spliter"]) + r"\s?\d+\s?"
    return len(re.split(pattern, value)) - 1 >= args["num_sections"]


def _number_paragraphs(args, value):
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == args["num_paragraphs"]


def _postscript(args, value):
    marker = args["postscript_marker"]
    value = value.lower()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, value, flags=re.MULTILINE))


def _keywords_existence(args, value):
    return all(re.search(re.escape(k), value, flags=re.IGNORECASE) for k in args["keywords"])


def _keyword_frequency(args, value):
    occurrences = len(re.findall(re.escape(args["keyword"]), value, flags=re.IGNORECASE))
    return _compare(occurrences, args["relation"], args["frequency"])


def _number_words(args, value):
    return _compare(count_words(value), args["relation"], args["num_words"])


def _json_format(args, value):
    value = value.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _nth_paragraph_first_word(args, value):
    paragraphs = re.split(r"\n\n", value)
    count = sum(1 for p in paragraphs if p.strip())
    nth = args["nth_paragraph"]
    if nth > count:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first_word = ""
    for letter in word:
        if letter in {".", ",", "?", "!", "'", '"'}:
            break
        first_word += letter.lower()
    return count == args["num_paragraphs"] and first_word == args["first_word"]


def _forbidden_words(args, value):
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", value, flags=re.IGNORECASE) for w in args["forbidden_words"]
    )


def _two_responses(args, value):
    valid = []
    parts = value.split("******")
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _repeat_prompt(args, value):
    return value.strip().lower().startswith(args["prompt_to_repeat"].strip().lower())


def _end_checker(args, value):
    return value.strip().strip('"').lower().endswith(args["end_phrase"].strip().lower())


def _title(args, value):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", value))


def _letter_frequency(args, value):
    return _compare(Counter(value.lower())[args["letter"]], args["let_relation"], args["let_frequency"])


def _english_capital(args, value):
    if not value.isupper():
        return False
    lang = _detect_language(value)
    return True if lang is None else lang == "en"


def _english_lowercase(args, value):
    if not value.islower():
        return False
    lang = _detect_language(value)
    return True if lang is None else lang == "en"


def _no_comma(args, value):
    return "," not in value


def _capital_word_frequency(args, value):
    capital = sum(1 for token in _word_tokens(value) if token.isupper())
    return _compare(capital, args["capital_relation"], args["capital_frequency"])


def _quotation(args, value):
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


# --------------------------------------------------------------------------------------
# Registry and kwargs validation
# --------------------------------------------------------------------------------------

_INT, _STR, _STRS, _REL = "int", "str", "strs", "relation"


@dataclass(frozen=True)
class _Rule:
    check: Callable[[Mapping[str, Any], str], bool]
    params: Mapping[str, str]  # name -> kind; all required


_RULES: dict[str, _Rule] = {
    "keywords:existence": _Rule(_keywords_existence, {"keywords": _STRS}),
    "keywords:frequency": _Rule(_keyword_frequency, {"keyword": _STR, "frequency": _INT, "relation": _REL}),
    "keywords:forbidden_words": _Rule(_forbidden_words, {"forbidden_words": _STRS}),
    "keywords:letter_frequency": _Rule(
        _letter_frequency, {"letter": _STR, "let_frequency": _INT, "let_relation": _REL}
    ),
    "language:response_language": _Rule(_language, {"language": _STR}),
    "length_constraints:number_sentences": _Rule(
        _number_sentences, {"num_sentences": _INT, "relation": _REL}
    ),
    "length_constraints:number_paragraphs": _Rule(_number_paragraphs, {"num_paragraphs": _INT}),
    "length_constraints:number_words": _Rule(_number_words, {"num_words": _INT, "relation": _REL}),
    "length_constraints:nth_paragraph_first_word": _Rule(
        _nth_paragraph_first_word, {"num_paragraphs": _INT, "nth_paragraph": _INT, "first_word": _STR}
    ),
    "detectable_content:number_placeholders": _Rule(_number_placeholders, {"num_placeholders": _INT}),
    "detectable_content:postscript": _Rule(_postscript, {"postscript_marker": _STR}),
    "detectable_format:number_bullet_lists": _Rule(_number_bullet_lists, {"num_bullets": _INT}),
    "detectable_format:constrained_response": _Rule(_constrained_response, {}),
    "detectable_format:number_highlighted_sections": _Rule(
        _number_highlighted_sections, {"num_highlights": _INT}
    ),
    "detectable_format:multiple_sections": _Rule(
        _multiple_sections, {"section_spliter": _STR, "num_sections": _INT}
    ),
    "detectable_format:json_format": _Rule(_json_format, {}),
    "detectable_format:title": _Rule(_title, {}),
    "combination:two_responses": _Rule(_two_responses, {}),
    "combination:repeat_prompt": _Rule(_repeat_prompt, {"prompt_to_repeat": _STR}),
    "startend:end_checker": _Rule(_end_checker, {"end_phrase": _STR}),
    "startend:quotation": _Rule(_quotation, {}),
    "change_case:capital_word_frequency": _Rule(
        _capital_word_frequency, {"capital_frequency": _INT, "capital_relation": _REL}
    ),
    "change_case:english_capital": _Rule(_english_capital, {}),
    "change_case:english_lowercase": _Rule(_english_lowercase, {}),
    "punctuation:no_comma": _Rule(_no_comma, {}),
}

INSTRUCTION_IDS: frozenset[str] = frozenset(_RULES)


def _rule(instruction_id: str) -> _Rule:
    try:
        return _RULES[instruction_id]
    except (KeyError, TypeError):
        raise UnknownInstructionError(instruction_id) from None


def _prepare_args(instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str) -> dict[str, Any]:
    """Drop ``None`` values, validate, and normalize as the official ``build_description``."""
    rule = _rule(instruction_id)
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in given and prompt:
        given["prompt_to_repeat"] = prompt
    unexpected = sorted(set(given) - set(rule.params))
    if unexpected:
        raise IfevalError(
            f"{instruction_id}: unexpected kwargs {unexpected}; expected {sorted(rule.params) or 'none'}"
        )
    missing = sorted(set(rule.params) - set(given))
    if missing:
        raise IfevalError(f"{instruction_id}: missing kwargs {missing}")
    args: dict[str, Any] = {}
    for name, kind in rule.params.items():
        value = given[name]
        if kind == _INT:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise IfevalError(f"{instruction_id}: {name} must be a non-negative integer, got {value!r}")
        elif kind == _REL:
            if value not in _RELATIONS:
                raise IfevalError(f"{instruction_id}: {name} must be one of {_RELATIONS}, got {value!r}")
        elif kind == _STRS:
            if isinstance(value, str):
                value = [value]
            if not value or not all(isinstance(v, str) and v for v in value):
                raise IfevalError(
                    f"{instruction_id}: {name} must be a non-empty list of strings, got {value!r}"
                )
            value = sorted(set(value))
        else:  # _STR
            if not isinstance(value, str) or not value.strip():
                raise IfevalError(f"{instruction_id}: {name} must be a non-empty string, got {value!r}")
            value = value.strip()
        args[name] = value
    if "letter" in args:
        args["letter"] = args["letter"].lower()
    if "first_word" in args:
        args["first_word"] = args["first_word"].lower()
    if instruction_id == "length_constraints:nth_paragraph_first_word" and args["nth_paragraph"] < 1:
        raise IfevalError(f"{instruction_id}: nth_paragraph counts from 1, got {args['nth_paragraph']}")
    return args


def loose_variants(response: str) -> list[str]:
    """The eight responses the loose protocol tries: the response, without its first line,
    last line, or both, each with and without asterisks (official order)."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]


def _follows(rule: _Rule, args: Mapping[str, Any], variants: Iterable[str]) -> bool:
    # As the official code: an empty (whitespace-only) response follows nothing.
    return any(v.strip() and rule.check(args, v) for v in variants)


def check_instruction(
    instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str, response: str, loose: bool = False
) -> bool:
    """Whether ``response`` follows one instruction, strictly or under the loose protocol
    (any of :func:`loose_variants` follows it)."""
    rule = _rule(instruction_id)
    args = _prepare_args(instruction_id, kwargs, prompt)
    return _follows(rule, args, loose_variants(response) if loose else (response,))


def check_example(
    instruction_ids: Sequence[str],
    kwargs_list: Sequence[Mapping[str, Any] | None],
    prompt: str,
    response: str,
) -> dict[str, Any]:
    """Check ``response`` against every instruction of one prompt.

    Returns ``{"instruction_ids": [...], "strict": [bool, ...], "loose": [bool, ...],
    "prompt_strict": bool, "prompt_loose": bool}``; the lists follow ``instruction_ids``.
    """
    instruction_ids = list(instruction_ids)
    kwargs_list = list(kwargs_list)
    if len(instruction_ids) != len(kwargs_list):
        raise IfevalError(
            f"{len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs dicts"
        )
    if not instruction_ids:
        raise IfevalError("an IFEval example needs at least one instruction")
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kwargs in zip(instruction_ids, kwargs_list):
        rule = _rule(instruction_id)
        args = _prepare_args(instruction_id, kwargs, prompt)
        s = _follows(rule, args, variants[:1])
        strict.append(s)
        loose.append(s or _follows(rule, args, variants[1:]))
    return {
        "instruction_ids": instruction_ids,
        "strict": strict,
        "loose": loose,
        "prompt_strict": all(strict),
        "prompt_loose": all(loose),
    }


def aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float | None]]:
    """The four IFEval accuracies over :func:`check_example` results, each as
    ``(mean, stderr)``; stderr is the sample standard deviation (ddof=1) over prompts
    (prompt level) or over all instructions (instruction level) divided by sqrt(n),
    and None when n < 2."""
    if not results:
        raise IfevalError("aggregate() needs at least one result")
    prompt_strict = [bool(r["prompt_strict"]) for r in results]
    prompt_loose = [bool(r["prompt_loose"]) for r in results]
    inst_strict = [bool(x) for r in results for x in r["strict"]]
    inst_loose = [bool(x) for r in results for x in r["loose"]]
    if not inst_strict:
        raise IfevalError("aggregate(): the results hold no instructions")
    return {
        "prompt_level_strict_acc": mean_stderr(prompt_strict),
        "inst_level_strict_acc": mean_stderr(inst_strict),
        "prompt_level_loose_acc": mean_stderr(prompt_loose),
        "inst_level_loose_acc": mean_stderr(inst_loose),
    }
