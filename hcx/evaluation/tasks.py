"""Benchmark tasks and suites as data.

A task is one YAML file in ``eval/tasks/`` (see docs/eval.md; shipped with the package, found
by :mod:`hcx.resources`): where its examples come
from (JSON Lines files under the data root, or a Hugging Face Hub dataset), Jinja
templates that turn an example ("doc") into a prompt, choices and a target, the few-shot
setup, the task kind (how it is scored) and its metrics. Label formats differ between
benchmarks ("True"/"TRUE", 1- or 0-based, answer text vs index); they are normalised
by the task's expressions here, never by editing the data files.

A suite (``eval/suites/*.yaml``) names tasks and other suites.
"""

from __future__ import annotations

import ast
import difflib
import json
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, model_validator

from hcx.config import RecipeError, Strict, load_config
from hcx.errors import HcxError
from hcx.paths import data_root
from hcx.resources import shipped_file, suites_dir, tasks_dir

Kind = Literal["multiple_choice", "generation", "translation", "bias", "code", "ifeval", "judged"]

KIND_METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm", "mc2"),
    "generation": ("exact_match", "exact_match_flexible", "f1", "maj@k"),
    "translation": ("bleu", "chrf", "ter"),
    "bias": ("acc_ambig", "acc_disambig", "diff_bias_ambig", "diff_bias_disambig",
             "bbq_bias_ambig", "bbq_bias_disambig"),
    "code": ("pass@k",),
    "ifeval": ("prompt_level_strict_acc", "inst_level_strict_acc",
               "prompt_level_loose_acc", "inst_level_loose_acc"),
    "judged": ("score", "score_turn1", "score_turn2", "unparsed", "penalised"),
}


#: What a multiple_choice task reports in ``mode: generate`` (the log-likelihood metrics
#: acc_norm and mc2 need scores of every choice, which generation does not give).
GENERATE_MC_METRICS = ("acc", "unparseable", "acc_unshuffled")
#: The seed of ``generate.shuffle: true`` when no ``shuffle_seed`` is given.
DEFAULT_SHUFFLE_SEED = 1234
#: Metric names with a sample count: ``maj@8``, ``pass@10``.
_AT_K = re.compile(r"^(maj|pass)@([1-9][0-9]*)$")


def metric_k(name: str) -> tuple[str, int] | None:
    """``("pass", 10)`` for ``pass@10``; None for a metric without a k."""
    m = _AT_K.match(name)
    return (m.group(1), int(m.group(2))) if m else None


class TaskError(HcxError, ValueError):
    pass


# --- the schema ----------------------------------------------------------------------


class DatasetSpec(Strict):
    files: list[str] | str | None = Field(
        default=None, description="JSON Lines files, relative to the data root (or absolute)")
    hub: str | None = Field(default=None, description="Hugging Face Hub dataset id (read from "
                                                      "<data root>/hub/<id> when that folder exists)")
    config: str | list[str] | None = Field(
        default=None, description="hub: the dataset's config; a list joins several in order, "
                                  "each doc's config in the variable __config__")
    split: str = "test"
    filter: str | None = Field(default=None, description="Jinja expression: keep docs where true")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.files is None) == (self.hub is None):
            raise ValueError("give exactly one of dataset.files and dataset.hub")
        if self.config is not None and self.hub is None:
            raise ValueError("dataset.config is for dataset.hub")
        if isinstance(self.config, list) and not self.config:
            raise ValueError("dataset.config is an empty list")
        return self


class FewShotSpec(Strict):
    n: int = Field(default=0, ge=0)
    dataset: DatasetSpec | None = Field(
        default=None, description="where examples come from (default: the task's own docs, "
                                  "never the doc being asked)")
    same: str | None = Field(default=None, description="field that must match the doc's "
                                                       "(MMLU: subject)")
    seed: int = 1234
    separator: str = "\n\n"
    target: str | None = Field(default=None, description="expression for the shot's answer "
                                                          "text (default: the target choice)")


