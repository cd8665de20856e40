"""hcx.stages.self_judge: SELF-JUDGE's JSFT data by hand (both orders, labels, ties, the SFT
reader reads it) and self-rejection with scripted judges; then the command line on the
tiny SFT checkpoint."""

from __future__ import annotations

import json
import random
import re

import pytest

from hcx.data.sources import BadRecord
from hcx.engine.generate import Generation, SamplingParams
from hcx.evaluation.judges import judge_messages
from hcx.stages import self_judge as SJ
from hcx.stages.candidate_selection import match_points
from hcx.stages.sft import read_conversations, tokenize
from tests.conftest import SHIPPED_TOKENIZER, hcx
from tests.evaluation.test_tasks import Scripted

PAIR = {"name": "pair-v2", "type": "pairwise", "system_prompt": "SYS-PAIR",
        "prompt_template": "[Q]{question}[A]{answer_a}[B]{answer_b}", "output_format": "[[A]]"}


@pytest.fixture
def prompt(tmp_path):
    path = tmp_path / "judge_prompts.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "name": "single-v1",
                                                           "type": "single"}) + "\n")
    return SJ.load_pair_prompt(str(path))


def record(**extra) -> dict:
    return {"prompt": "Q?", "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}], **extra}


def judged(conv: dict) -> tuple[str, str]:
    """(the user turn the judge reads, the reply it is trained on)."""
    m = conv["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant"] and m[0]["content"] == "SYS-PAIR"
    return m[1]["content"], m[2]["content"]


# --- JSFT data ------------------------------------------------------------------------


def test_jsft_writes_both_orders_with_the_labels_swapped(prompt):
    stats = SJ.JSFTStats()
    convs = SJ.jsft_conversations(record(), "f:1", prompt, with_responses=True, stats=stats)
    response, first, second = convs
    assert response == {"messages": [{"role": "user", "content": "Q?"},
                                      {"role": "assistant", "content": "good"}],
                         "jsft": {"kind": "response", "source": "f:1"}}
    assert judged(first) == ("[Q]Q?[A]good[B]bad", "[[A]]") and first["jsft"]["chosen_as"] == "A"
    assert judged(second) == ("[Q]Q?[A]bad[B]good", "[[B]]") and second["jsft"]["chosen_as"] == "B"
    # the judge is trained on exactly what Judge.pairwise_many asks it
    assert first["messages"][:2] == judge_messages(prompt, "[Q]Q?[A]good[B]bad")
    assert (stats.pairs, stats.judgments, stats.responses, sum(stats.skipped.values())) == (1, 2, 1, 0)

    # one order per pair: drawn with the rng, the verdict names where chosen was shown
    seen = set()
    for seed in range(8):
        (conv,) = SJ.jsft_conversations(record(), "f:1", prompt, both_orders=False,
                                        rng=random.Random(seed))
        user, reply = judged(conv)
        seen.add(reply)
        assert user == ("[Q]Q?[A]good[B]bad" if reply == "[[A]]" else "[Q]Q?[A]bad[B]good")
    assert seen == {"[[A]]", "[[B]]"}


def test_jsft_rationales_ties_questions_and_bad_records(prompt):
    # per-answer evaluations follow their answer's position, before the verdict
    _, swapped = SJ.jsft_conversations(record(chosen_rationale="clear", rejected_rationale="wrong"),
                                       "f:2", prompt)
    assert judged(swapped)[1] == ("Evaluation of Assistant A: wrong\n"
                                  "Evaluation of Assistant B: clear\n\n[[B]]")
    # ties: equal scores dropped (counted), or kept as [[C]] in both orders; identical
    # answers always dropped
    stats = SJ.JSFTStats()
    tie = record(score_chosen=7, score_rejected=7)
    assert SJ.jsft_conversations(tie, "f:3", prompt, stats=stats) == []
    kept = SJ.jsft_conversations(tie, "f:3", prompt, ties="keep", stats=stats)
    assert [judged(c)[1] for c in kept] == ["[[C]]", "[[C]]"]
    same = record(rejected=[{"role": "assistant", "content": " good "}])
    assert SJ.jsft_conversations(same, "f:4", prompt, ties="keep", stats=stats) == []
    assert stats.skipped == {"tie": 1, "identical": 1} and stats.ties_kept == 1
    assert SJ.jsft_conversations(record(score_chosen=8, score_rejected=7), "f:5", prompt) != []
    # a conversation as the question: one user turn as is, more turns flattened
    assert SJ.judge_question([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]) == "hi"
    assert SJ.judge_question([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}]) == "User: a\n\nAssistant: b\n\nUser: c"
    with pytest.raises(BadRecord, match="single assistant replies"):
        SJ.jsft_conversations(record(chosen=[{"role": "assistant", "content": "x"}] * 2), "f:6", prompt)
    with pytest.raises(BadRecord, match="go together"):
        SJ.jsft_conversations(record(chosen_rationale="only one"), "f:7", prompt)


