r"""Picking among sampled candidates: SELF-JUDGE's tournament and Zephyr's dDPO binarisation.

Pure Python, no tensors: both take what a rollout produced (candidates, or their scores) and
return indices plus counts of what was skipped, so a stage can log them.

* :func:`tournament`: self-rejection by a single-elimination tournament judged pairwise
  (Lee et al. 2024, "Aligning Large Language Models by On-Policy Self-Judgment",
  arXiv:2402.11253, ACL 2024).
* :func:`binarize_scores`: K scored completions per prompt -> one (chosen, rejected) pair,
  as Zephyr's distilled DPO (Tunstall et al. 2023, "Zephyr: Direct Distillation of LM
  Alignment", arXiv:2310.16944).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

T = TypeVar("T")

#: A pairwise judge's verdict on (first, second): "A" prefers the first, "B" the second,
#: "tie" neither; None is a reply that could not be parsed.
Verdict = Literal["A", "B", "tie"] | None


# ---------------------------------------------------------------------------------------------
# SELF-JUDGE: tournament rejection sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class TournamentResult(Generic[T]):
    """The outcome of :func:`tournament`.

    ``winner_index`` indexes the input candidates. Counters: ``matches`` played
    (N - 1 for N candidates), ``judge_calls`` (two per match), ``ties`` (matches with no
    winner after both orders, broken by index), ``inconsistent`` (matches whose two orders
    picked opposite winners: a position-biased judge; these are ties as well),
    ``unparseable`` (judge replies that were None), ``byes`` (rounds a candidate advanced
    without playing). ``rounds`` lists each round's matches as (index, index, winner).
    """

    winner_index: int
    winner: T
    matches: int = 0
    judge_calls: int = 0
    ties: int = 0
    inconsistent: int = 0
    unparseable: int = 0
    byes: int = 0
    rounds: list[list[tuple[int, int, int]]] = field(default_factory=list)


def match_points(first: Verdict, second: Verdict) -> tuple[int, int, int]:
    """Points of a match (a, b) from its two verdicts: ``first`` on (a, b), ``second`` on
    (b, a). Returns (points of a, points of b, unparseable replies): each order gives one
    point to the candidate it prefers; "tie" and unparseable replies give none."""
    points_a = points_b = unparseable = 0
    for verdict, a_shown_first in ((first, True), (second, False)):
        if verdict is None:
            unparseable += 1
        elif verdict in ("A", "B"):
            if (verdict == "A") == a_shown_first:
                points_a += 1
            else:
                points_b += 1
        elif verdict != "tie":
            raise ValueError(f"a judge verdict must be 'A', 'B', 'tie' or None, not {verdict!r}")
    return points_a, points_b, unparseable


def judge_match(a: T, b: T, prefer: Callable[[T, T], Verdict]) -> tuple[int, int, int]:
    """Judge one pair in both orders, ``prefer(a, b)`` then ``prefer(b, a)``: see
    :func:`match_points`."""
    first = prefer(a, b)
    return match_points(first, prefer(b, a))


#: Judges every match of a round at once: given the matches (a, b), returns per match the
#: verdicts on (a, b) and on (b, a). One call per round lets a model judge them in a batch.
JudgeMatches = Callable[[list[tuple[T, T]]], list[tuple[Verdict, Verdict]]]


def tournament(candidates: Sequence[T], prefer: Callable[[T, T], Verdict], *,
               rng: random.Random | None = None) -> TournamentResult[T]:
    r"""Keep one of N candidates by a single-elimination tournament of pairwise judgments.

    SELF-JUDGE's self-rejection by tournament (Lee et al. 2024; the scheme below follows
    the authors' code, ``tournament_rejection_sampling`` and ``get_batch_judgments`` in
    ``src/self_judge/utils.py`` of github.com/oddqueue/self-judge): the candidates are
    paired, each pair is judged, the winners go on to the next round, until one remains
    (N - 1 matches, ceil(log2 N) rounds). The scheme, exactly:

    1. Each round, the surviving candidates are put in order: shuffled with ``rng`` (the
       authors shuffle every round), or kept in index order when ``rng`` is None
       (deterministic brackets for tests). If their number is odd, the first one gets a bye.
       The rest are paired consecutively: (1st, 2nd), (3rd, 4th), ...
    2. A match (a, b) is judged in both orders, ``prefer(a, b)`` and ``prefer(b, a)``, to
       cancel position bias (the authors average the judge's A/B probabilities over the two
       orders). Each order gives a point to the candidate it prefers (:func:`judge_match`).
    3. More points wins. Equal points is a tie: both orders said "tie" or were unparseable,
       or the orders contradict each other (one point each: ``inconsistent``). A tie goes to
       the candidate with the lower input index: deterministic, and with shuffled brackets
       no position is favoured. (The authors' code, with probabilities, gives an exact tie
       to the second of the shuffled pair; with discrete verdicts ties are common enough
       that the rule is made explicit here.)

    ``prefer(first, second)`` returns "A" (first is better), "B", "tie" or None (the reply
    could not be parsed). Returns a :class:`TournamentResult`; one candidate wins without a
    match; no candidates raise ValueError. :func:`tournaments` runs many at once, each
    round judged in one batch.
    """
    def judge_round(pairs: list[tuple[T, T]]) -> list[tuple[Verdict, Verdict]]:
        out = []
        for a, b in pairs:  # in order: (a, b) then (b, a), match after match
            first = prefer(a, b)
            out.append((first, prefer(b, a)))
        return out

    return tournaments([candidates], judge_round, rngs=[rng])[0]


def tournaments(groups: Sequence[Sequence[T]], judge: JudgeMatches, *,
                rngs: Sequence[random.Random | None] | None = None) -> list[TournamentResult[T]]:
    """One :func:`tournament` per group of candidates (the N samples of each prompt), run
    in lockstep as the authors' ``tournament_rejection_sampling`` runs its contexts: each
    round, every group's matches go to ``judge`` in one call (so a model judges them in
    one batch), in group order. ``rngs[g]`` shuffles group g's brackets (None, or no
    ``rngs``: index order). The results equal separate :func:`tournament` calls."""
    if rngs is None:
        rngs = [None] * len(groups)
    if len(rngs) != len(groups):
        raise ValueError(f"{len(groups)} groups of candidates but {len(rngs)} rngs")
    results: list[TournamentResult[T]] = []
    alive: list[list[int]] = []
    for candidates in groups:
        if not candidates:
            raise ValueError("a tournament needs at least one candidate")
        results.append(TournamentResult(winner_index=0, winner=candidates[0]))
        alive.append(list(range(len(candidates))))
    while any(len(a) > 1 for a in alive):
        survivors: list[list[int]] = [[] for _ in groups]
        planned: list[tuple[int, int, int]] = []  # (group, index, index)
        for g, rng in enumerate(rngs):
            playing = alive[g]
            if len(playing) < 2:
                survivors[g] = playing
                continue
            if rng is not None:
                rng.shuffle(playing)
            if len(playing) % 2 == 1:
                survivors[g].append(playing[0])
                results[g].byes += 1
                playing = playing[1:]
            planned += [(g, i, j) for i, j in zip(playing[0::2], playing[1::2])]
            results[g].rounds.append([])
        verdicts = judge([(groups[g][i], groups[g][j]) for g, i, j in planned])
        if len(verdicts) != len(planned):
            raise ValueError(f"the judge answered {len(verdicts)} of {len(planned)} matches")
        for (g, i, j), (first, second) in zip(planned, verdicts):
            result = results[g]
            pa, pb, bad = match_points(first, second)
            result.matches += 1
            result.judge_calls += 2
            result.unparseable += bad
            if pa == pb:
                result.ties += 1
                if pa > 0:
                    result.inconsistent += 1
                winner = min(i, j)
            else:
                winner = i if pa > pb else j
            survivors[g].append(winner)
            result.rounds[-1].append((i, j, winner))
        alive = survivors
    for g, result in enumerate(results):
        result.winner_index = alive[g][0]
        result.winner = groups[g][alive[g][0]]
    return results


# ---------------------------------------------------------------------------------------------
# Zephyr dDPO: scores -> (chosen, rejected)
# ---------------------------------------------------------------------------------------------


@dataclass
class BinarizedPairs:
    """The outcome of :func:`binarize_scores`: ``pairs`` as (prompt index, chosen index,
    rejected index); ``dropped_ties`` counts prompts whose best score is shared by several
    completions, ``dropped_too_few`` prompts with fewer than two scored completions."""

    pairs: list[tuple[int, int, int]] = field(default_factory=list)
    dropped_ties: int = 0
    dropped_too_few: int = 0


def binarize_scores(scores: Sequence[Sequence[float | None]], *, seed: int = 0) -> BinarizedPairs:
    r"""Zephyr's preference binarisation (Tunstall et al. 2023, Section 3 "dDPO" and Section
    4, on UltraFeedback's 4 scored completions per prompt): the completion with the highest
    score is *chosen*, and one of the remaining completions, drawn uniformly at random, is
    *rejected*.

    ``scores[p]`` holds the K scores of prompt p's completions (e.g. a judge's mean rating);
    a None or NaN score means "unscored" and the completion is left out. A prompt is
    dropped, and counted, when its best score is shared by two or more completions (no
    well-defined "best": ``dropped_ties``; the paper does not say how it treats such ties,
    dropping them is hcx's choice) or when fewer than two completions are scored
    (``dropped_too_few``). Every other completion scores strictly below the chosen one, so
    a pair never ties.

    The draw is reproducible: one ``random.Random(seed)`` consumed in prompt order, one draw
    per kept prompt.
    """
    rng = random.Random(seed)
    out = BinarizedPairs()
    for p, row in enumerate(scores):
        scored = [(i, float(s)) for i, s in enumerate(row)
                  if s is not None and not math.isnan(float(s))]
        if len(scored) < 2:
            out.dropped_too_few += 1
            continue
        best = max(s for _, s in scored)
        top = [i for i, s in scored if s == best]
        if len(top) > 1:
            out.dropped_ties += 1
            continue
        others = [i for i, _ in scored if i != top[0]]
        out.pairs.append((p, top[0], others[rng.randrange(len(others))]))
    return out
