r"""SELF-JUDGE: one model that is both the policy and its own pairwise judge.

Lee et al. 2024, "Aligning Large Language Models by On-Policy Self-Judgment"
(arXiv:2402.11253, ACL 2024; the authors' code: github.com/oddqueue/self-judge). The
method's pieces, each reusable by the commands and stages that need it:

* **Judge prompts** (:func:`load_pair_prompt`, :func:`judge_question`,
  :func:`judgment_messages`): the pairwise judgment is asked with a FastChat judge prompt
  (``pair-v2`` by default, from ``data://eval/mt_bench_en/judge_prompts.jsonl``; the
  Korean one is in ``data://eval/ko_mt_bench/judge_prompts_ko.jsonl``) through
  :class:`hcx.evaluation.judges.Judge`, so training data and judging use one rendering.
* **JSFT data** (Judge-augmented SFT, :func:`jsft_conversations`, :func:`write_jsft`):
  preference pairs become SFT conversations in which the model judges the pair. The user
  turn is the judge prompt filled with the question and the two answers, the assistant
  turn the verdict in the prompt's format (``[[A]]``/``[[B]]``). Each pair is written in
  both orders, chosen shown as A (verdict ``[[A]]``) and as B (verdict ``[[B]]``), so the
  judge learns no position bias: the authors' ``construct_*_judge_*_dataset`` in
  ``preprocess.py`` do the same. With the plain SFT conversations (prompt -> chosen)
  mixed in, one model learns to answer and to judge (JSFT = SFT data + judgment data).
* **Self-rejection** (:func:`self_reject`, :func:`best_of_n`): sample N responses, keep
  the one the model itself prefers through a tournament of pairwise judgments
  (:func:`hcx.stages.candidate_selection.tournaments`, the authors'
  ``tournament_rejection_sampling``), every round of every prompt judged in one batch.

What hcx does differently from the authors' code, and why:

- The verdict is generated and read strictly (:func:`hcx.evaluation.judges.parse_verdict`)
  rather than read off the probabilities of the tokens " A" and " B" after a fixed
  assistant prefix: it works for any model behind :class:`LanguageModel` (a checkpoint, a
  Hugging Face directory, an endpoint), and an unreadable reply is counted, never guessed.
  JSFT data therefore trains the reply ``[[A]]``, the format ``pair-v2`` asks for.
- A rationale is written only when the data has one: per-response evaluations in the
  fields ``chosen_rationale`` and ``rejected_rationale`` (the authors' UltraFeedback
  "rationale" variant: one evaluation per response, placed by position), before the
  verdict as ``pair-v2`` asks ("After providing your explanation, output your final
  verdict").
- Ties: a pair whose two completions are the same text, or whose ``score_chosen`` equals
  its ``score_rejected`` (UltraFeedback-binarized style), is a tie. Ties are dropped and
  counted by default, as the authors keep only strictly better/worse comparisons;
  ``ties="keep"`` writes them with the verdict ``[[C]]`` in both orders (``pair-v2``'s
  tie). Identical completions are always dropped: there is nothing to compare.
- The question: a plain prompt, or a conversation of one user turn, is given as it is; a
  longer conversation is flattened as the authors flatten HH-RLHF contexts ("User: ..." /
  "Assistant: ..." turns separated by blank lines), system messages left out.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from hcx.data.sources import BadRecord, RawRecord, iter_records, parse_object
from hcx.errors import HcxError
from hcx.evaluation.judges import (Judge, JudgePrompt, PairCase, judge_messages, load_prompts,
                                   parse_verdict)
from hcx.evaluation.language_model import LanguageModel
from hcx.files import write_text_atomic
from hcx.paths import resolve
from hcx.stages.candidate_selection import Verdict, tournaments
from hcx.stages.preference import parse_preference

DEFAULT_PROMPTS_FILE = "data://eval/mt_bench_en/judge_prompts.jsonl"
KOREAN_PROMPTS_FILE = "data://eval/ko_mt_bench/judge_prompts_ko.jsonl"
DEFAULT_PROMPT = "pair-v2"
#: The authors sample on-policy responses at temperature 1.0, top-p 0.9
#: (configs/*_self_judge.yaml); ``hcx generate --best-of`` defaults to the same.
SAMPLING_TEMPERATURE = 1.0
SAMPLING_TOP_P = 0.9
#: What a pairwise judgment of one question fills (``pair-v2``'s placeholders).
PAIR_FIELDS = {"question", "answer_a", "answer_b"}
#: How verdicts are written and read (:func:`hcx.evaluation.judges.parse_verdict`).
VERDICT_FORMAT = "[[A]]"


class SelfJudgeError(HcxError, ValueError):
    pass


# --- judge prompts ---------------------------------------------------------------------


def load_pair_prompt(path: str | None = None, name: str | None = None) -> JudgePrompt:
    """The pairwise judge prompt ``name`` (default ``pair-v2``) of a FastChat
    ``judge_prompts.jsonl`` (or YAML) file (default: MT-Bench's English prompts;
    ``data://`` paths resolve against the data root). It must be of type pairwise, fill
    from one question and two answers, and ask for verdicts as ``[[A]]``."""
    path = path or DEFAULT_PROMPTS_FILE
    name = name or DEFAULT_PROMPT
    prompts = load_prompts(resolve(path))
    prompt = prompts.get(name)
    if prompt is None:
        pairwise = sorted(n for n, p in prompts.items() if p.type == "pairwise")
        raise SelfJudgeError(f"{path}: no judge prompt {name!r}; its pairwise prompts: "
                             f"{', '.join(pairwise) or 'none'}")
    if prompt.type != "pairwise":
        raise SelfJudgeError(f"{path}: judge prompt {name!r} is of type {prompt.type}; "
                             "SELF-JUDGE compares two answers (a pairwise prompt, e.g. pair-v2)")
    prompt.check(PAIR_FIELDS, "a SELF-JUDGE judgment (one question, two answers)")
    if prompt.output_format != VERDICT_FORMAT:
        raise SelfJudgeError(f"{path}: judge prompt {name!r} asks for verdicts as "
                             f"{prompt.output_format!r}; hcx reads [[A]], [[B]] and [[C]]")
    return prompt


def judge_question(prompt: str | list[dict]) -> str:
    """The ``{question}`` of a judgment: a plain prompt, or the content of a single user
    turn, as it is; a longer conversation flattened as the authors do ("User: ..." and
    "Assistant: ..." turns separated by blank lines; system messages left out)."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1 and turns[0].get("role") == "user":
        return str(turns[0].get("content", ""))
    names = {"user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names.get(m.get('role'), str(m.get('role')).title())}: "
                       f"{m.get('content', '')}" for m in turns).strip()


def judgment_messages(prompt: JudgePrompt, question: str, answer_a: str,
                      answer_b: str) -> list[dict]:
    """The messages a judge is asked one order of a pair with: exactly what
    :meth:`Judge.pairwise_many` sends (the same filling and rendering)."""
    values = Judge.pair_values(PairCase([question], [answer_a], [answer_b]), swap=False)
    return judge_messages(prompt, prompt.fill(values, "a SELF-JUDGE judgment"))


def verdict_reply(verdict: Literal["A", "B", "C"],
                  rationales: tuple[str, str] | None = None) -> str:
    """The judge's reply to train on: ``[[A]]``, ``[[B]]`` or ``[[C]]``, after the
    evaluations of the answers shown as A and as B when the data has them."""
    if rationales is None:
        return f"[[{verdict}]]"
    return (f"Evaluation of Assistant A: {rationales[0].strip()}\n"
            f"Evaluation of Assistant B: {rationales[1].strip()}\n\n[[{verdict}]]")


def read_verdict(judgment: str) -> Verdict:
    """One order's verdict as the tournament takes it: "A", "B", "tie" (``[[C]]``) or
    None (the reply names no verdict, or several)."""
    found = parse_verdict(judgment)
    return None if found is None else "tie" if found == "C" else found


# --- JSFT data -----------------------------------------------------------------------


@dataclass
class JSFTStats:
    """What :func:`write_jsft` read and wrote. ``skipped`` counts pairs that gave no
    judgment, by reason (``tie``, ``identical``, and the reasons of bad records)."""

    records: int = 0
    pairs: int = 0  # preference pairs written as judgments
    judgments: int = 0  # judgment conversations
    responses: int = 0  # plain SFT conversations (prompt -> chosen)
    ties_kept: int = 0  # pairs written with the verdict [[C]]
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        return (f"{self.records:,} records -> {self.pairs:,} pairs judged "
                f"({self.judgments:,} judgment conversations"
                + (f", {self.ties_kept:,} ties as [[C]]" if self.ties_kept else "")
                + f"), {self.responses:,} response conversations; skipped {skipped:,}"
                + (f" ({', '.join(f'{k}: {v:,}' for k, v in sorted(self.skipped.items()))})"
                   if skipped else ""))

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped": dict(self.skipped)}


def _answer(completion: list[dict], where: str, name: str) -> str:
    """The text of a completion the judge compares: one assistant message."""
    if len(completion) != 1:
        raise BadRecord(where, "multi_message_completion",
                        f"field {name!r} holds {len(completion)} messages; a judgment compares "
                        "single assistant replies")
    content = completion[0].get("content")
    if not isinstance(content, str):
        raise BadRecord(where, "bad_field", f"field {name!r}: content must be a string")
    return content


def _rationales(obj: dict, where: str) -> tuple[str, str] | None:
    given = [k for k in ("chosen_rationale", "rejected_rationale") if obj.get(k) is not None]
    if not given:
        return None
    if len(given) == 1 or not all(isinstance(obj[k], str) for k in given):
        raise BadRecord(where, "bad_field", "'chosen_rationale' and 'rejected_rationale' go "
                        "together, as strings (one evaluation per answer)")
    return obj["chosen_rationale"], obj["rejected_rationale"]


def _is_tie(obj: dict) -> bool:
    scores = obj.get("score_chosen"), obj.get("score_rejected")
    return all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores) \
        and scores[0] == scores[1]


