"""hcx.stages.candidate_selection: the SELF-JUDGE tournament with scripted judges, and Zephyr's
binarisation by hand."""

from __future__ import annotations

import random

import pytest

from hcx.stages.candidate_selection import (binarize_scores, judge_match, match_points,
                                            tournament, tournaments)


def by_quality(quality: dict[str, float]):
    """An unbiased judge that prefers the higher quality, "tie" on equal quality; it records
    every call it receives."""
    calls: list[tuple[str, str]] = []

    def prefer(a: str, b: str):
        calls.append((a, b))
        if quality[a] == quality[b]:
            return "tie"
        return "A" if quality[a] > quality[b] else "B"

    prefer.calls = calls  # type: ignore[attr-defined]
    return prefer


def always(verdict):
    return lambda a, b: verdict


def test_judge_match_counts_both_orders():
    judge = by_quality({"x": 2.0, "y": 1.0})
    assert judge_match("x", "y", judge) == (2, 0, 0)
    assert judge_match("y", "x", judge) == (0, 2, 0)
    assert judge.calls == [("x", "y"), ("y", "x"), ("y", "x"), ("x", "y")]
    # a judge that always says "A" is pure position bias: one point each
    assert judge_match("x", "y", always("A")) == (1, 1, 0)
    assert judge_match("x", "y", always(None)) == (0, 0, 2)
    with pytest.raises(ValueError):
        judge_match("x", "y", always("first"))


def test_tournament_picks_the_best_with_a_consistent_judge():
    quality = {"a": 1.0, "b": 5.0, "c": 3.0, "d": 4.0, "e": 2.0}
    cands = list(quality)
    judge = by_quality(quality)
    result = tournament(cands, judge)
    # index order, 5 candidates: round 1: bye for a, (b, c) -> b, (d, e) -> d;
    # round 2 (a, b, d): bye for a, (b, d) -> b; round 3: (a, b) -> b
    assert result.winner == "b" and result.winner_index == 1
    assert result.rounds == [[(1, 2, 1), (3, 4, 3)], [(1, 3, 1)], [(0, 1, 1)]]
    assert result.matches == 4 and result.judge_calls == 8 == len(judge.calls)
    assert result.byes == 2 and result.ties == 0 and result.unparseable == 0
    # any bracket finds the best when the judge is consistent and transitive
    for seed in range(5):
        assert tournament(cands, by_quality(quality), rng=random.Random(seed)).winner == "b"


def test_tournament_position_bias_is_a_tie_broken_by_index():
    result = tournament(["p", "q", "r", "s"], always("A"))
    # every match: one point each (inconsistent), the lower index goes through
    assert result.winner_index == 0
    assert result.ties == 3 and result.inconsistent == 3 and result.matches == 3
    result = tournament(["p", "q", "r"], always("B"))
    assert result.winner_index == 0 and result.inconsistent == 2 and result.byes == 1


def test_tournament_counts_ties_and_unparseable_replies():
    replies = iter(["A", None,      # match (b, c): one point for b, one unparseable -> b
                    "tie", "tie",   # match (d, e): tie -> d (lower index)
                    None, None,     # round 2 (b, d): nothing parseable -> tie -> b
                    "B", "A"])      # round 3 (a, b): b wins both orders
    result = tournament(["a", "b", "c", "d", "e"], lambda x, y: next(replies))
    assert result.winner == "b"
    assert result.unparseable == 3 and result.ties == 2 and result.inconsistent == 0
    assert result.rounds == [[(1, 2, 1), (3, 4, 3)], [(1, 3, 1)], [(0, 1, 1)]]


def test_tournament_edge_cases():
    result = tournament(["only"], always("A"))
    assert result.winner == "only" and result.matches == 0 and result.rounds == []
    with pytest.raises(ValueError):
        tournament([], always("A"))
    # shuffled brackets are reproducible for a seed
    quality = {str(i): float(i % 3) for i in range(7)}
    first = tournament(list(quality), by_quality(quality), rng=random.Random(3))
    again = tournament(list(quality), by_quality(quality), rng=random.Random(3))
    assert first.rounds == again.rounds and first.winner_index == again.winner_index


def test_tournaments_in_lockstep_equal_separate_tournaments():
    quality = {f"{g}{i}": float((7 * i + g) % 5) for g in range(3) for i in range(6)}
    groups = [[f"{g}{i}" for i in range(n)] for g, n in enumerate((5, 1, 6))]
    rounds_judged: list[int] = []

    def judge(pairs):  # one call per round, every group's matches in it
        rounds_judged.append(len(pairs))
        prefer = by_quality(quality)
        return [(prefer(a, b), prefer(b, a)) for a, b in pairs]

    together = tournaments(groups, judge, rngs=[random.Random(g) for g in range(3)])
    apart = [tournament(c, by_quality(quality), rng=random.Random(g)) for g, c in enumerate(groups)]
    assert together == apart
    # rounds: 5 -> 3 -> 2 -> 1 and 6 -> 3 -> 2 -> 1: (2 + 3), (1 + 1), (1 + 1) matches
    assert rounds_judged == [5, 2, 2]
    assert match_points("A", "B") == (2, 0, 0) and match_points("B", None) == (0, 1, 1)
    with pytest.raises(ValueError, match="answered 0 of 1"):
        tournaments([["a", "b"]], lambda pairs: [])


def test_binarize_scores_by_hand():
    scores = [
        [7.0, 9.0, 8.0, 6.0],            # best 1, rejected drawn from {0, 2, 3}
        [5.0, 5.0, 1.0, 2.0],            # tie for best -> dropped
        [3.0, None, float("nan"), 1.0],  # two scored: best 0, rejected 3
        [4.0, None],                     # one scored -> dropped
        [1.0, 2.0],                      # best 1, rejected 0
    ]
    out = binarize_scores(scores, seed=0)
    assert out.dropped_ties == 1 and out.dropped_too_few == 1
    assert [p[:2] for p in out.pairs] == [(0, 1), (2, 0), (4, 1)]
    assert out.pairs[1][2] == 3 and out.pairs[2][2] == 0
    assert out.pairs[0][2] in (0, 2, 3)
    # the draw: one random.Random(seed) used in prompt order, one draw per kept prompt
    rng = random.Random(0)
    assert out.pairs[0][2] == [0, 2, 3][rng.randrange(3)]
    # reproducible for a seed, and every rejected scores strictly below its chosen
    assert binarize_scores(scores, seed=0) == out
    for p, c, r in out.pairs:
        assert scores[p][c] > scores[p][r]


def test_binarize_scores_draws_every_other_completion():
    seen = {binarize_scores([[0.0, 1.0, 2.0, 3.0]], seed=s).pairs[0][2] for s in range(40)}
    assert seen == {0, 1, 2}