class GenerationSpec(Strict):
    max_new_tokens: int = Field(default=256, gt=0)
    stop: list[str] = Field(default_factory=list)
    samples: int = Field(default=1, ge=1, description="generations per example (maj@k, pass@k); "
                                                      "1 and temperature 0: greedy")
    temperature: float = Field(default=0.0, ge=0, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = Field(default=1234, description="seed of sampled generation")

    @model_validator(mode="after")
    def _sampling(self):
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"samples: {self.samples} needs temperature > 0 (greedy "
                             "generations of one prompt are all the same)")
        return self


class ChoiceGenerationSpec(Strict):
    """How a multiple_choice task is asked in ``mode: generate``: the options are listed
    under the question with labels, the model writes its answer, and the answer is read
    from the text (hcx.evaluation.choice)."""

    question: str | None = Field(
        default=None, description="Jinja template of the question without its options "
                                  "(default: the task's prompt, a final answer cue removed)")
    options: str | None = Field(
        default=None, description="expression: the option texts (default: the choices, or "
                                  "for `contexts` tasks each context with the continuation)")
    labels: Literal["letters", "circled", "numbers"] | None = Field(
        default=None, description="A./B./C./D., ①②③④ or 1./2./3./4. (default: circled for "
                                  "Korean tasks, letters otherwise)")
    cue: str | None = Field(default=None, description="after the options (default: 정답: / Answer:)")
    shuffle: bool | None = Field(
        default=None, description="shuffle each question's options (seeded per question); "
                                  "the unshuffled accuracy is reported as acc_unshuffled. "
                                  f"Seed: shuffle_seed, default {DEFAULT_SHUFFLE_SEED}")
    shuffle_seed: int | None = Field(default=None, description="seed of the shuffling (setting "
                                                               "it turns shuffling on)")
    cot: str | None = Field(default=None, description="chain of thought: text put after the "
                                                      "cue (\"Let's think step by step.\")")
    answer_pattern: str | None = Field(
        default=None, description="regex finding the final answer in a chain of thought; its "
                                  "first group (or the match) is read, the last match counts")
    max_new_tokens: int | None = Field(default=None, gt=0, description="default 16, with cot 512")
    stop: list[str] | None = Field(default=None, description="default [\"\\n\"], with cot none")

    @model_validator(mode="after")
    def _pattern(self):
        if self.shuffle is False and self.shuffle_seed is not None:
            raise ValueError(f"shuffle: false contradicts shuffle_seed: {self.shuffle_seed} "
                             "(which shuffles); drop one")
        # (assignments validate again: each is made only when it changes something)
        if self.shuffle and self.shuffle_seed is None:
            self.shuffle_seed = DEFAULT_SHUFFLE_SEED
        elif self.shuffle_seed is not None and self.shuffle is not True:
            self.shuffle = True
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as e:
                raise ValueError(f"answer_pattern {self.answer_pattern!r} is not a regex: {e}")
        return self


class BiasSpec(Strict):
    condition: str = Field(description="expression: 'ambig' or 'disambig'")
    biased: str = Field(description="expression: index of the stereotype-consistent answer")
    unknown: str = Field(description="expression: index of the 'cannot be determined' answer")


class CodeSpec(Strict):
    program: str = Field(description="template of the program run; `completion` is the "
                                     "model's text")
    timeout_s: float = Field(default=10.0, gt=0)
    memory_mb: int = Field(default=1024, gt=0)


class IFEvalSpec(Strict):
    instructions: str = "instruction_id_list"
    kwargs: str = "kwargs"