def jsft_conversations(obj: dict, where: str, prompt: JudgePrompt, *, both_orders: bool = True,
                       with_responses: bool = False, ties: Literal["drop", "keep"] = "drop",
                       rng: random.Random | None = None,
                       stats: JSFTStats | None = None) -> list[dict]:
    """The JSFT conversations of one paired preference record (TRL's format, as
    ``hcx align`` reads it: :func:`hcx.stages.preference.parse_preference`), each
    ``{"messages": [...], "jsft": {...}}``:

    - judgments: ``[system, user, assistant]``, the judge prompt filled with the question
      and the answers, chosen shown first (verdict ``[[A]]``) then, with ``both_orders``,
      rejected first (verdict ``[[B]]``); without ``both_orders`` one order, drawn with
      ``rng``. A tie (see the module's docstring) is dropped, or with ``ties="keep"``
      written with ``[[C]]``;
    - with ``with_responses``, the plain SFT conversation prompt + chosen (ties too: the
      chosen answer is no worse).

    ``jsft`` says what each is (``kind`` judgment|response, ``source`` the record,
    ``chosen_as`` A|B). A record that cannot be used raises :class:`BadRecord`."""
    stats = stats if stats is not None else JSFTStats()
    rng = rng or random.Random(0)
    ((messages, (chosen, rejected), _),) = parse_preference(obj, where, unpaired=False)
    answer_chosen = _answer(chosen, where, "chosen")
    answer_rejected = _answer(rejected, where, "rejected")
    rationales = _rationales(obj, where)
    out: list[dict] = []
    if with_responses:
        out.append({"messages": [*messages, *chosen], "jsft": {"kind": "response",
                                                               "source": where}})
        stats.responses += 1
    tie = _is_tie(obj)
    if answer_chosen.strip() == answer_rejected.strip():
        stats.skipped["identical"] += 1
        return out
    if tie and ties == "drop":
        stats.skipped["tie"] += 1
        return out
    question = judge_question(messages)
    positions = ["A", "B"] if both_orders else [rng.choice("AB")]
    for chosen_as in positions:
        first, second = ((answer_chosen, answer_rejected) if chosen_as == "A"
                         else (answer_rejected, answer_chosen))
        shown = None
        if rationales is not None:
            shown = rationales if chosen_as == "A" else (rationales[1], rationales[0])
        reply = verdict_reply("C" if tie else chosen_as, shown)  # type: ignore[arg-type]
        out.append({"messages": [*judgment_messages(prompt, question, first, second),
                                 {"role": "assistant", "content": reply}],
                    "jsft": {"kind": "judgment", "source": where, "chosen_as": chosen_as,
                             "prompt": prompt.name}})
        stats.judgments += 1
    stats.pairs += 1
    stats.ties_kept += int(tie)
    return out