def test_jsft_prompt_must_be_pairwise(prompt, tmp_path):
    path = prompt.file
    with pytest.raises(SJ.SelfJudgeError, match="type single"):
        SJ.load_pair_prompt(path, "single-v1")
    with pytest.raises(SJ.SelfJudgeError, match="pairwise prompts: pair-v2"):
        SJ.load_pair_prompt(path, "pair-v9")
    # the shipped English and Korean pair-v2 prompts load
    assert SJ.load_pair_prompt().name == SJ.load_pair_prompt(SJ.KOREAN_PROMPTS_FILE).name == "pair-v2"


def test_cli_jsft_file_feeds_the_sft_reader(prompt, tmp_path):
    src = tmp_path / "prefs.jsonl"
    rows = [record(prompt=f"Q{i}?") for i in range(3)] + [record(score_chosen=1, score_rejected=1),
                                                          {"prompt": "no answers"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "jsft.jsonl"
    proc = hcx("data", "jsft", str(src), "--out", str(out), "--judge-prompts", prompt.file,
               "--with-responses", "--skip-bad", "--seed", "3")
    assert "5 records -> 3 pairs judged (6 judgment conversations), 4 response conversations; " \
           "skipped 2 (missing_field: 1, tie: 1)" in proc.stdout
    convs = read_conversations(str(out))  # the SFT stage's reader, strict
    assert len(convs) == 10
    from hcx.tokenizer.loading import open_tokenizer

    tok = open_tokenizer(SHIPPED_TOKENIZER)
    verdicts = []
    for conv in convs:
        ex = tokenize(conv, tok)  # what hcx sft trains: the assistant's tokens
        trained = tok.decode([i for i, a in zip(ex.ids, ex.assistant) if a])
        if conv[0]["role"] == "system":
            verdicts.append(trained.replace("<|endofturn|>", ""))
    assert sorted(verdicts) == ["[[A]]"] * 3 + ["[[B]]"] * 3
    # shuffled with the seed: the same seed writes the same file (in-process: the command
    # calls write_jsft)
    again = tmp_path / "again.jsonl"
    SJ.write_jsft([str(src)], again, prompt, with_responses=True, skip_bad=True, seed=3,
                  progress=False)
    assert again.read_text() == out.read_text()
    SJ.write_jsft([str(src)], again, prompt, with_responses=True, skip_bad=True, seed=4,
                  progress=False)
    assert again.read_text() != out.read_text()
    with pytest.raises(SJ.SelfJudgeError, match="prefs.jsonl:5: .*use --skip-bad"):
        SJ.write_jsft([str(src)], again, prompt, progress=False)


# --- self-rejection -------------------------------------------------------------------


class ChatScripted(Scripted):
    """Scripted, with conversations rendered as ``<role>content`` blocks; counts
    generate calls (one per tournament round when batched)."""

    def __init__(self, reply):
        super().__init__(outputs=self.answer)
        self.reply = reply
        self.budget.batch_size = 64
        self.generate_calls = 0
        self.read: list[str] = []  # every rendered prompt the judge read

    def answer(self, text: str) -> str:
        self.read.append(text)
        return self.reply(text)

    def chat_prompt(self, prompt):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in prompt) + "<assistant>")

    def generate(self, requests, desc="generate"):
        self.generate_calls += 1
        return super().generate(requests, desc)


