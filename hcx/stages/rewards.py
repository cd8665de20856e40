"""Rewards of sampled completions: one interface for on-policy training (GRPO, RLOO) now
and for AI-feedback data and best-of-N later.

A :class:`Reward` takes :class:`Sample` s (the prompt as the data gives it, text or chat
messages; the completion's text; the prompt's data record) and returns one value per
sample: a float, or None when it has no verdict (a judge whose rating cannot be read). A
caller counts the None values and reports them; :mod:`hcx.stages.grpo` gives such a
sample its group's mean reward, so its advantage is 0 and it teaches nothing.

Specs are recipe strings (``align.online.reward``; f-DPG's ``align.fdpg.scorer`` takes
the first two forms), parsed by :func:`parse_spec` with errors that name the recipe key:

``module:function``
    any importable callable ``(prompts, completions) -> list[float]`` on strings
    (:mod:`hcx.scorers` has ready-made ones); chat prompts reach it as their messages'
    contents joined by newlines. It may return None for a sample.
``reward-model:PATH``
    a Bradley-Terry reward model trained with ``align.method: reward``
    (:func:`hcx.stages.reward.load_reward_model`), run at the trainer's TP size.
``math``
    verifiable arithmetic: 1 when the completion's answer equals the record's
    (``align.online.answer_field``; GSM8K's ``... #### 42`` or a bare number), else 0. The
    completion's answer is its first ``#### N`` or else its last number (lm-eval's GSM8K
    strict and flexible filters, :func:`hcx.evaluation.metrics.gsm8k_extract`); numbers
    compare as numbers (``72.0`` = ``72``).
``code``
    the completion (the first fenced code block when it has one) followed by the
    record's tests (``align.online.tests_field``: Python source, or a list of assert
    lines; a record with ``entry_point`` also gets ``check(entry_point)``, HumanEval's
    form) runs in :mod:`hcx.evaluation.sandbox`: 1 when it exits cleanly, else 0.
``judge:MODEL``
    the single-answer judge of :mod:`hcx.evaluation.judges` (MT-Bench's ``single-v1``
    prompt by default) rates the completion 1-10; the reward is ``(rating - 1) / 9`` in
    [0, 1], None when the rating cannot be read. MODEL is ``self`` (the policy being
    trained judges its own samples with its current weights, greedily, through the same
    generation engine: self-rewarding, Yuan et al. 2024), an hcx checkpoint (built at the
    trainer's TP size in the training processes), a Hugging Face directory, or an
    ``http(s)://`` OpenAI-compatible endpoint (:func:`hcx.evaluation.models.open_model`).

Under tensor parallelism every TP rank must hold the same rewards: a reward whose model
runs across the TP group (``collective``: reward models, judges on hcx weights) is called
on every TP rank, which compute identical values; any other is called on TP rank 0 only
and its values are broadcast (a sandbox timeout can never make ranks disagree).
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from hcx.stages.align import AlignError


class RewardError(AlignError):
    """A reward spec that cannot be used, or a reward that failed; names the recipe key."""


@dataclass
class Sample:
    """One completion to reward."""

    prompt: str | list[dict]  # as the data gives it: text, or chat messages
    completion: str
    record: dict = field(default_factory=dict)  # the prompt's data record

    @property
    def prompt_text(self) -> str:
        """The prompt as one string (chat messages: their contents, one per line)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(str(m.get("content", "")) for m in self.prompt)

    @property
    def question(self) -> str:
        """What a judge reads as the question: the last user turn (or the whole text)."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [str(m.get("content", "")) for m in self.prompt if m.get("role") == "user"]
        return users[-1] if users else self.prompt_text


class Reward(Protocol):
    """Rewards of samples: one float per sample, or None for no verdict."""

    name: str
    collective: bool  # every TP rank calls it (a model runs across the TP group)

    def __call__(self, samples: list[Sample]) -> list[float | None]: ...


# --- specs -------------------------------------------------------------------------------

KINDS = ("math", "code", "judge:MODEL", "reward-model:PATH", "module:function")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class RewardSpec:
    kind: str  # "math" | "code" | "judge" | "reward-model" | "function"
    arg: str = ""  # judge: the model; reward-model: the path; function: "module:name"


def parse_spec(spec: str, key: str = "align.online.reward") -> RewardSpec:
    """The reward a recipe string names (see the module docstring); RewardError naming
    ``key`` for anything else."""
    def bad(why: str) -> RewardError:
        return RewardError(f"{key}={spec!r}: {why}; expected one of {', '.join(KINDS)}")

    if not isinstance(spec, str) or not spec.strip():
        raise bad("empty")
    spec = spec.strip()
    if spec in ("math", "code"):
        return RewardSpec(spec)
    head, sep, rest = spec.partition(":")
    if not sep:
        raise bad("not a reward")
    if head == "judge":
        if not rest:
            raise bad("judge: needs a model (self, a checkpoint, an HF dir or an http(s) URL)")
        return RewardSpec("judge", rest)
    if head == "reward-model":
        if not rest:
            raise bad("reward-model: needs the reward model checkpoint's path")
        return RewardSpec("reward-model", rest)
    if not _MODULE.match(head) or not rest.isidentifier():
        raise bad(f"{head!r}:{rest!r} is not 'module:function'")
    return RewardSpec("function", spec)


def import_function(spec: str, key: str) -> Callable:
    """The callable ``module:function`` names; RewardError naming ``key`` otherwise."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise RewardError(f"{key}={spec!r}: expected 'module:function' or "
                          "'reward-model:PATH'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"{key}={spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise RewardError(f"{key}={spec!r} is not callable")
    return fn


def load_scorer(spec: str, recipe, log, key: str) -> Callable:
    """A ``(prompts, completions) -> values`` scorer for ``module:function`` or
    ``reward-model:PATH`` (f-DPG's scorers; the same loaders as :func:`load_reward`)."""
    if spec.startswith("reward-model:"):
        return open_reward_model(spec[len("reward-model:"):], recipe, log, key)
    return import_function(spec, key)


def open_reward_model(path: str, recipe, log, key: str):
    """A trained reward model (:func:`hcx.stages.reward.load_reward_model`), frozen, at the
    caller's TP size; its ``__call__`` is ``(prompts, completions) -> floats``."""
    from hcx.paths import resolve
    from hcx.stages import reward

    if not path:
        raise RewardError(f"{key}: reward-model: needs a checkpoint path")
    return reward.load_reward_model(resolve(path), recipe, log)


# --- the rewards -------------------------------------------------------------------------


def _values(out: Any, n: int, name: str, key: str) -> list[float | None]:
    values = list(out)
    if len(values) != n:
        raise RewardError(f"{key}: the reward {name} returned {len(values)} values for "
                          f"{n} samples")
    result: list[float | None] = []
    for v in values:
        if v is None:
            result.append(None)
            continue
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(f"{key}: the reward {name} returned {v}; return None for "
                              "a sample without a verdict")
        result.append(v)
    return result


@dataclass
class FunctionReward:
    """``module:function`` (or any callable) on prompt and completion strings."""

    fn: Callable
    name: str
    key: str = "align.online.reward"
    collective: bool = False

    def __call__(self, samples: list[Sample]) -> list[float | None]:
        out = self.fn([s.prompt_text for s in samples], [s.completion for s in samples])
        return _values(out, len(samples), self.name, self.key)


@dataclass
class RewardModelReward:
    """A trained reward model scoring (prompt, completion) as a finished assistant turn."""

    model: Any  # hcx.stages.reward.RewardModel
    name: str
    key: str = "align.online.reward"
    collective: bool = True

    def __call__(self, samples: list[Sample]) -> list[float | None]:
        out = self.model.score([s.prompt for s in samples], [s.completion for s in samples])
        return _values(out, len(samples), self.name, self.key)


def reference_answer(record: dict, answer_field: str) -> str | None:
    """The reference answer of a record: its ``answer_field`` (for chat data such as
    ``en_gsm8k`` whose messages end with the assistant's answer,
    :func:`hcx.stages.grpo.load_prompts` puts that answer there)."""
    value = record.get(answer_field)
    if value is None:
        return None
    return str(value)


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def math_correct(completion: str, answer: str) -> float:
    """1.0 when the completion's answer (its first ``#### N``, else its last number)
    equals the reference answer (GSM8K's ``#### N`` form or a bare number), else 0.0."""
    from hcx.evaluation.metrics import gsm8k_extract, gsm8k_gold

    pred = gsm8k_extract(completion, "strict")
    if pred is None:
        pred = gsm8k_extract(completion, "flexible")
    if pred is None:
        return 0.0
    gold = gsm8k_gold(answer.strip())
    if pred == gold:
        return 1.0
    a, b = _as_number(pred), _as_number(gold)
    return float(a is not None and b is not None and a == b)


@dataclass
class MathReward:
    """``math``: the completion's final answer against the record's."""

    answer_field: str = "answer"
    name: str = "math"
    key: str = "align.online.reward"
    collective: bool = False

    def __call__(self, samples: list[Sample]) -> list[float | None]:
        out = []
        for s in samples:
            answer = reference_answer(s.record, self.answer_field)
            if answer is None:
                raise RewardError(f"{self.key}=math: a prompt's record has no "
                                  f"{self.answer_field!r} field (align.online.answer_field) and "
                                  "its messages do not end with an assistant answer")
            out.append(math_correct(s.completion, answer))
        return out


_FENCE = re.compile(r"```[ \t]*(?:[A-Za-z0-9_+-]+)?[ \t]*\n(.*?)(?:```|$)", re.S)


def code_of(completion: str) -> str:
    """The program in a completion: its first fenced block, else the whole text."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def code_program(completion: str, record: dict, tests_field: str) -> str | None:
    """The program the ``code`` reward runs: the completion's code, the record's tests
    and, for a HumanEval record (``entry_point``), ``check(entry_point)``; None when the
    record has no tests."""
    tests = record.get(tests_field)
    if tests is None:
        return None
    if isinstance(tests, list):
        tests = "\n".join(str(t) for t in tests)
    program = code_of(completion) + "\n\n" + str(tests) + "\n"
    if record.get("entry_point"):
        program += f"\ncheck({record['entry_point']})\n"
    return program


@dataclass
class CodeReward:
    """``code``: the record's tests against the completion, in the sandbox."""

    tests_field: str = "test"
    timeout_s: float = 10.0
    workers: int = 2
    name: str = "code"
    key: str = "align.online.reward"
    collective: bool = False

    def __call__(self, samples: list[Sample]) -> list[float | None]:
        from hcx.evaluation import sandbox

        programs = []
        for s in samples:
            program = code_program(s.completion, s.record, self.tests_field)
            if program is None:
                raise RewardError(f"{self.key}=code: a prompt's record has no "
                                  f"{self.tests_field!r} field (align.online.tests_field)")
            programs.append(program)
        results = sandbox.run_many(programs, workers=self.workers, timeout_s=self.timeout_s)
        return [float(r.passed) for r in results]


@dataclass
class JudgeReward:
    """``judge:MODEL``: a single-answer rating 1-10 scaled to [0, 1]; None if unreadable."""

    judge: Any  # hcx.evaluation.judges.Judge
    name: str
    collective: bool

    def __call__(self, samples: list[Sample]) -> list[float | None]:
        from hcx.evaluation.judges import SingleCase

        verdicts = self.judge.single_many([SingleCase([s.question], [s.completion])
                                           for s in samples], desc="judge")
        return [None if v.rating is None else (v.rating - 1.0) / 9.0 for v in verdicts]


# --- a language model on weights already in this process (judge:self, judge:CHECKPOINT) --


def engine_language_model(module, recipe, tokenizer, name: str):
    """A :class:`~hcx.evaluation.models.LanguageModel` generating with ``module`` (the
    policy's DDP model, or a frozen checkpoint) through :class:`hcx.engine.generate.Generator`:
    greedy, collective over the TP group like the trainer's own sampling."""
    from types import SimpleNamespace

    from hcx.engine.generate import Generator, SamplingParams, chat_stop_ids, encode_prompt
    from hcx.evaluation.models import Budget, LanguageModel

    class EngineLanguageModel(LanguageModel):
        kind = "hcx"
        rank0 = False  # no progress bars inside a training run

        def __init__(self):
            self.name = self.path = name
            self.budget = Budget()
            self.max_length = recipe.model.max_position_embeddings
            self.tokenizer = tokenizer
            self.generator = Generator(SimpleNamespace(ddp=module, recipe=recipe), tokenizer)
            self.stops = chat_stop_ids(tokenizer)

        def encode(self, text: str) -> list[int]:
            return tokenizer.encode(text)

        def decode(self, ids: list[int]) -> str:
            return tokenizer.decode(ids)

        @property
        def eot_id(self) -> int:
            return tokenizer.eod

        def chat_prompt(self, prompt):
            return encode_prompt(prompt, tokenizer, chat=True)

        def _score(self, requests):
            raise RewardError("a judge only generates")

        def _generate(self, prompts, max_new_tokens, stops, sampling=None):
            extra = {} if sampling is None else {"temperature": sampling.temperature,
                                                 "top_p": sampling.top_p, "seed": sampling.seed}
            params = SamplingParams(max_new_tokens=max_new_tokens, stop_strings=stops,
                                    stop_ids=self.stops, **extra)
            return [g.text for g in self.generator.generate(prompts, params)]

    return EngineLanguageModel()


def open_judge_model(model: str, recipe, engine, tokenizer, log, key: str):
    """``(LanguageModel, collective)`` for ``judge:MODEL``."""
    from hcx.evaluation.endpoint_client import is_endpoint

    if model == "self":
        if engine is None:
            raise RewardError(f"{key}=judge:self: the policy judges itself only in training")
        return engine_language_model(engine.ddp, recipe, tokenizer, "self"), True
    if is_endpoint(model):
        from hcx.evaluation.models import open_model

        return open_model(model, log=log), False
    from hcx.paths import resolve

    path = Path(resolve(model))
    if not path.exists():
        raise RewardError(f"{key}=judge:{model}: no such checkpoint, model directory or "
                          "endpoint")
    if (path / "config.json").is_file():  # a Hugging Face directory: one per TP group
        from hcx.evaluation.models import open_model

        return open_model(str(path), log=log), False
    return _checkpoint_judge(path, recipe, log, key), True


def _checkpoint_judge(path: Path, recipe, log, key: str):
    """An hcx checkpoint, built at the trainer's TP size in this process and frozen."""
    from megatron.core import parallel_state as ps

    from hcx.engine import checkpoint as ckpt
    from hcx.engine.inference import checkpoint_recipe, inference_recipe
    from hcx.engine.model import build_gpt, compute_dtype, model_vocab_size, padded_vocab_size
    from hcx.engine.scoring import freeze
    from hcx.tokenizer.loading import load_tokenizer

    step = ckpt.checkpoint_path(path)
    tp = ps.get_tensor_model_parallel_world_size()
    saved = inference_recipe(checkpoint_recipe(step), tp)
    tokenizer = load_tokenizer(saved.data.tokenizer)
    vocab = padded_vocab_size(model_vocab_size(saved, tokenizer.vocab_size), tp)
    dtype = compute_dtype(recipe.train.precision)
    model = build_gpt(saved.model, saved.parallel, vocab, saved.data.seq_length, dtype,
                      pre_process=True, post_process=True)
    module = freeze(model, step, dtype, log)
    log(f"{key}: judging with {step} (tp={tp})")
    return engine_language_model(module, saved, tokenizer, str(step))


# --- loading -----------------------------------------------------------------------------


def load_reward(spec: str, cfg, *, recipe=None, engine=None, tokenizer=None, log=print,
                key: str = "align.online.reward") -> Reward:
    """The :class:`Reward` a spec names. ``cfg``: the ``align.online`` section (fields,
    judge prompts, sandbox limits); ``recipe``/``engine``/``tokenizer``: the trainer's,
    for rewards that run a model in the training processes."""
    parsed = parse_spec(spec, key)
    if parsed.kind == "math":
        return MathReward(cfg.answer_field, key=key)
    if parsed.kind == "code":
        return CodeReward(cfg.tests_field, cfg.code_timeout_s, cfg.code_workers, key=key)
    if parsed.kind == "function":
        return FunctionReward(import_function(parsed.arg, key), parsed.arg, key)
    if parsed.kind == "reward-model":
        return RewardModelReward(open_reward_model(parsed.arg, recipe, log, key), spec, key)
    from hcx.evaluation.judges import Judge, JudgeError, load_prompts
    from hcx.paths import resolve

    names = {("single", False, 1): cfg.judge_prompt}
    try:  # the prompts are checked before any model is opened
        prompts = load_prompts(resolve(cfg.judge_prompts))
        Judge(None, prompts, names=names).check_single(1, reference=False)  # type: ignore[arg-type]
    except (JudgeError, FileNotFoundError) as e:
        raise RewardError(f"align.online.judge_prompts: {e}") from None
    model, collective = open_judge_model(parsed.arg, recipe, engine, tokenizer, log, key)
    return JudgeReward(Judge(model, prompts, cfg.judge_max_new_tokens, names), spec, collective)


def same_on_tp(compute: Callable[[], torch.Tensor], collective: bool,
               shape: tuple[int, ...]) -> torch.Tensor:
    """``compute()`` (a float64 tensor of ``shape``), the same on every TP rank: every
    rank computes it when ``collective`` (a model run across the TP group: each rank gets
    identical values), else TP rank 0 does and broadcasts it (a sandbox timeout or an
    endpoint's reply can never make ranks disagree)."""
    from megatron.core import parallel_state as ps

    from hcx.engine.parallel import device

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    values = torch.zeros(shape, dtype=torch.float64)
    if collective or tp == 1 or ps.get_tensor_model_parallel_rank() == 0:
        values = compute().to(torch.float64)
    if tp > 1 and not collective:
        import torch.distributed as dist

        on_device = values.to(device())
        dist.broadcast(on_device, src=ps.get_tensor_model_parallel_src_rank(),
                       group=ps.get_tensor_model_parallel_group())
        values = on_device.cpu()
    return values


def rewards_on_tp(reward: Reward, samples: list[Sample]) -> tuple[list[float], list[bool]]:
    """``(values, parsed)`` of every sample, the same on every TP rank (see the module
    docstring, :func:`same_on_tp`): a None value becomes 0.0 with ``parsed`` False."""
    def compute() -> torch.Tensor:
        return torch.tensor([[0.0 if v is None else v, float(v is not None)]
                             for v in reward(samples)], dtype=torch.float64).view(-1, 2)

    values = same_on_tp(compute, reward.collective, (len(samples), 2))
    return values[:, 0].tolist(), [bool(p) for p in values[:, 1].tolist()]