def write_jsft(inputs: Sequence[str], out: str | Path, prompt: JudgePrompt, *,
               both_orders: bool = True, with_responses: bool = False,
               ties: Literal["drop", "keep"] = "drop", seed: int = 0, skip_bad: bool = False,
               progress: bool = True) -> JSFTStats:
    """Write the JSFT conversations of every record of ``inputs`` (JSONL, Parquet, hf://,
    directories, globs; ``data://`` paths) to ``out`` (JSONL, written atomically), in an
    order shuffled with ``seed`` (one ``random.Random(seed)`` draws the single orders, then
    shuffles). The file is SFT data: ``hcx sft`` reads its ``messages``. A bad record
    stops the run, naming it, unless ``skip_bad`` (then it is counted by reason)."""
    from tqdm import tqdm

    stats = JSFTStats()
    rng = random.Random(seed)
    conversations: list[dict] = []
    records: Iterable[RawRecord] = (r for path in inputs for r in iter_records(path))
    for record in tqdm(records, desc="jsft", unit=" records", disable=not progress,
                       dynamic_ncols=True):
        stats.records += 1
        try:
            conversations += jsft_conversations(
                parse_object(record), record.where, prompt, both_orders=both_orders,
                with_responses=with_responses, ties=ties, rng=rng, stats=stats)
        except BadRecord as e:
            if not skip_bad:
                raise SelfJudgeError(f"{e} (use --skip-bad to count and skip bad records)") \
                    from None
            stats.skipped[e.reason] += 1
    if not conversations:
        raise SelfJudgeError(f"{', '.join(inputs)}: no conversation to write ({stats.summary()})")
    rng.shuffle(conversations)
    write_text_atomic(out, "".join(json.dumps(c, ensure_ascii=False) + "\n"
                                   for c in conversations))
    return stats