def by_quality(quality: dict[str, float], bias: str | None = None):
    """A judge reply: the better answer's letter ([[C]] on equal quality), or ``bias``
    whatever it reads (a position-biased judge)."""
    def reply(text: str) -> str:
        if bias is not None:
            return bias
        a, b = re.search(r"\[A\](.*)\[B\](.*)<assistant>", text).groups()
        qa, qb = quality[a], quality[b]
        return "I compared them. [[C]]" if qa == qb else f"[[{'A' if qa > qb else 'B'}]]"
    return reply


def test_self_reject_picks_the_tournament_winner(prompt):
    quality = {"a": 1, "b": 5, "c": 3, "d": 4, "e": 2, "x": 1, "y": 2}
    model = ChatScripted(by_quality(quality))
    judge = SJ.pair_judge(model, prompt, max_new_tokens=16)
    out = SJ.self_reject(["Q1", "Q2"], [list("abcde"), list("xy")], judge, seed=4)
    assert [r.winner for r in out] == ["b", "y"]
    # both prompts' rounds in lockstep: 3 rounds for 5 candidates -> 3 generate calls
    assert model.generate_calls == 3
    first = out[0]
    assert first.counts == {"matches": 4, "judge_calls": 8, "ties": 0, "inconsistent": 0,
                            "unparseable": 0, "byes": 2}
    for m in first.matches:  # every match's replies are kept, both orders
        better, worse = sorted((m.a, m.b), key=lambda i: -quality["abcde"[i]])
        assert m.winner == better
        assert m.verdicts == (("A", "B") if m.a == better else ("B", "A"))
    assert SJ.self_reject(["Q1"], [list("abcde")], judge, seed=4)[0].matches == first.matches
    # the judge read each question with its own candidates, in both orders
    assert {"<system>SYS-PAIR<user>[Q]Q2[A]x[B]y<assistant>",
            "<system>SYS-PAIR<user>[Q]Q2[A]y[B]x<assistant>"} <= set(model.read)
    assert not any("[Q]Q2" in t and "[A]a" in t for t in model.read)


def test_self_reject_counts_position_bias_ties_and_unreadable_replies(prompt):
    biased = SJ.pair_judge(ChatScripted(by_quality({}, bias="[[A]]")), prompt, 16)
    (r,) = SJ.self_reject(["Q"], [["p", "q", "r", "s"]], biased)
    # the first-shown answer always wins: one point each, a tie, lowest number goes through
    assert r.winner_index == 0
    assert r.counts["inconsistent"] == r.counts["ties"] == r.counts["matches"] == 3
    mute = SJ.pair_judge(ChatScripted(by_quality({}, bias="no verdict [[A]] [[B]]")), prompt, 16)
    (r,) = SJ.self_reject(["Q"], [["p", "q", "r"]], mute, seed=1)
    assert r.winner_index == 0 and r.counts["unparseable"] == 4 and r.counts["inconsistent"] == 0
    assert all(m.verdicts == (None, None) for m in r.matches)
    # [[C]] is a tie, not an unreadable reply
    ties = SJ.pair_judge(ChatScripted(by_quality({"p": 1, "q": 1})), prompt, 16)
    (r,) = SJ.self_reject(["Q"], [["q", "p"]], ties)
    assert r.counts["ties"] == 1 and r.counts["unparseable"] == 0 and r.matches[0].verdicts == ("tie", "tie")


class SeedEcho:
    """A generator whose samples name the seed of their batch and their row in it."""

    def __init__(self):
        self.seeds = []

    def generate(self, rows, params):
        self.seeds.append(params.seed)
        return [Generation(list(p), [k], f"{p[0]}:{params.seed}:{k}") for k, p in enumerate(rows)]