class LanguagePenaltySpec(Strict):
    """KoMT-Bench's deduction for answers in another language than the questions': the
    judge's rating r of such an answer becomes sqrt(r) (1..10 -> 1..3.16)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    language: Literal["ko"] = Field(description="the language answers must be in (ko: told "
                                                "by the share of Hangul, hcx.evaluation.judged)")
    rule: Literal["sqrt"] = "sqrt"
    exempt: list[int] = Field(default_factory=list, alias="except",
                              description="question ids never penalised (KoMT-Bench: 138, 140, "
                                          "whose answers may rightly be in English)")


class JudgeSpec(Strict):
    """How a judged task grades its answers with an LLM judge (``hcx eval --judge``):
    FastChat's single-answer grading, each turn rated 1-10 (hcx.evaluation.judges)."""

    prompts: str = Field(description="judge prompts (FastChat judge_prompts.jsonl, or YAML), "
                                     "relative to the data root (or absolute)")
    references: str | None = Field(default=None, description="reference answers (FastChat "
                                   "reference_answer/*.jsonl: question_id, choices[0].turns)")
    reference_categories: list[str] = Field(
        default_factory=lambda: ["math", "reasoning", "coding"],
        description="categories graded with a reference answer (FastChat's NEED_REF_CATS)")
    id: str = Field(default="question_id", description="expression: the question's id "
                                                       "(joins the references)")
    turns: str = Field(default="turns", description="expression: the user turns (1 or 2); "
                                                    "each is rendered with `prompt` as `turn`")
    group: str = Field(default="category", description="expression: the question's category")
    max_new_tokens: int = Field(default=2048, gt=0, description="the judge's (FastChat's 2048)")
    prompt_names: dict[str, str] = Field(
        default_factory=dict, description="override the prompt a grading uses: keys single, "
        "single_reference, single_turn2, single_reference_turn2; values prompt names")
    category_temperatures: dict[str, float] = Field(
        default_factory=dict, description="sample the model's answers of these categories at "
        "these temperatures (FastChat: writing/roleplay 0.7, stem/humanities 0.1); default: "
        "every answer greedy")
    language_penalty: LanguagePenaltySpec | None = None

    @model_validator(mode="after")
    def _names(self):
        bad = sorted(set(self.prompt_names) - set(PROMPT_NAME_KEYS))
        if bad:
            raise ValueError(f"judge.prompt_names: unknown keys {bad}; use {list(PROMPT_NAME_KEYS)}")
        return self


#: ``judge.prompt_names`` keys: (type, with reference, turn) of the grading they name.
PROMPT_NAME_KEYS = {"single": ("single", False, 1), "single_reference": ("single", True, 1),
                    "single_turn2": ("single", False, 2),
                    "single_reference_turn2": ("single", True, 2)}