# --- self-rejection ------------------------------------------------------------------


@dataclass
class JudgedMatch:
    """One tournament match: candidates ``a`` and ``b`` (indices), the ``winner``, and the
    judge's ``verdicts`` and ``judgments`` (its replies) on (a, b) and on (b, a)."""

    round: int
    a: int
    b: int
    winner: int
    verdicts: tuple[Verdict, Verdict]
    judgments: tuple[str, str]


@dataclass
class SelfRejection:
    """The tournament of one prompt's candidates: the winner, every match, and the
    counts of :class:`hcx.stages.candidate_selection.TournamentResult` (``matches``,
    ``judge_calls``, ``ties``, ``inconsistent``, ``unparseable``, ``byes``)."""

    winner_index: int
    candidates: list[str]
    matches: list[JudgedMatch]
    counts: dict[str, int]

    @property
    def winner(self) -> str:
        return self.candidates[self.winner_index]

    def to_dict(self) -> dict:
        return {"winner_index": self.winner_index, "counts": self.counts,
                "matches": [asdict(m) for m in self.matches]}


COUNTS = ("matches", "judge_calls", "ties", "inconsistent", "unparseable", "byes")


def pair_judge(model: LanguageModel, prompt: JudgePrompt, max_new_tokens: int) -> Judge:
    """A :class:`Judge` that compares two answers with ``prompt`` (greedy, up to
    ``max_new_tokens`` per reply)."""
    return Judge(model, {prompt.name: prompt}, max_new_tokens,
                 names={("pairwise", False, 1): prompt.name})


def bracket_rng(seed: int, index: int) -> random.Random:
    """The tournament brackets of prompt ``index``: shuffled every round (as the authors
    do) from a seed of its own, so a prompt's bracket does not depend on the others."""
    return random.Random(f"self-judge/{seed}/{index}")