def test_best_of_n_samples_then_rejects(prompt):
    gen = SeedEcho()
    params = SamplingParams(temperature=1.0, seed=5)

    def higher_row(text: str) -> str:  # prefers the sample from the later row of its batch
        a, b = (int(x) for x in re.search(r"\[A\].*:(\d+)\[B\].*:(\d+)<", text).groups())
        return "[[A]]" if a > b else "[[B]]"

    out = SJ.best_of_n(gen, [[1], [2]], ["one", "two"], params, 3,
                       SJ.pair_judge(ChatScripted(higher_row), prompt, 8), batch_size=4)
    # 2 prompts x 3 copies in batches of 4: two batches, two distinct seeds; each prompt
    # gets its own 3 candidates, all different
    assert len(gen.seeds) == 2 and len(set(gen.seeds)) == 2 and 5 not in gen.seeds
    for k, r in enumerate(out):
        texts = [g.text for g in r.candidates]
        assert len(set(texts)) == 3 and all(t.startswith(f"{k + 1}:") for t in texts)
        assert r.winner.text == r.rejection.winner == texts[r.rejection.winner_index]
    # prompt 1: rows 0, 1, 2 of batch 0 -> the third; prompt 2: row 3 of batch 0, rows 0
    # and 1 of batch 1 -> the first
    assert [r.rejection.winner_index for r in out] == [2, 0]
    model = ChatScripted(higher_row)
    with pytest.raises(SJ.SelfJudgeError, match="temperature > 0"):
        SJ.best_of_n(gen, [[1]], ["one"], SamplingParams(), 2, SJ.pair_judge(model, prompt, 8))


# --- the command line -----------------------------------------------------------------


def test_cli_generate_best_of_self_judged(sft_checkpoint):
    # the tiny judge writes no verdict: every match is a tie, decided by the tie rule
    proc = hcx("generate", str(sft_checkpoint), "--prompt", "한국의 수도는?", "--best-of", "3",
               "--judge", "self", "--max-new-tokens", "8", "--judge-max-new-tokens", "8", "--json")
    (out,) = [json.loads(line) for line in proc.stdout.splitlines()]
    best = out["best_of"]
    assert best["n"] == 3 and best["judge"] == "self" and best["judge_prompt"] == "pair-v2"
    assert len(best["candidates"]) == 3 and len({c["text"] for c in best["candidates"]}) > 1
    assert out["text"] == best["candidates"][best["winner_index"]]["text"]
    counts = best["counts"]
    assert counts["matches"] == len(best["matches"]) == 2 and counts["judge_calls"] == 4
    # the counts are those of the matches reported, and each winner follows the rule
    unparseable = ties = inconsistent = 0
    for m in best["matches"]:
        assert len(m["judgments"]) == 2
        pa, pb, bad = match_points(*m["verdicts"])
        unparseable += bad
        ties += pa == pb
        inconsistent += pa == pb > 0
        assert m["winner"] == (min(m["a"], m["b"]) if pa == pb else m["a"] if pa > pb else m["b"])
    assert (counts["unparseable"], counts["ties"], counts["inconsistent"]) == (unparseable, ties,
                                                                              inconsistent)
    assert best["matches"][-1]["winner"] == best["winner_index"]
    assert f"candidate {best['winner_index']} won" in proc.stderr


def test_best_of_flags_fail_before_loading(tmp_path):
    from hcx.cli import build_parser
    from hcx.engine.generate import GenerationError

    def run(*argv):
        args = build_parser().parse_args(["generate", str(tmp_path / "none"), "--prompt", "x",
                                          *argv])
        return args.func(args, list(argv))

    with pytest.raises(GenerationError, match="--judge judges the candidates of --best-of N"):
        run("--judge", "self")
    with pytest.raises(GenerationError, match="--temperature must be > 0"):
        run("--best-of", "2", "--temperature", "0")
    with pytest.raises(GenerationError, match="at least 1"):
        run("--best-of", "0")
