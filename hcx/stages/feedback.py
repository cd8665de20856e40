"""AI-feedback preference data (Zephyr's dDPO data, Tunstall et al. 2023, arXiv:2310.16944):
prompts, several completions of each (sampled from one or more models, or read from files),
scored by one reward (:mod:`hcx.stages.rewards`: a scorer, a reward model, ``math``,
``code`` or a judge), binarised into one (chosen, rejected) pair per prompt
(:func:`hcx.stages.candidate_selection.binarize_scores`: the best completion is chosen, a
seeded random other one rejected; a prompt whose best score is shared, or with fewer than
two scored completions, is dropped and counted).

The output is TRL's preference format, which ``hcx align`` (DPO, IPO, ORPO, KTO, ...)
reads as is (:func:`hcx.stages.preference.parse_preference`)::

    {"prompt": ..., "chosen": ..., "rejected": ..., "score_chosen": 0.9,
     "score_rejected": 0.2, "model_chosen": "...", "model_rejected": "...", "candidates": 4}

A chat prompt (a list of messages) gets its completions as one assistant message each; a
text prompt gets them as text.

Resuming. The pairs are written to ``OUT.partial`` one line per prompt, flushed after each
prompt; prompts dropped go, one line each, to ``OUT.dropped.jsonl.partial`` (with their
scores and why). A rerun with the same ``OUT`` reads both, ignores a torn last line (cut
off by a crash: the file is truncated to its last whole line), and skips every prompt
already there; when all prompts are done both files are renamed into place, so ``OUT`` is
never half-written. A rerun on a finished ``OUT`` picks it up the same way and adds only
prompts it does not hold yet. Which completion is rejected is drawn from a seed of the
prompt's own (``--seed`` and the prompt), so a resumed run pairs completions read from
files exactly as an uninterrupted one; sampled completions of a resumed prompt are drawn
again (from the seeds of its batch).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hcx.data.sources import BadRecord, iter_records, parse_object
from hcx.errors import HcxError
from hcx.stages.candidate_selection import binarize_scores
from hcx.stages.prompts import split_answer
from hcx.stages.rewards import Reward, Sample


class FeedbackError(HcxError):
    """Feedback data that cannot be made: names the file, record or flag at fault."""


@dataclass
class Candidate:
    """One completion of a prompt and where it came from (a model, or a file)."""

    text: str
    source: str


@dataclass
class FeedbackPrompt:
    """A prompt as its record gives it (text or chat messages), with the record (the
    ``math`` and ``code`` rewards read the answer or tests from it)."""

    prompt: str | list[dict]
    record: dict
    key: str  # identifies the prompt across runs (its canonical JSON)


@dataclass
class FeedbackStats:
    """What :func:`write_feedback` did. ``done_before``: prompts a previous run had
    finished (skipped); ``unscored``: completions the reward gave no verdict."""

    prompts: int = 0
    done_before: int = 0
    pairs: int = 0
    dropped_ties: int = 0
    dropped_too_few: int = 0
    completions: int = 0
    unscored: int = 0
    per_source: dict[str, int] = field(default_factory=dict)  # completions scored, by source

    def summary(self) -> str:
        return (f"{self.prompts:,} prompts ({self.done_before:,} done before) -> "
                f"{self.pairs:,} pairs written; dropped {self.dropped_ties:,} ties and "
                f"{self.dropped_too_few:,} with < 2 scored completions; "
                f"{self.completions:,} completions scored ({self.unscored:,} without a verdict)")


def prompt_key(prompt: str | list[dict]) -> str:
    """The canonical JSON of a prompt: the same prompt in two files is one prompt."""
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _prompt_of(obj: dict, where: str, field_name: str) -> tuple[str | list[dict], dict]:
    """The record's prompt and the record, the answer of chat SFT data split off into
    ``answer`` (:func:`hcx.stages.prompts.split_answer`)."""
    prompt, obj = split_answer(obj.get(field_name), obj)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt, obj
    if isinstance(prompt, str) and prompt.strip():
        return prompt, obj
    raise BadRecord(where, "missing_field", f"field {field_name!r} (--prompt-field) must be "
                    "a non-empty string or a list of chat messages")


def read_prompts(sources: Iterable[str], prompt_field: str = "prompt") -> list[FeedbackPrompt]:
    """Every distinct prompt of ``sources`` (JSONL, Parquet, directories, globs, hf://,
    data://), in order. A chat prompt ending with an assistant turn loses that turn (chat
    SFT data: it is the answer, kept in the record as ``answer`` unless it has one)."""
    out: dict[str, FeedbackPrompt] = {}
    for source in sources:
        for record in iter_records(source):
            prompt, obj = _prompt_of(parse_object(record), record.where, prompt_field)
            key = prompt_key(prompt)
            out.setdefault(key, FeedbackPrompt(prompt, obj, key))
    return list(out.values())


def _completion_text(value, where: str, field_name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and \
            isinstance(value[-1].get("content"), str):
        return value[-1]["content"]  # TRL's conversational form: the assistant message
    raise BadRecord(where, "bad_field", f"field {field_name!r} (--completion-field) must be "
                    "a string or a list of messages ending with the assistant's")


def read_completions(files: Iterable[str], prompt_field: str = "prompt",
                     completion_field: str = "completion", model_field: str = "model",
                     ) -> tuple[list[FeedbackPrompt], dict[str, list[Candidate]]]:
    """Completions written earlier: records with a prompt and a completion (and, where
    given, the ``model`` that wrote it; else the file names the source). Returns the
    prompts in order of first appearance and every prompt's candidates by key."""
    prompts: dict[str, FeedbackPrompt] = {}
    candidates: dict[str, list[Candidate]] = {}
    for file in files:
        for record in iter_records(file):
            prompt, obj = _prompt_of(parse_object(record), record.where, prompt_field)
            if completion_field not in obj:
                raise BadRecord(record.where, "missing_field",
                                f"no {completion_field!r} field (--completion-field)")
            text = _completion_text(obj[completion_field], record.where, completion_field)
            key = prompt_key(prompt)
            prompts.setdefault(key, FeedbackPrompt(prompt, obj, key))
            source = str(obj.get(model_field) or Path(file).name)
            candidates.setdefault(key, []).append(Candidate(text, source))
    return list(prompts.values()), candidates