class TaskSpec(Strict):
    name: str
    description: str = ""
    language: Literal["ko", "en", "ko-en", "en-ko"]
    category: str
    kind: Kind
    source: str = Field(default="", description="where the benchmark comes from (for docs)")
    dataset: DatasetSpec
    preamble: str = Field(default="", description="Jinja template put once before the "
                                                 "few-shot examples (MMLU's header)")
    prompt: str = Field(description="Jinja template of the prompt (the context)")
    choices: str | None = Field(default=None, description="expression: list of choice texts")
    contexts: str | None = Field(
        default=None, description="expression: one context per choice, scored with the "
                                  "same continuation (`prompt`) (WinoGrande's partial scoring)")
    target: str | None = Field(default=None, description="expression: the gold choice index "
                                                         "or the reference text(s)")
    labels: str | None = Field(default=None, description="expression: 0/1 per choice (mc2)")
    target_delimiter: str = " "
    mode: Literal["loglikelihood", "generate"] = Field(
        default="loglikelihood", description="multiple_choice: score the choices, or list them "
                                             "and read the generated answer")
    generate: ChoiceGenerationSpec = Field(default_factory=ChoiceGenerationSpec)
    breakdown: dict[str, str] = Field(
        default_factory=dict, description="name: expression giving each example's group; "
                                          "the metrics per group are reported too (KMMLU)")
    fewshot: FewShotSpec = Field(default_factory=FewShotSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    answer: Literal["none", "gsm8k", "squad", "korquad"] = Field(
        default="none", description="answer extraction and normalisation for generation tasks")
    metrics: list[str]
    primary: str | None = None
    bias: BiasSpec | None = None
    code: CodeSpec | None = None
    ifeval: IFEvalSpec | None = None
    judge: JudgeSpec | None = None
    process_docs: str | None = Field(
        default=None, description="'module:function' or 'file.py:function' taking and "
                                  "returning the list of docs (hcx.evaluation.functions)")
    metric_functions: dict[str, str] = Field(
        default_factory=dict, description="generation tasks: metric name -> 'module:function' "
                                          "of (predictions, references) -> float over the task")

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode == "generate" and self.kind != "multiple_choice":
            raise ValueError(f"mode: generate is for multiple_choice tasks; this one is {self.kind!r}")
        known = GENERATE_MC_METRICS if self.mode == "generate" else KIND_METRICS[self.kind]

        def computed(m: str) -> bool:
            at = metric_k(m)
            return m in known or (at is not None and f"{at[0]}@k" in known) \
                or m in self.metric_functions

        if self.metric_functions and self.kind != "generation":
            raise ValueError(f"metric_functions are for generation tasks; this one is "
                             f"{self.kind!r}")

        bad = [m for m in self.metrics if not computed(m)]
        if bad:
            mode = " in mode generate" if self.mode == "generate" else ""
            raise ValueError(f"metrics {bad} are not computed by kind {self.kind!r}{mode}; "
                             f"it computes {list(known)}")
        for m in self.metrics:
            at = metric_k(m)
            if at and at[1] > self.generation.samples:
                raise ValueError(f"metric {m} needs generation.samples >= {at[1]} (it is "
                                 f"{self.generation.samples})")
        if self.mode == "generate":
            shuffled = self.generate.shuffle_seed is not None
            if "acc_unshuffled" in self.metrics and not shuffled:
                raise ValueError("metric acc_unshuffled needs generate.shuffle_seed")
            # unparseable answers are always reported, and with shuffling the plain order too
            wanted = ["unparseable"] + (["acc_unshuffled"] if shuffled else [])
            missing = [m for m in wanted if m not in self.metrics]
            if missing:
                self.metrics = [*self.metrics, *missing]
        if self.primary is None:
            self.primary = self.metrics[0]
        elif self.primary not in self.metrics:
            raise ValueError(f"primary {self.primary!r} is not one of metrics {self.metrics}")
        needs = {"multiple_choice": ("target",), "bias": ("choices", "target", "bias"),
                 "generation": ("target",), "translation": ("target",), "code": ("code",),
                 "ifeval": ("ifeval",), "judged": ("judge",)}[self.kind]
        missing = [k for k in needs if getattr(self, k) is None]
        if self.kind == "multiple_choice" and self.choices is None and self.contexts is None:
            missing.append("choices (or contexts)")
        if "mc2" in self.metrics and self.labels is None:
            missing.append("labels (mc2)")
        if missing:
            raise ValueError(f"kind {self.kind!r} needs {', '.join(missing)}")
        return self


# --- templates ---------------------------------------------------------------------


def _regex_replace(value: str, pattern: str, repl: str) -> str:
    return re.sub(pattern, repl, value)


def _index_where(items: list, wanted) -> int:
    """The first index whose item (or, for a list item, any of its elements) is in
    ``wanted``; -1 if none (BBQ: which answer belongs to the stereotyped group)."""
    for i, item in enumerate(items):
        values = item if isinstance(item, (list, tuple)) else [item]
        if any(v in wanted for v in values):
            return i
    return -1


def _environment():
    from hcx.errors import require

    jinja2 = require("jinja2", "eval", package="Jinja2", purpose="task prompt templates")

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["literal"] = lambda s: ast.literal_eval(s) if isinstance(s, str) else s
    env.filters["regex_replace"] = _regex_replace
    env.globals["LETTERS"] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    env.globals["index_where"] = _index_where
    return env


@dataclass
class Task:
    """A loaded task: its spec, where it came from, and compiled templates."""

    spec: TaskSpec
    file: Path
    _compiled: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest()[:16]

    def _fn(self, key: str, text: str, expression: bool):
        if key not in self._compiled:
            env = _environment()
            try:
                self._compiled[key] = (env.compile_expression(text, undefined_to_none=False)
                                       if expression else env.from_string(text))
            except Exception as e:  # jinja2.TemplateSyntaxError
                raise TaskError(f"{self.file}: {key}: {e}") from None
        return self._compiled[key]

    def _eval(self, key: str, text: str, doc: dict, expression: bool, **extra):
        fn = self._fn(key, text, expression)
        env = {**doc, "doc": doc, **extra}
        try:
            return fn(**env) if expression else fn.render(**env)
        except Exception as e:
            raise TaskError(f"task {self.name} ({self.file}): {key} failed on doc "
                            f"{_doc_id(doc)}: {type(e).__name__}: {e}") from None

    def prompt(self, doc: dict, **extra) -> str:
        return self._eval("prompt", self.spec.prompt, doc, False, **extra)

    def expr(self, key: str, doc: dict, **extra):
        """Evaluate the spec's expression ``key`` (choices, target, labels, ...)."""
        return self._eval(key, _dotted(self.spec, key), doc, True, **extra)

    def template(self, key: str, text: str, doc: dict, **extra) -> str:
        return self._eval(key, text, doc, False, **extra)


def _dotted(obj, key: str):
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _doc_id(doc: dict) -> str:
    where = doc.get("__where__", "?")
    return str(where)


# --- loading tasks and suites ------------------------------------------------------


def available_tasks() -> list[str]:
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def available_suites() -> list[str]:
    return sorted(p.stem for p in suites_dir().glob("*.yaml"))


def _unknown(name: str) -> TaskError:
    known = available_tasks() + available_suites()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return TaskError(f"unknown task or suite {name!r}{hint}; tasks live in {tasks_dir()}, "
                     f"suites in {suites_dir()}; `hcx eval --list` shows them")


def load_task(name_or_path: str) -> Task:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = tasks_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise _unknown(name_or_path)
    elif not path.is_file():
        shipped = shipped_file(path)  # eval/tasks/x.yaml named from outside a checkout
        if shipped is None or not shipped.is_file():
            raise TaskError(f"{path}: no such task file")
        path = shipped
    try:
        # a task file anywhere extends the shipped tasks and bases by name (base: mmlu)
        spec, _ = load_config(path, TaskSpec, what="task",
                              bases=(tasks_dir(), tasks_dir() / "_base"))
    except RecipeError as e:
        raise TaskError(str(e)) from None
    return Task(spec, path)


def suite_members(name: str, seen: tuple[str, ...] = ()) -> list[str]:
    """The task names of a suite, nested suites expanded, in order, without repeats."""
    path = suites_dir() / f"{name}.yaml"
    if name in seen:
        raise TaskError(f"suite {name!r} includes itself (via {' -> '.join(seen)})")
    data = yaml.safe_load(path.read_text()) or {}
    names: list[str] = []
    for entry in data.get("tasks", []):
        members = suite_members(entry, (*seen, name)) if (suites_dir() / f"{entry}.yaml").is_file() \
            else [entry]
        names += [m for m in members if m not in names]
    return names


def resolve_tasks(names: list[str]) -> list[Task]:
    """Tasks from names of tasks, suites and task files (comma lists allowed)."""
    flat = [n.strip() for item in names for n in item.split(",") if n.strip()]
    order: list[str] = []
    for n in flat:
        if n.endswith((".yaml", ".yml")):
            members = [n]
        elif (suites_dir() / f"{n}.yaml").is_file():
            members = suite_members(n)
        elif (tasks_dir() / f"{n}.yaml").is_file():
            members = [n]
        else:
            raise _unknown(n)
        order += [m for m in members if m not in order]
    if not order:
        raise TaskError("no tasks given: name tasks or suites (korean, english, safety, "
                        "translation, all)")
    return [load_task(n) for n in order]


# --- documents -----------------------------------------------------------------------


def data_file(task: Task, rel: str) -> Path:
    """A data file a task names: relative to the data root (``eval/x/test.jsonl``, or
    ``data://eval/x/test.jsonl``) or absolute; an error naming the task when missing."""
    rel = rel.removeprefix("data://")
    path = Path(rel)
    if not path.is_absolute():
        path = data_root() / rel
    if not path.is_file():
        raise TaskError(
            f"task {task.name}: data file {path} not found. Point --data-dir (or "
            f"HCX_DATA_DIR) at a folder holding {rel}, or set dataset.files / dataset.hub "
            f"in {task.file} to your copy")
    return path


def hub_mirror(hub: str) -> Path | None:
    """The local copy of a Hub dataset, ``<data root>/hub/<id>`` (a folder laid out as the
    Hub repository: a README.md whose ``configs:`` name each config's data files, as
    ``huggingface-cli download --repo-type dataset <id> --local-dir ...`` leaves it), or
    None when there is none."""
    path = data_root() / "hub" / hub
    return path if path.is_dir() else None


def _read_hub(task: Task, spec: DatasetSpec) -> list[dict]:
    """The docs of a ``dataset.hub`` spec, from its local mirror when there is one (see
    :func:`hub_mirror`), else from the Hub (or the datasets cache). Several configs are
    joined in order; each doc records its config in ``__config__``."""
    import datasets

    mirror = hub_mirror(spec.hub)
    source = str(mirror) if mirror is not None else spec.hub
    configs = spec.config if isinstance(spec.config, list) else [spec.config]
    docs: list[dict] = []
    for config in configs:
        try:
            ds = datasets.load_dataset(source, config, split=spec.split)
        except Exception as e:
            where = f"the local copy {mirror}" if mirror is not None else (
                f"the Hub or its cache (offline: put a copy of the dataset repository at "
                f"{data_root() / 'hub' / spec.hub})")
            raise TaskError(f"task {task.name}: dataset.hub {spec.hub} (config {config}, split "
                            f"{spec.split}) cannot be loaded from {where}: "
                            f"{type(e).__name__}: {e}") from None
        name = spec.hub if config is None else f"{spec.hub}:{config}"
        for i, row in enumerate(ds):
            docs.append({**row, "__config__": config, "__where__": f"{name}[{i}]"})
    return docs


def read_dataset(task: Task, spec: DatasetSpec) -> list[dict]:
    """The docs of a dataset spec, each tagged with where it came from (``__where__``)."""
    docs: list[dict] = []
    if spec.hub is not None:
        docs = _read_hub(task, spec)
    else:
        files = [spec.files] if isinstance(spec.files, str) else list(spec.files or [])
        for rel in files:
            path = data_file(task, rel)
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TaskError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                    docs.append({**row, "__where__": f"{path.name}:{lineno}"})
    if spec.filter:
        docs = [d for d in docs if task._eval("dataset.filter", spec.filter, d, True)]
    if task.spec.process_docs:
        from hcx.evaluation.functions import load_function

        process = load_function(task.spec.process_docs, task.name, task.file, "process_docs")
        try:
            docs = list(process(docs))
        except Exception as e:
            raise TaskError(f"task {task.name}: process_docs {task.spec.process_docs} failed: "
                            f"{e!r}") from None
        if not all(isinstance(d, dict) and "__where__" in d for d in docs):
            raise TaskError(f"task {task.name}: process_docs {task.spec.process_docs} must "
                            "return the docs as dicts, keeping each one's '__where__'")
    return docs


def load_docs(task: Task, limit: int | None = None) -> list[dict]:
    docs = read_dataset(task, task.spec.dataset)
    if not docs:
        raise TaskError(f"task {task.name}: the dataset holds no examples")
    return docs[:limit] if limit else docs


class FewShot:
    """Few-shot examples for a task. From a few-shot dataset (``fewshot.dataset``): its
    first ``n`` examples in file order (sharing ``fewshot.same`` with the doc when set:
    MMLU's dev split per subject), as lm-eval's first-n sampler. From the task's own
    examples: a sample seeded per doc from all of them (``--limit`` does not change a
    doc's shots), never the doc itself."""

    def __init__(self, task: Task):
        self.task = task
        spec = task.spec.fewshot
        self.pool: list[dict] = []
        if spec.n:
            self.pool = read_dataset(task, spec.dataset or task.spec.dataset)
            if spec.dataset is None and len(self.pool) <= spec.n:
                raise TaskError(f"task {task.name}: {spec.n}-shot needs more than "
                                f"{len(self.pool)} examples")

    def examples(self, doc: dict) -> list[dict]:
        spec = self.task.spec.fewshot
        if not spec.n:
            return []
        pool = self.pool
        if spec.same:
            pool = [d for d in pool if d.get(spec.same) == doc.get(spec.same)]
        if spec.dataset is not None:
            return pool[: spec.n]
        pool = [d for d in pool if d["__where__"] != doc["__where__"]]
        rng = random.Random(f"{spec.seed}:{doc['__where__']}")
        return rng.sample(pool, min(spec.n, len(pool)))

    def prefix(self, doc: dict, answer_of) -> str:
        """The preamble, then the rendered shots, each a prompt followed by its answer
        and the separator."""
        spec = self.task.spec.fewshot
        shots = self.examples(doc)
        preamble = self.task.template("preamble", self.task.spec.preamble, doc) \
            if self.task.spec.preamble else ""
        return preamble + "".join(self.task.prompt(s) + answer_of(s) + spec.separator for s in shots)


# --- documentation -------------------------------------------------------------------


def tasks_markdown() -> str:
    """The task table of docs/eval.md, generated from the YAML files (a test keeps the
    document equal to it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "\\n")

    rows = ["| task | lang | category | kind | metrics (primary first) | source | prompt |",
            "|---|---|---|---|---|---|---|"]
    for task in resolve_tasks(available_tasks()):
        s = task.spec
        metrics = [s.primary] + [m for m in s.metrics if m != s.primary]
        shots = f"{s.fewshot.n}-shot; " if s.fewshot.n else ""
        prompt = s.prompt if len(s.prompt) <= 90 else s.prompt[:87] + "..."
        rows.append(f"| `{s.name}` | {s.language} | {s.category} | {s.kind} | "
                    f"{', '.join(metrics)} | {cell(s.source)} | {shots}`{cell(prompt)}` |")
    return "\n".join(rows) + "\n"


# --- settings chosen at run time --------------------------------------------------------


def with_settings(task: Task, *, mc_mode: str | None = None, shuffle_seed: int | None = None,
                  samples: int | None = None, temperature: float | None = None,
                  top_p: float | None = None) -> Task:
    """The task with run-time choices applied (``hcx eval --mc-mode generate --samples 8
    ...``), the rest of its YAML unchanged; the returned task's fingerprint differs, so a
    run directory keeps results of each setting apart. ``mc_mode`` and ``shuffle_seed``
    apply to multiple_choice tasks, the sampling settings to generation and code tasks;
    other tasks are returned as they are."""
    spec = task.spec
    data = spec.model_dump()
    if spec.kind == "multiple_choice":
        if mc_mode is not None and mc_mode != spec.mode:
            data["mode"] = mc_mode
            if mc_mode == "generate":
                data["metrics"], data["primary"] = ["acc", "unparseable"], "acc"
            else:
                raise TaskError(f"task {task.name}: its YAML sets mode: generate; --mc-mode "
                                f"loglikelihood needs its log-likelihood metrics, so edit "
                                f"{task.file} (key mode) instead")
        if shuffle_seed is not None and data["mode"] == "generate":
            data["generate"].update(shuffle=True, shuffle_seed=shuffle_seed)
    if spec.kind in ("generation", "code") and any(
            v is not None for v in (samples, temperature, top_p)):
        gen = data["generation"]
        for key, value in (("samples", samples), ("temperature", temperature), ("top_p", top_p)):
            if value is not None:
                gen[key] = value
        # maj@k / pass@k listed for more samples than now asked for are dropped
        data["metrics"] = [m for m in data["metrics"]
                           if not metric_k(m) or metric_k(m)[1] <= gen["samples"]]
        if data["primary"] not in data["metrics"]:
            data["primary"] = None
    if data == spec.model_dump():
        return task
    try:
        new = TaskSpec.model_validate(data)
    except Exception as e:
        errors = getattr(e, "errors", None)
        why = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
                        for err in errors()) if errors else str(e)
        raise TaskError(f"task {task.name} ({task.file}): the run-time settings do not fit "
                        f"it: {why}") from None
    return Task(new, task.file)