def self_reject(questions: Sequence[str], candidates: Sequence[Sequence[str]], judge: Judge, *,
                seed: int = 0, desc: str = "self-judge") -> list[SelfRejection]:
    """Keep, for each question, the candidate its judge prefers: a single-elimination
    tournament (:func:`hcx.stages.candidate_selection.tournaments`: both orders per
    match, a tie or position-inconsistent verdicts go to the lower index, brackets
    shuffled with :func:`bracket_rng`). Every round of every question is judged in one
    ``Judge.pairwise_many`` call (one batched ``generate``)."""
    if len(questions) != len(candidates):
        raise SelfJudgeError(f"{len(questions)} questions but {len(candidates)} candidate lists")
    played: dict[tuple[int, int, int], tuple[tuple[Verdict, Verdict], tuple[str, str]]] = {}

    def judge_round(pairs: list[tuple[tuple[int, int], tuple[int, int]]]):
        cases = [PairCase([questions[g]], [candidates[g][i]], [candidates[g][j]])
                 for (g, i), (_, j) in pairs]
        out = []
        for ((g, i), (_, j)), verdict in zip(pairs, judge.pairwise_many(cases, desc)):
            texts = (verdict.orders[0].judgment, verdict.orders[1].judgment)
            both = (read_verdict(texts[0]), read_verdict(texts[1]))
            played[(g, i, j)] = (both, texts)
            out.append(both)
        return out

    groups = [[(g, i) for i in range(len(c))] for g, c in enumerate(candidates)]
    results = tournaments(groups, judge_round,
                          rngs=[bracket_rng(seed, g) for g in range(len(groups))])
    out = []
    for g, result in enumerate(results):
        matches = [JudgedMatch(r, i, j, w, *played[(g, i, j)])
                   for r, rnd in enumerate(result.rounds) for i, j, w in rnd]
        out.append(SelfRejection(result.winner_index, list(candidates[g]), matches,
                                 {k: getattr(result, k) for k in COUNTS}))
    return out


def open_judge_model(spec: str, policy: LanguageModel, *, tp: int = 1, log=print) -> LanguageModel:
    """The judge of self-rejection: ``self`` (or the policy's own path) is the policy
    model itself; an ``http(s)://`` URL a served model; else a Hugging Face directory
    (run whole in each process) or an hcx checkpoint, opened beside the policy at the
    same ``tp`` (megatron's parallel state is shared, as ``hcx eval --judge`` does)."""
    from hcx.evaluation.endpoint_client import is_endpoint
    from hcx.evaluation.models import open_model

    if spec == "self" or (Path(spec).exists() and Path(spec).resolve() == Path(policy.path)):
        return policy
    if is_endpoint(spec):
        return open_model(spec, log=log)
    hf = (Path(spec) / "config.json").is_file()
    return open_model(spec, tp=1 if hf else tp, log=log)


@dataclass
class BestOfN:
    """One prompt's N sampled candidates (:class:`hcx.engine.generate.Generation`) and the
    tournament that picked :attr:`winner`."""

    candidates: list
    rejection: SelfRejection

    @property
    def winner(self):
        return self.candidates[self.rejection.winner_index]


def sample_candidates(generator, prompts: Sequence[list[int]], params, n: int,
                      batch_size: int) -> list[list]:
    """``n`` sampled generations per tokenized prompt (``params``: a sampling
    :class:`hcx.engine.generate.SamplingParams`). The n copies of every prompt go through
    the generator ``batch_size`` rows at a time, each batch from a seed drawn from
    ``params.seed`` and the batch's number: rows of one batch draw from one generator
    and so differ, and no two batches repeat a stream."""
    from hcx.engine.generate import SamplingParams

    if params.greedy and n > 1:
        raise SelfJudgeError("sampling N candidates needs a temperature > 0 (greedy decoding "
                             "would give N copies of one answer)")
    rows = [p for p in prompts for _ in range(n)]
    out = []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        seed = random.Random(f"best-of/{params.seed}/{b}").getrandbits(63)
        batch = SamplingParams(**{**params.__dict__, "seed": seed})
        out += generator.generate(rows[start:start + batch_size], batch)
    return [out[k * n:(k + 1) * n] for k in range(len(prompts))]


def best_of_n(generator, prompts: Sequence[list[int]], questions: Sequence[str], params,
              n: int, judge: Judge, *, batch_size: int = 8) -> list[BestOfN]:
    """Self-rejection (SELF-JUDGE's inference): sample ``n`` candidates per prompt
    (:func:`sample_candidates`) and keep the one ``judge`` prefers (:func:`self_reject`,
    brackets from ``params.seed``). ``questions`` are what the judge reads as each
    prompt's question (:func:`judge_question`). ``judge`` may wrap the policy itself."""
    if n < 1:
        raise SelfJudgeError(f"best of {n}: give at least one candidate")
    sampled = sample_candidates(generator, prompts, params, n, batch_size)
    rejections = self_reject(questions, [[g.text for g in c] for c in sampled], judge,
                             seed=params.seed)
    return [BestOfN(c, r) for c, r in zip(sampled, rejections)]