# --- the output files --------------------------------------------------------------------


def dropped_path(out: Path) -> Path:
    """Where the prompts dropped are listed: ``pairs.jsonl`` -> ``pairs.dropped.jsonl``."""
    return out.with_name(out.stem + ".dropped" + (out.suffix or ".jsonl"))


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def read_done(path: Path) -> set[str]:
    """The prompt keys of the whole lines of a partial file; a torn last line (a crash
    mid-write) is cut off the file, so appending continues on a line boundary."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    done: set[str] = set()
    good = 0  # bytes up to the end of the last whole line
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            done.add(prompt_key(json.loads(line)["prompt"]))
        except (ValueError, KeyError, TypeError):
            break  # a corrupt line: it and whatever follows are redone
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def _claim(final: Path) -> Path:
    """The partial file to append to; a finished file of an earlier run becomes it."""
    partial = partial_path(final)
    if final.exists() and not partial.exists():
        os.replace(final, partial)
    return partial


def pair_record(item: FeedbackPrompt, chosen: Candidate, rejected: Candidate,
                scores: tuple[float, float], candidates: int) -> dict:
    """One TRL preference record (see the module docstring)."""
    def as_completion(text: str):
        return text if isinstance(item.prompt, str) else [{"role": "assistant",
                                                            "content": text}]

    return {"prompt": item.prompt, "chosen": as_completion(chosen.text),
            "rejected": as_completion(rejected.text), "score_chosen": scores[0],
            "score_rejected": scores[1], "model_chosen": chosen.source,
            "model_rejected": rejected.source, "candidates": candidates}


def pair_seed(seed: int, key: str) -> int:
    """The seed that draws a prompt's rejected completion: its own, so a prompt pairs the
    same whatever ran before it (resumed runs, other prompt files)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big")


#: Samples completions: (prompts of one batch) -> per prompt, its new candidates.
Sampler = Callable[[Sequence[FeedbackPrompt]], list[list[Candidate]]]


