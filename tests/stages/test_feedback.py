"""``hcx data feedback`` (Zephyr dDPO preference data) and ``hcx generate --best-of N
--reward``: binarisation, ties, resume, the DPO reader on the output, and CLI runs on the
session checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hcx.stages import feedback as F
from hcx.stages import preference as P
from hcx.tokenizer.loading import open_tokenizer
from tests.conftest import SHIPPED_TOKENIZER, hcx


def scripted(prompts: list[str], completions: list[str]) -> list[float | None]:
    """A ``module:function`` reward for the tests: a completion's score is its last word
    (``"... 0.7"``); a completion whose last word is not a number gets no verdict."""
    out = []
    for c in completions:
        try:
            out.append(float(c.split()[-1]))
        except ValueError:
            out.append(None)
    return out


REWARD = "tests.stages.test_feedback:scripted"

# prompt -> [(completion, source model)]
COMPLETIONS = {
    "best is clear": [("a 0.2", "m1"), ("b 0.9", "m2"), ("c 0.5", "m1"), ("d 0.1", "m2")],
    "tie for best": [("a 0.8", "m1"), ("b 0.8", "m2"), ("c 0.1", "m1")],
    "one completion": [("a 0.3", "m1")],
    "one scored": [("a 0.3", "m1"), ("no verdict", "m2")],
    "two scored": [("a 0.4", "m1"), ("no verdict", "m2"), ("b 0.6", "m2")],
}


def write_completions(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for prompt, items in COMPLETIONS.items():
            for text, model in items:
                f.write(json.dumps({"prompt": prompt, "completion": text, "model": model}) + "\n")
    return path


def run_feedback(*argv: str) -> int:
    """``hcx data feedback`` in this process (no model is opened with --completions)."""
    from hcx.cli import build_parser

    args = build_parser().parse_args(["data", "feedback", *argv])
    return args.func(args, list(argv))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_binarise_ties_and_too_few_through_the_command(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert run_feedback("--completions", str(write_completions(tmp_path / "c.jsonl")),
                        "--reward", REWARD, "--out", str(out)) == 0
    pairs = {r["prompt"]: r for r in lines(out)}
    assert set(pairs) == {"best is clear", "two scored"}
    best = pairs["best is clear"]
    assert (best["chosen"], best["score_chosen"], best["model_chosen"]) == ("b 0.9", 0.9, "m2")
    assert best["rejected"] in ("a 0.2", "c 0.5", "d 0.1")  # a random other one
    assert best["score_rejected"] == float(best["rejected"].split()[-1])
    assert best["candidates"] == 4
    two = pairs["two scored"]
    assert (two["chosen"], two["rejected"], two["model_rejected"]) == ("b 0.6", "a 0.4", "m1")
    dropped = {r["prompt"]: r["dropped"] for r in lines(F.dropped_path(out))}
    assert dropped == {"tie for best": "tie", "one completion": "too_few_scored",
                       "one scored": "too_few_scored"}
    printed = capsys.readouterr().out
    assert "5 prompts (0 done before) -> 2 pairs written; dropped 1 ties and 2 with < 2 " \
           "scored completions; 13 completions scored (2 without a verdict)" in printed
    assert not F.partial_path(out).exists()
    # the DPO stage's reader takes the file as it is
    examples = P.read_examples(str(out), open_tokenizer(SHIPPED_TOKENIZER), "dpo", 64)
    assert len(examples) == 2 and all(len(e.completions) == 2 for e in examples)


def test_chat_prompts_give_assistant_messages(tmp_path):
    path = tmp_path / "c.jsonl"
    chat = [{"role": "user", "content": "안녕?"}]
    path.write_text("".join(json.dumps({"messages": chat + [{"role": "assistant",
                                                             "content": "answer"}],
                                        "completion": c}) + "\n" for c in ("x 1", "y 2")))
    out = tmp_path / "o.jsonl"
    run_feedback("--completions", str(path), "--prompt-field", "messages", "--reward", REWARD,
                 "--out", str(out))
    (rec,) = lines(out)
    assert rec["prompt"] == chat  # the trailing assistant turn is not part of the prompt
    assert rec["chosen"] == [{"role": "assistant", "content": "y 2"}]
    assert rec["model_chosen"] == "c.jsonl"  # no model field: the file names the source
    assert len(P.read_examples(str(out), open_tokenizer(SHIPPED_TOKENIZER), "dpo", 64)) == 1


def test_resume_after_a_torn_line(tmp_path, capsys):
    completions = str(write_completions(tmp_path / "c.jsonl"))
    reference = tmp_path / "ref.jsonl"
    run_feedback("--completions", completions, "--reward", REWARD, "--out", str(reference),
                 "--batch-size", "2")
    want = reference.read_text(encoding="utf-8")
    # a crash after the first pair, half-way through writing the second
    out = tmp_path / "pairs.jsonl"
    first, second = want.splitlines(keepends=True)
    F.partial_path(out).write_text(first + second[:len(second) // 2], encoding="utf-8")
    capsys.readouterr()
    run_feedback("--completions", completions, "--reward", REWARD, "--out", str(out),
                 "--batch-size", "2")
    assert out.read_text(encoding="utf-8") == want  # no duplicate, nothing lost, same pairs
    assert "(1 done before) -> 1 pairs written" in capsys.readouterr().out
    # a rerun on the finished file has nothing left to do and keeps it whole
    run_feedback("--completions", completions, "--reward", REWARD, "--out", str(out))
    assert out.read_text(encoding="utf-8") == want
    assert "5 prompts (5 done before) -> 0 pairs written" in capsys.readouterr().out
    assert len(lines(F.dropped_path(out))) == 3


def test_flags_fail_before_any_model_opens(tmp_path):
    from hcx.cli import build_parser
    from hcx.engine.generate import GenerationError
    from hcx.stages.rewards import RewardError

    completions = str(write_completions(tmp_path / "c.jsonl"))
    with pytest.raises(RewardError, match="--reward='nonsense'"):
        run_feedback("--completions", completions, "--reward", "nonsense", "--out",
                     str(tmp_path / "o.jsonl"))
    with pytest.raises(F.FeedbackError, match="no completions"):
        run_feedback("--prompts", completions, "--reward", REWARD, "--out",
                     str(tmp_path / "o.jsonl"))

    with pytest.raises(F.FeedbackError, match="needs --temperature > 0"):
        run_feedback("--prompts", completions, "--model", str(tmp_path / "none"),
                     "--temperature", "0", "--reward", REWARD, "--out", str(tmp_path / "o.jsonl"))

    def generate(*argv):
        args = build_parser().parse_args(["generate", str(tmp_path / "none"), "--prompt", "x",
                                          *argv])
        return args.func(args, list(argv))

    with pytest.raises(GenerationError, match="--reward and --judge exclude each other"):
        generate("--best-of", "2", "--reward", REWARD, "--judge", "self")
    with pytest.raises(GenerationError, match="--reward scores the candidates of --best-of N"):
        generate("--reward", REWARD)


def test_best_index_keeps_the_first_of_equal_scores():
    assert F.best_index([0.1, 0.7, 0.7, None]) == 1
    assert F.best_index([None, 0.0]) == 1
    assert F.best_index([None, None]) is None


def test_cli_feedback_sampled_from_a_checkpoint(sft_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n"
                               for p in ("한국의 수도는?", "Say hello.")), encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    proc = hcx("data", "feedback", "--prompts", str(prompts), "--model", str(sft_checkpoint),
               "--samples", "2", "--max-new-tokens", "8", "--reward",
               "hcx.scorers:korean_share", "--out", str(out))
    pairs, dropped = lines(out), lines(F.dropped_path(out))
    assert len(pairs) + len(dropped) == 2  # every prompt is accounted for
    for rec in pairs:
        assert rec["model_chosen"] == rec["model_rejected"] == str(sft_checkpoint)
        assert rec["score_chosen"] > rec["score_rejected"] and rec["candidates"] == 2
    assert f"2 prompts (0 done before) -> {len(pairs)} pairs written" in proc.stdout


def test_cli_best_of_by_reward_keeps_the_argmax(sft_checkpoint):
    from hcx.scorers import korean_share

    proc = hcx("generate", str(sft_checkpoint), "--prompt", "한국의 수도는?", "--best-of", "3",
               "--reward", "hcx.scorers:korean_share", "--max-new-tokens", "8", "--json")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    best = out["best_of"]
    scores = [c["score"] for c in best["candidates"]]
    assert scores == korean_share([], [c["text"] for c in best["candidates"]])
    assert best["winner_index"] == scores.index(max(scores))
    assert out["text"] == best["candidates"][best["winner_index"]]["text"]
    assert len({c["text"] for c in best["candidates"]}) > 1  # sampled, not one answer thrice
