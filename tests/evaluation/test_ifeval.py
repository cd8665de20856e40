"""IFEval rule checks (hcx.evaluation.ifeval): hand-written responses that follow and
break each rule, the loose protocol, aggregation, and the real data file."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from hcx.errors import HcxError
from hcx.evaluation import ifeval
from hcx.evaluation.ifeval import (
    INSTRUCTION_IDS,
    IfevalError,
    UnknownInstructionError,
    aggregate,
    check_example,
    check_instruction,
)

EN_TEXT = (
    "The weather in the city was warm and sunny today, so many people went to the park "
    "to enjoy the afternoon with their families."
)
KO_TEXT = "오늘 서울의 날씨는 따뜻하고 맑아서 많은 사람들이 가족과 함께 공원에 나가 오후를 즐겼습니다."

ANYTHING_ELSE = "Is there anything else I can help with?"

# (instruction id, kwargs, response, expected strict result)
CASES = [
    # length_constraints:number_words (\w+ runs; Korean counts eojeol)
    ("length_constraints:number_words", {"num_words": 10, "relation": "at least"},
     "One two three four five six seven eight nine ten.", True),
    ("length_constraints:number_words", {"num_words": 10, "relation": "at least"},
     "Only five words are here.", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "저는 오늘 학교에 갑니다.", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "저는 오늘 아침에 친구와 함께 학교에 갑니다.", False),
    # length_constraints:number_sentences
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "I woke up. I ate breakfast! Did I leave?", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "I woke up. I ate breakfast! Did I leave?", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "저는 학생입니다. 오늘 날씨가 좋네요! 내일은 어때요?", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Kim paid 3.50 dollars. He left.", False),  # "Dr." and "3.50" end nothing
    # length_constraints:number_paragraphs (*** dividers)
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "First part.\n***\nSecond part.\n***\nThird part.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "First part.\n***\nSecond part.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "First part.\n***\n\n***\nThird part.", False),  # an empty paragraph in the middle
    # length_constraints:nth_paragraph_first_word
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "However"},
     "Intro text.\n\nHowever, there is more.", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "Intro text.\n\nMoreover, there is more.", False),
    # detectable_format:json_format
    ("detectable_format:json_format", {}, '```json\n{"city": "Seoul", "rank": 1}\n```', True),
    ("detectable_format:json_format", {}, 'Here you go: {"city": "Seoul"}', False),
    # detectable_format:number_bullet_lists (exactly N)
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* apples\n* pears", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* apples\n* pears\n- plums", False),
    # detectable_format:title
    ("detectable_format:title", {}, "<<Ode to Seoul>>\nThe river shines.", True),
    ("detectable_format:title", {}, "Ode to Seoul\nThe river shines.", False),
    ("detectable_format:title", {}, "<<   >>\nThe river shines.", False),
    # detectable_format:number_highlighted_sections
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*First point* and **second point**.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*First point* and nothing else.", False),
    # detectable_format:multiple_sections
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro.\nSECTION 2\nBody.", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro and body.", False),
    # detectable_format:constrained_response
    ("detectable_format:constrained_response", {}, "My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "Yes, definitely.", False),
    # change_case:english_lowercase / english_capital (case + langdetect "en")
    ("change_case:english_lowercase", {}, EN_TEXT.lower(), True),
    ("change_case:english_lowercase", {}, EN_TEXT, False),
    ("change_case:english_capital", {}, EN_TEXT.upper(), True),
    ("change_case:english_capital", {}, EN_TEXT, False),
    ("change_case:english_capital", {}, "SEOUL " + KO_TEXT, False),  # isupper(), but not English
    # change_case:capital_word_frequency
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "We LOVE this NEW plan.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "We love this NEW plan.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "less than"},
     "STATE-OF-THE-ART work, U.S.A.", True),  # one token each, as nltk.word_tokenize
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "less than"},
     "I CANNOT go.", False),  # I + CAN + NOT, as nltk.word_tokenize
    # punctuation:no_comma
    ("punctuation:no_comma", {}, "No commas appear here at all.", True),
    ("punctuation:no_comma", {}, "Yes, there is one.", False),
    # startend:end_checker
    ("startend:end_checker", {"end_phrase": ANYTHING_ELSE}, f"Here it is. {ANYTHING_ELSE}", True),
    ("startend:end_checker", {"end_phrase": ANYTHING_ELSE}, f'"Here it is. {ANYTHING_ELSE}"', True),
    ("startend:end_checker", {"end_phrase": ANYTHING_ELSE}, f"{ANYTHING_ELSE} Bye.", False),
    # startend:quotation
    ("startend:quotation", {}, '"The whole answer is quoted."', True),
    ("startend:quotation", {}, 'The answer is "partly" quoted.', False),
    # keywords:existence
    ("keywords:existence", {"keywords": ["banana", "서울"]}, "I ate a Banana in 서울.", True),
    ("keywords:existence", {"keywords": ["banana", "서울"]}, "I ate a banana in Busan.", False),
    # keywords:forbidden_words (whole words, case-insensitive)
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "I love dogs and category theory.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "My Cat sleeps all day.", False),
    # keywords:frequency
    ("keywords:frequency", {"keyword": "data", "frequency": 2, "relation": "at least"},
     "Data beats opinions; data wins.", True),
    ("keywords:frequency", {"keyword": "data", "frequency": 2, "relation": "at least"},
     "Data beats opinions.", False),
    ("keywords:frequency", {"keyword": "data", "frequency": 2, "relation": "less than"},
     "Data beats opinions; data wins.", False),
    # keywords:letter_frequency
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 2, "let_relation": "at least"},
     "Pizza tonight.", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "Pasta tonight.", False),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"},
     "Go #seoul #korea", True),  # any character, as google-research (two data rows)
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"},
     "Go #seoul korea", False),
    # detectable_content:postscript
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Main text.\n\nP.S. See you soon.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Main text. See you soon.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Main text.\n\nP.P.S. One more.", True),
    # detectable_content:number_placeholders
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Send it to [name] at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Send it to [name].", False),
    # combination:repeat_prompt
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about Seoul."},
     "Write a poem about Seoul. The river shines at night.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about Seoul."},
     "Sure! Write a poem about Seoul.", False),
    # combination:two_responses
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer one.", False),
    # language:response_language (langdetect, offline profiles)
    ("language:response_language", {"language": "ko"}, KO_TEXT, True),
    ("language:response_language", {"language": "ko"}, EN_TEXT, False),
    ("language:response_language", {"language": "en"}, EN_TEXT, True),
    ("language:response_language", {"language": "en"}, KO_TEXT, False),
]


@pytest.mark.parametrize(
    "instruction_id,kwargs,response,expected",
    CASES,
    ids=[f"{c[0].split(':')[1]}-{i}-{'pass' if c[3] else 'fail'}" for i, c in enumerate(CASES)],
)
def test_rule(instruction_id, kwargs, response, expected):
    assert check_instruction(instruction_id, kwargs, "prompt", response) is expected


def test_cases_cover_passing_and_failing_responses():
    ids_with = {True: set(), False: set()}
    for instruction_id, _, _, expected in CASES:
        ids_with[expected].add(instruction_id)
    both = ids_with[True] & ids_with[False]
    assert len(both) >= 20, sorted(INSTRUCTION_IDS - both)
    assert ids_with[True] | ids_with[False] == INSTRUCTION_IDS


def test_loose_rescues_a_first_line_that_breaks_the_rule():
    response = "Sure, here is my answer:\nNo commas appear in the real answer."
    assert check_instruction("punctuation:no_comma", {}, "p", response) is False
    assert check_instruction("punctuation:no_comma", {}, "p", response, loose=True) is True
    # a comma in the middle line is not rescued by dropping the first or last line
    middle = "First line.\nA comma, in the middle.\nLast line."
    assert check_instruction("punctuation:no_comma", {}, "p", middle, loose=True) is False


def test_loose_removes_asterisks():
    response = f"Here it is.\n**{ANYTHING_ELSE}**"
    kwargs = {"end_phrase": ANYTHING_ELSE}
    assert check_instruction("startend:end_checker", kwargs, "p", response) is False
    assert check_instruction("startend:end_checker", kwargs, "p", response, loose=True) is True


def test_loose_variants_follow_the_official_order():
    assert ifeval.loose_variants("*a*\nb\n*c*") == [
        "*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b",
    ]


def test_whitespace_response_follows_nothing():
    for loose in (False, True):
        assert check_instruction("punctuation:no_comma", {}, "p", "  \n ", loose=loose) is False


def test_kwargs_none_values_are_dropped_and_validated():
    # the data file carries None for every unused key
    kwargs = {"num_words": 3, "relation": "at least", "keywords": None, "language": None}
    assert check_instruction("length_constraints:number_words", kwargs, "p", "one two three")
    with pytest.raises(IfevalError, match="relation"):
        check_instruction("length_constraints:number_words", {"num_words": 3, "relation": "about"}, "p", "x")
    with pytest.raises(IfevalError, match="missing kwargs"):
        check_instruction("keywords:existence", {"keywords": None}, "p", "x")
    with pytest.raises(IfevalError, match="unexpected kwargs"):
        check_instruction("punctuation:no_comma", {"num_words": 3}, "p", "x")


def test_repeat_prompt_falls_back_to_the_prompt():
    prompt = "List three rivers."
    assert check_instruction("combination:repeat_prompt", {}, prompt, "List three rivers. Han, Nile, Amazon.")
    assert not check_instruction("combination:repeat_prompt", {}, prompt, "Han, Nile, Amazon.")


def test_unknown_instruction_names_the_closest_id():
    with pytest.raises(UnknownInstructionError) as info:
        check_instruction("keywords:existance", {}, "p", "x")
    assert isinstance(info.value, HcxError)
    assert "keywords:existance" in str(info.value)
    assert "keywords:existence" in str(info.value)
    with pytest.raises(HcxError, match="detectable_format:title"):
        check_example(["detectable_format:titel"], [{}], "p", "x")


def test_split_sentences():
    split = ifeval.split_sentences
    assert split("Dr. Kim arrived at 3.30 p.m. today. He left.") == [
        "Dr. Kim arrived at 3.30 p.m. today.", "He left."]
    assert split('He said "Go." Then he left') == ['He said "Go."', "Then he left"]
    assert split("Wait... what happened? Nothing!") == ["Wait... what happened?", "Nothing!"]
    assert split("저는 학생입니다. 오늘 날씨가 좋네요! 내일은 어때요?") == [
        "저는 학생입니다.", "오늘 날씨가 좋네요!", "내일은 어때요?"]
    assert split("Steps:\n1. Boil water.\n2. Add tea.") == ["Steps:\n1. Boil water.", "2. Add tea."]
    assert ifeval.count_words("저는 오늘, 학교에 갑니다! don't") == 6


def test_check_example_and_aggregate_by_hand():
    ex1 = check_example(
        ["punctuation:no_comma", "length_constraints:number_words"],
        [{}, {"num_words": 3, "relation": "at least", "language": None}],
        "p", "Hello there my friend.")
    ex2 = check_example(
        ["punctuation:no_comma", "startend:end_checker"],
        [{}, {"end_phrase": "Bye."}],
        "p", "Well, okay.\nSee you soon. Bye.")
    ex3 = check_example(
        ["startend:quotation", "detectable_format:title"], [None, {}], "p", "<<Title>> not quoted")
    assert ex1 == {"instruction_ids": ["punctuation:no_comma", "length_constraints:number_words"],
                   "strict": [True, True], "loose": [True, True],
                   "prompt_strict": True, "prompt_loose": True}
    assert (ex2["strict"], ex2["loose"]) == ([False, True], [True, True])
    assert (ex2["prompt_strict"], ex2["prompt_loose"]) == (False, True)
    assert (ex3["strict"], ex3["loose"]) == ([False, True], [False, True])
    assert (ex3["prompt_strict"], ex3["prompt_loose"]) == (False, False)

    # By hand (stderr = sample std with ddof=1 / sqrt(n)):
    # prompt strict [1,0,0]: mean 1/3; var = ((2/3)^2 + 2(1/3)^2)/2 = 1/3; se = sqrt(1/3/3) = 1/3
    # prompt loose  [1,1,0]: mean 2/3; var = 1/3 likewise;                  se = 1/3
    # inst strict [1,1,0,1,0,1]: mean 4/6 = 2/3; sum sq = 4(1/3)^2 + 2(2/3)^2 = 4/3;
    #             var = 4/3/5 = 4/15; se = sqrt(4/15/6) = sqrt(2/45)
    # inst loose  [1,1,1,1,0,1]: mean 5/6; sum sq = 5(1/6)^2 + (5/6)^2 = 5/6;
    #             var = 5/6/5 = 1/6; se = sqrt(1/6/6) = 1/6
    agg = aggregate([ex1, ex2, ex3])
    expected = {
        "prompt_level_strict_acc": (1 / 3, 1 / 3),
        "inst_level_strict_acc": (2 / 3, math.sqrt(2 / 45)),
        "prompt_level_loose_acc": (2 / 3, 1 / 3),
        "inst_level_loose_acc": (5 / 6, 1 / 6),
    }
    assert set(agg) == set(expected)
    for name, (mean, se) in expected.items():
        assert agg[name][0] == pytest.approx(mean), name
        assert agg[name][1] == pytest.approx(se), name

    single = aggregate([ex1])
    assert single["prompt_level_strict_acc"] == (1.0, None)
    assert single["inst_level_strict_acc"][1] == 0.0  # two instructions, both followed
    with pytest.raises(IfevalError):
        aggregate([])
    with pytest.raises(IfevalError, match="2 instruction ids but 1 kwargs"):
        check_example(["punctuation:no_comma", "startend:quotation"], [{}], "p", "x")


def _data_root():
    from hcx.paths import data_root

    return data_root()


def test_every_instruction_in_the_data_file_is_supported():
    from hcx.evaluation.tasks import load_docs, load_task

    task = load_task("ifeval")
    path = _data_root() / "eval" / "ifeval" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"IFEval data file {path} not found (shared data absent; set HCX_DATA_DIR)")
    rows = load_docs(task)
    assert len(rows) == 541
    used = {i for row in rows for i in row["instruction_id_list"]}
    assert used <= INSTRUCTION_IDS, sorted(used - INSTRUCTION_IDS)
    assert len(INSTRUCTION_IDS) == 25
    # every row's kwargs pass validation: checking the prompt itself as a response runs
    results = [check_example(r["instruction_id_list"], r["kwargs"], r["prompt"], r["prompt"]) for r in rows]
    agg = aggregate(results)
    assert 0.0 <= agg["prompt_level_strict_acc"][0] <= agg["prompt_level_loose_acc"][0] <= 1.0


def test_no_network_and_no_nltk():
    code = textwrap.dedent("""
        import socket, sys
        def refuse(*a, **k):
            raise AssertionError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from hcx.evaluation.ifeval import check_example
        r = check_example(
            ["language:response_language", "change_case:english_lowercase",
             "length_constraints:number_sentences", "change_case:capital_word_frequency"],
            [{"language": "ko"}, {}, {"num_sentences": 1, "relation": "at least"},
             {"capital_frequency": 1, "capital_relation": "less than"}],
            "p", "안녕하세요. 오늘은 날씨가 좋습니다.")
        assert r["strict"] == [True, False, True, True], r
        assert "nltk" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