def write_feedback(prompts: Sequence[FeedbackPrompt], out: str | Path, reward: Reward, *,
                   given: dict[str, list[Candidate]] | None = None,
                   samplers: Sequence[Sampler] = (), seed: int = 0, batch_size: int = 8,
                   progress: bool = True) -> FeedbackStats:
    """Score every prompt's candidates (``given`` ones read from files, plus what each
    sampler draws) with ``reward`` and write one preference pair per prompt to ``out``
    (resumable; see the module docstring). Prompts go ``batch_size`` at a time through
    the samplers and the reward."""
    from tqdm import tqdm

    given = given or {}
    if not samplers and not given:
        raise FeedbackError("no completions: give --model (sampled) or --completions FILE")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs_file, dropped_file = _claim(out), _claim(dropped_path(out))
    done = read_done(pairs_file) | read_done(dropped_file)
    stats = FeedbackStats(prompts=len(prompts))
    todo = [p for p in prompts if p.key not in done]
    stats.done_before = len(prompts) - len(todo)
    with open(pairs_file, "a", encoding="utf-8") as pairs_out, \
            open(dropped_file, "a", encoding="utf-8") as dropped_out, \
            tqdm(total=len(prompts), initial=stats.done_before, desc="feedback", unit=" prompts",
                 disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            candidates = [list(given.get(p.key, [])) for p in batch]
            for sampler in samplers:
                for mine, new in zip(candidates, sampler(batch)):
                    mine += new
            samples = [Sample(p.prompt, c.text, p.record)
                       for p, cs in zip(batch, candidates) for c in cs]
            values = reward(samples) if samples else []
            stats.completions += len(values)
            stats.unscored += sum(v is None for v in values)
            at = 0
            for item, cs in zip(batch, candidates):
                scores = values[at:at + len(cs)]
                at += len(cs)
                for c, v in zip(cs, scores):
                    if v is not None:
                        stats.per_source[c.source] = stats.per_source.get(c.source, 0) + 1
                chosen = binarize_scores([scores], seed=pair_seed(seed, item.key))
                if chosen.pairs:
                    _, i, j = chosen.pairs[0]
                    line = pair_record(item, cs[i], cs[j], (scores[i], scores[j]), len(cs))
                    target = pairs_out
                    stats.pairs += 1
                else:
                    why = "tie" if chosen.dropped_ties else "too_few_scored"
                    stats.dropped_ties += chosen.dropped_ties
                    stats.dropped_too_few += chosen.dropped_too_few
                    line = {"prompt": item.prompt, "dropped": why, "scores": scores,
                            "models": [c.source for c in cs]}
                    target = dropped_out
                target.write(json.dumps(line, ensure_ascii=False) + "\n")
                target.flush()  # a crash loses at most the prompt being written
                bar.update(1)
    os.replace(pairs_file, out)
    os.replace(dropped_file, dropped_path(out))
    return stats


def check_sampling(samples: int, temperature: float) -> None:
    """FeedbackError for sampling flags that cannot give distinct completions."""
    if samples < 1:
        raise FeedbackError(f"--samples must be at least 1, got {samples}")
    if temperature <= 0 and samples > 1:
        raise FeedbackError("--samples > 1 needs --temperature > 0 (greedy decoding gives "
                            "one answer many times)")


def model_sampler(model, name: str, *, samples: int, max_new_tokens: int, temperature: float,
                  top_p: float, seed: int) -> Sampler:
    """A :data:`Sampler` drawing ``samples`` completions of every prompt from ``model``
    (a :class:`hcx.evaluation.models.LanguageModel`: an hcx checkpoint, a Hugging Face
    directory or an endpoint), as chat turns; each batch from a seed of its own (its
    first prompt's and ``seed``)."""
    from hcx.evaluation.models import GenerationRequest

    check_sampling(samples, temperature)

    def sample(batch: Sequence[FeedbackPrompt]) -> list[list[Candidate]]:
        batch_seed = pair_seed(seed, f"{name}/{batch[0].key}") % (2 ** 31)
        requests = [GenerationRequest(p.prompt, max_new_tokens=max_new_tokens, chat=True,
                                      temperature=temperature, top_p=top_p, seed=batch_seed)
                    for p in batch for _ in range(samples)]
        texts = model.generate(requests, desc=f"sample {name}")
        return [[Candidate(t, name) for t in texts[k * samples:(k + 1) * samples]]
                for k in range(len(batch))]

    return sample


# --- the reward, and best-of-N by reward -------------------------------------------------


def open_reward(spec: str, *, policy=None, log=print, key: str = "--reward", **options):
    """``(reward, opened)`` for a reward spec (:func:`hcx.stages.rewards.parse_spec`), with
    the defaults of ``align.online`` (judge prompt ``single-v1``, ``answer`` and ``test``
    fields) unless ``options`` (its keys, e.g. ``judge_prompts``) say otherwise.
    ``judge:self`` judges with ``policy`` (an open
    :class:`hcx.evaluation.models.HcxModel`); ``judge:CHECKPOINT`` opens that hcx
    checkpoint here and judges with it the same way. ``opened``: models opened here, for
    the caller to close."""
    from hcx.config import OnlineConfig
    from hcx.stages.rewards import load_reward, parse_spec

    parsed = parse_spec(spec, key)
    cfg = OnlineConfig(reward=spec, **{k: v for k, v in options.items() if v is not None})
    opened = []
    if parsed.kind != "judge" or parsed.arg.startswith(("http://", "https://")):
        return load_reward(spec, cfg, log=log, key=key), opened
    judge = policy
    if parsed.arg != "self":
        from hcx.paths import resolve

        path = Path(resolve(parsed.arg))
        if (path / "config.json").is_file():  # a Hugging Face directory: the loader opens it
            return load_reward(spec, cfg, log=log, key=key), opened
        if not path.exists():
            raise FeedbackError(f"{key}={spec}: no such checkpoint, model directory or endpoint")
        from hcx.evaluation.models import HcxModel

        judge = HcxModel(str(path), log=log)
        opened.append(judge)
    elif policy is None:
        raise FeedbackError(f"{key}=judge:self needs one hcx checkpoint to judge with: give "
                            "exactly one --model that is an hcx checkpoint, or judge:CHECKPOINT")
    reward = load_reward("judge:self", cfg, recipe=judge.engine.recipe, engine=judge.engine,
                         tokenizer=judge.tokenizer, log=log, key=key)
    reward.name = spec
    return reward, opened


def best_index(scores: Sequence[float | None]) -> int | None:
    """The highest-scoring candidate: the lowest index among equal best scores (so a run
    is reproducible and a tie keeps the first sample); None when none is scored."""
    best = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):
            best = i
    return best
