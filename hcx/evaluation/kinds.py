"""How each kind of task is run and scored.

Every kind takes a task, its docs and a model and returns the per-example records
(written to ``samples/<task>.jsonl``) and the task's metrics, each with a standard error.
The model is only asked the two questions of :mod:`hcx.evaluation.models`: log-likelihoods
of continuations, and greedy generations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hcx.evaluation.metrics import (BiasRecord, MetricValue, answer_key, bias_scores,
                                    bootstrap_stderr, gsm8k_extract, gsm8k_gold, korquad_em,
                                    korquad_f1, maj_at_k, majority_vote, mc_predictions,
                                    mean_stderr, pass_at_k_over_problems, squad_em, squad_f1,
                                    translation_scores, translation_signature, truthfulqa_mc2)
from hcx.evaluation.models import ChoiceRequest, GenerationRequest, LanguageModel, encode_choices
from hcx.evaluation.tasks import FewShot, Task, TaskError


@dataclass
class Outcome:
    samples: list[dict]
    metrics: dict[str, MetricValue]
    notes: dict = field(default_factory=dict)  # e.g. sacrebleu signatures, kept in scores.json


def _index(task: Task, doc: dict, target, choices: list[str]) -> int:
    """The gold choice as an index: expressions may give an index or the answer text."""
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in choices:
            raise TaskError(f"task {task.name}: target {target!r} of doc {doc['__where__']} "
                            f"is none of the choices {choices}")
        return choices.index(target)
    index = int(target)
    if not 0 <= index < len(choices):
        raise TaskError(f"task {task.name}: target index {index} of doc {doc['__where__']} "
                        f"is out of range for {len(choices)} choices")
    return index


# --- log-likelihood kinds ------------------------------------------------------------


def _choice_answer(task: Task):
    """A few-shot example's answer text: the delimiter and its gold choice."""
    spec = task.spec

    def answer(shot: dict) -> str:
        if spec.fewshot.target is not None:
            return spec.target_delimiter + str(task.expr("fewshot.target", shot))
        choices = [str(c) for c in task.expr("choices", shot)]
        return spec.target_delimiter + choices[_index(task, shot, task.expr("target", shot), choices)]

    return answer


def score_choices(task: Task, docs: list[dict], model: LanguageModel) -> list[dict]:
    """Log-likelihood of every choice of every doc: one record per doc with ``choices``,
    ``target`` (index), ``loglikelihoods``, ``greedy`` and the ``prompt``."""
    spec = task.spec
    shots = FewShot(task)
    answer = _choice_answer(task)
    records, requests, owned = [], [], []
    for doc in docs:
        prefix = shots.prefix(doc, answer)
        if spec.contexts is not None:
            # One context per choice, all scored on the same continuation.
            choices = [str(c) for c in task.expr("contexts", doc)]
            prompt = spec.target_delimiter + task.prompt(doc)
            for c in choices:
                ctx, (cont,) = encode_choices(model.encode, prefix + c, [prompt], model.eot_id)
                requests.append(ChoiceRequest(ctx, [cont]))
            owned.append(len(choices))
        else:
            prompt = prefix + task.prompt(doc)
            choices = [str(c) for c in task.expr("choices", doc)]
            ctx, conts = encode_choices(model.encode, prompt,
                                        [spec.target_delimiter + c for c in choices], model.eot_id)
            requests.append(ChoiceRequest(ctx, conts))
            owned.append(1)
        target = _index(task, doc, task.expr("target", doc), choices)
        records.append({"doc": doc["__where__"], "prompt": prompt, "choices": choices,
                        "target": target})
    scores = model.loglikelihood(requests, desc=task.name)
    k = 0
    for rec, n in zip(records, owned):
        got = [s for r in scores[k:k + n] for s in r]
        k += n
        rec["loglikelihoods"] = [s.logprob for s in got]
        rec["greedy"] = [s.greedy for s in got]
    return records


def multiple_choice(task: Task, docs: list[dict], model: LanguageModel, chat: bool = False) -> Outcome:
    if task.spec.mode == "generate":
        return choice_generation(task, docs, model, chat)
    records = score_choices(task, docs, model)
    wanted = task.spec.metrics
    for rec, doc in zip(records, docs):
        pred, pred_norm = mc_predictions(rec["loglikelihoods"], rec["choices"])
        rec.update(pred=pred, acc=float(pred == rec["target"]))
        if "acc_norm" in wanted:
            rec.update(pred_norm=pred_norm, acc_norm=float(pred_norm == rec["target"]))
        if "mc2" in wanted:
            rec["labels"] = [int(x) for x in task.expr("labels", doc)]
            rec["mc2"] = truthfulqa_mc2(rec["loglikelihoods"], rec["labels"])
    metrics = {m: MetricValue(*mean_stderr([r[m] for r in records])) for m in wanted}
    return Outcome(records, metrics)


# --- multiple choice by generation --------------------------------------------------

# An answer cue ending a prompt ("\nAnswer:", "\n정답:"): the generate-mode question drops
# it, since the cue follows the options.
_CUE_END = re.compile(r"(?:^|(?<=\s))(?:Answer|A|정답|답|답변)\s*[:：]\s*$")


def _style(task: Task) -> str:
    g = task.spec.generate
    return g.labels or ("circled" if task.spec.language == "ko" else "letters")


def _gen_choices(task: Task, doc: dict) -> tuple[str, list[str], int]:
    """(question, option texts, gold index) of a doc as generate mode asks it."""
    from hcx.evaluation.choice import LETTERS

    spec, g = task.spec, task.spec.generate
    if spec.contexts is not None:
        cont = task.prompt(doc)
        choices = [str(c) for c in task.expr("contexts", doc)]
        default = [c + spec.target_delimiter + cont for c in choices]
    else:
        choices = [str(c) for c in task.expr("choices", doc)]
        default = choices
    gold = _index(task, doc, task.expr("target", doc), choices)
    if g.options is not None:
        options = [str(o) for o in task.expr("generate.options", doc)]
        if len(options) != len(choices):
            raise TaskError(f"task {task.name}: generate.options gave {len(options)} options for "
                            f"doc {doc['__where__']}, which has {len(choices)} choices")
    else:
        bare = [c.strip().strip("()[].") for c in choices]  # "A", "(A)", "1." ...
        if len(choices) > 1 and bare in (list(LETTERS[:len(choices)]),
                                         [str(i + 1) for i in range(len(choices))]):
            raise TaskError(f"task {task.name}: its choices are the labels {choices} (the prompt "
                            f"lists the options); mode generate needs the option texts: set "
                            f"generate.options (and generate.question) in {task.file}")
        options = default
    if g.question is not None:
        question = task.template("generate.question", g.question, doc)
    elif spec.contexts is not None:
        question = ""
    else:
        question = _CUE_END.sub("", task.prompt(doc)).rstrip()
    return question, options, gold


def _gen_prompt(task: Task, question: str, options: list[str]) -> str:
    from hcx.evaluation.choice import DEFAULT_CUE, render_options

    g = task.spec.generate
    cue = g.cue if g.cue is not None else DEFAULT_CUE.get(task.spec.language, "Answer:")
    head = question + "\n" if question else ""
    return head + render_options(options, _style(task)) + "\n" + cue


def choice_prompts(task: Task, doc: dict, shots: FewShot | None = None) -> dict:
    """What generate mode asks of one doc: ``prompt`` (options in their own order) and,
    with ``shuffle_seed``, ``shuffled_prompt`` with ``order`` (position i shows option
    order[i]) and ``shuffled_gold``; ``options``, ``gold``."""
    from hcx.evaluation.choice import labels_for, shuffle_order

    spec, g = task.spec, task.spec.generate
    shots = shots or FewShot(task)
    prefix = ""
    if spec.fewshot.n or spec.preamble:
        parts = []
        for s in shots.examples(doc):
            q, opts, gold = _gen_choices(task, s)
            parts.append(_gen_prompt(task, q, opts) + " " + labels_for(_style(task), len(opts))[gold]
                         + spec.fewshot.separator)
        preamble = task.template("preamble", spec.preamble, doc) if spec.preamble else ""
        prefix = preamble + "".join(parts)
    suffix = " " + g.cot if g.cot else ""
    question, options, gold = _gen_choices(task, doc)
    out = {"prompt": prefix + _gen_prompt(task, question, options) + suffix,
           "options": options, "gold": gold}
    if g.shuffle_seed is not None:
        order = shuffle_order(len(options), g.shuffle_seed, doc["__where__"])
        out.update(order=order, shuffled_gold=order.index(gold),
                   shuffled_prompt=prefix + _gen_prompt(task, question, [options[j] for j in order])
                   + suffix)
    return out


def choice_generation(task: Task, docs: list[dict], model: LanguageModel, chat: bool = False) -> Outcome:
    """Multiple choice by generation: the options listed, the answer generated greedily
    and read back (hcx.evaluation.choice); unparseable answers count as wrong and are
    reported as ``unparseable``. With ``shuffle_seed`` the questions are asked twice,
    options shuffled (``acc``) and in their own order (``acc_unshuffled``)."""
    from hcx.evaluation.choice import DEFAULT_ANSWER_PATTERN, extract_choice

    spec, g = task.spec, task.spec.generate
    shots = FewShot(task)
    asked = [choice_prompts(task, doc, shots) for doc in docs]
    shuffled = g.shuffle_seed is not None
    steps = g.max_new_tokens or (512 if g.cot else 16)
    stop = tuple(g.stop if g.stop is not None else ([] if g.cot else ["\n"]))
    prompts = [a["prompt"] for a in asked] + ([a["shuffled_prompt"] for a in asked] if shuffled else [])
    texts = model.generate([GenerationRequest(p, steps, stop, chat) for p in prompts], desc=task.name)
    pattern = g.answer_pattern or (DEFAULT_ANSWER_PATTERN if g.cot else None)
    style = _style(task)
    records = []
    for i, (doc, a) in enumerate(zip(docs, asked)):
        labels = [int(x) for x in task.expr("labels", doc)] if spec.labels is not None else None

        def read(text: str, order: list[int]) -> tuple[int | None, float]:
            shown = extract_choice(text, [a["options"][j] for j in order], style, pattern)
            pred = None if shown is None else order[shown]  # back to the option's own index
            ok = pred is not None and (labels[pred] == 1 if labels else pred == a["gold"])
            return pred, float(ok)

        identity = list(range(len(a["options"])))
        pred, ok = read(texts[i], identity)
        rec = {"doc": doc["__where__"], "prompt": a["prompt"], "options": a["options"],
               "target": a["gold"], "output": texts[i], "pred": pred,
               "acc": ok, "unparseable": float(pred is None)}
        if shuffled:
            s_pred, s_ok = read(texts[len(docs) + i], a["order"])
            rec.update(acc_unshuffled=ok, unparseable_unshuffled=rec["unparseable"],
                       shuffled_prompt=a["shuffled_prompt"], order=a["order"],
                       shuffled_output=texts[len(docs) + i], pred_unshuffled=pred,
                       pred=s_pred, acc=s_ok, unparseable=float(s_pred is None))
        records.append(rec)
    metrics = {m: MetricValue(*mean_stderr([r[m] for r in records]), m != "unparseable")
               for m in spec.metrics}
    return Outcome(records, metrics)


def bias(task: Task, docs: list[dict], model: LanguageModel) -> Outcome:
    """Multiple choice whose answers are also classed as stereotype-consistent (biased),
    inconsistent (counter-biased) or unknown, for the KoBBQ/BBQ bias scores."""
    records = score_choices(task, docs, model)
    for rec, doc in zip(records, docs):
        pred, _ = mc_predictions(rec["loglikelihoods"], rec["choices"])
        condition = str(task.expr("bias.condition", doc))
        if condition not in ("ambig", "disambig"):
            raise TaskError(f"task {task.name}: bias.condition gave {condition!r} for doc "
                            f"{doc['__where__']}; it must be 'ambig' or 'disambig'")
        biased = int(task.expr("bias.biased", doc))
        unknown = int(task.expr("bias.unknown", doc))
        for what, i in (("bias.biased", biased), ("bias.unknown", unknown)):
            if not 0 <= i < len(rec["choices"]):
                raise TaskError(f"task {task.name}: {what} gave index {i} for doc "
                                f"{doc['__where__']}, which has {len(rec['choices'])} choices")

        def kind_of(i: int) -> str:
            return "unknown" if i == unknown else "biased" if i == biased else "counter_biased"

        rec.update(pred=pred, acc=float(pred == rec["target"]), condition=condition,
                   answer_type=kind_of(pred), gold_type=kind_of(rec["target"]))
    metrics = bias_scores([BiasRecord(context_condition=r["condition"], answer_type=r["answer_type"],
                                          biased_context=r["gold_type"] == "biased")
                             for r in records])
    return Outcome(records, {m: metrics[m] for m in task.spec.metrics})


# --- generation kinds ----------------------------------------------------------------


def _generate(task: Task, docs: list[dict], model: LanguageModel, chat: bool) -> list[dict]:
    """One record per doc with its ``prompt`` and ``output``; with ``generation.samples``
    k > 1 also ``outputs``, the k sampled texts (``output`` is the first). Request j of
    the run carries seed ``generation.seed + j``."""
    spec = task.spec
    gen = spec.generation
    shots = FewShot(task)

    def answer(shot: dict) -> str:
        text = task.expr("fewshot.target", shot) if spec.fewshot.target else task.expr("target", shot)
        return spec.target_delimiter + str(text if isinstance(text, str) else text[0])

    k = gen.samples
    prompts = [shots.prefix(doc, answer) + task.prompt(doc) for doc in docs]
    requests = [GenerationRequest(p, gen.max_new_tokens, tuple(gen.stop), chat,
                                  gen.temperature, gen.top_p, gen.seed + i * k + j)
                for i, p in enumerate(prompts) for j in range(k)]
    texts = model.generate(requests, desc=task.name)
    records = []
    for i, (d, p) in enumerate(zip(docs, prompts)):
        rec = {"doc": d["__where__"], "prompt": p, "output": texts[i * k]}
        if k > 1:
            rec["outputs"] = texts[i * k:(i + 1) * k]
        records.append(rec)
    return records


def _one_sample(task: Task, kind: str) -> None:
    if task.spec.generation.samples > 1:
        raise TaskError(f"task {task.name}: generation.samples > 1 is for generation and code "
                        f"tasks (maj@k, pass@k); {kind} tasks generate once")


def _at_k(task: Task, family: str, auto: tuple[int, ...]) -> list[int]:
    """The k of the ``family@k`` metrics to report: those listed, and ``auto`` ones that
    the sample count allows."""
    from hcx.evaluation.tasks import metric_k

    n = task.spec.generation.samples
    listed = [at[1] for m in task.spec.metrics if (at := metric_k(m)) and at[0] == family]
    return sorted({k for k in [*listed, *auto] if k <= n})


def _references(task: Task, doc: dict) -> list[str]:
    target = task.expr("target", doc)
    return [str(t) for t in target] if isinstance(target, (list, tuple)) else [str(target)]


def _answer_of(mode: str, text: str):
    """The answer a generation gives, as compared with the references: GSM8K's strict
    extraction, else the first line (SQuAD/KorQuAD normalisation is the comparison's)."""
    if mode == "gsm8k":
        return gsm8k_extract(text, "strict")
    return text.strip().split("\n")[0].strip()


def generation(task: Task, docs: list[dict], model: LanguageModel, chat: bool = False) -> Outcome:
    """Free generation, an answer extracted and compared with the references. With k
    samples per example, the per-example scores are the mean over the samples, and
    ``maj@k`` scores the majority vote of the extracted answers (metrics.majority_vote)."""
    records = _generate(task, docs, model, chat)
    mode = task.spec.answer
    k = task.spec.generation.samples
    em, f1 = {"korquad": (korquad_em, korquad_f1), "squad": (squad_em, squad_f1),
              "none": (squad_em, squad_f1), "gsm8k": (None, None)}[mode]
    normalise = lambda text: answer_key(text, mode)  # noqa: E731  (not used for gsm8k)

    def score(out: str, refs: list[str]) -> dict:
        if mode == "gsm8k":
            gold = gsm8k_gold(refs[0])
            strict, flexible = gsm8k_extract(out, "strict"), gsm8k_extract(out, "flexible")
            return dict(gold=gold, answer=strict, answer_flexible=flexible,
                        exact_match=float(strict == gold), exact_match_flexible=float(flexible == gold),
                        f1=float(flexible == gold))
        answer = _answer_of(mode, out)
        return dict(gold=refs, answer=answer, exact_match=float(em(answer, refs)),
                    f1=float(f1(answer, refs)), exact_match_flexible=float(em(answer, refs)))

    votes = _at_k(task, "maj", (k,) if k > 1 else ())
    golds, answers = [], []
    for rec, doc in zip(records, docs):
        refs = _references(task, doc)
        rec.update(score(rec["output"], refs))
        if k > 1:
            each = [score(o, refs) for o in rec["outputs"]]
            for m in ("exact_match", "exact_match_flexible", "f1"):
                rec[m] = sum(e[m] for e in each) / k
            rec["answers"] = [e["answer"] for e in each]
        outs = rec.get("outputs", [rec["output"]])
        if mode == "gsm8k":
            answers.append([gsm8k_extract(o, "strict") for o in outs])
            golds.append(rec["gold"])
        else:  # vote over normalised answers; right if the voted one matches a reference
            answers.append([normalise(_answer_of(mode, o)) or None for o in outs])
            golds.append(None)
    functions = task.spec.metric_functions
    metrics = {m: MetricValue(*mean_stderr([r[m] for r in records]))
               for m in task.spec.metrics if not m.startswith("maj@") and m not in functions}
    metrics.update(function_metrics(task, records))
    for v in votes:
        if mode == "gsm8k":
            metrics[f"maj@{v}"] = maj_at_k(answers, golds, v)
        else:
            hits = []
            for rec, a in zip(records, answers):
                voted = majority_vote(a[:v])
                hits.append(float(voted is not None and any(normalise(g) == voted for g in rec["gold"])))
            metrics[f"maj@{v}"] = MetricValue(*mean_stderr(hits))
        for rec, a in zip(records, answers):
            rec[f"maj@{v}_answer"] = majority_vote(a[:v])
    return Outcome(records, metrics)


def function_metrics(task: Task, records: list[dict]) -> dict[str, MetricValue]:
    """A generation task's ``metric_functions`` over its (answer, gold) pairs, each with a
    bootstrap standard error over the examples (hcx.evaluation.functions)."""
    from hcx.evaluation.functions import load_function

    out = {}
    pairs = [(r["answer"], r["gold"]) for r in records]
    for name, spec in task.spec.metric_functions.items():
        fn = load_function(spec, task.name, task.file, f"metric_functions.{name}")

        def value(items, fn=fn) -> float:
            return float(fn([p for p, _ in items], [g for _, g in items]))

        def resampled(items, value=value) -> float:
            try:  # a resample may leave the metric undefined (one distinct value): left out
                return value(items)
            except Exception:
                return float("nan")

        try:
            whole = value(pairs)
        except Exception as e:
            raise TaskError(f"task {task.name}: metric_functions.{name} ({spec}) failed: "
                            f"{e!r}") from None
        out[name] = MetricValue(whole, bootstrap_stderr(resampled, pairs))
    return out


def translation(task: Task, docs: list[dict], model: LanguageModel, chat: bool = False) -> Outcome:
    """Sentence translation scored with sacrebleu at the corpus level."""
    _one_sample(task, "translation")
    records = _generate(task, docs, model, chat)
    target_lang = task.spec.language.split("-")[1]
    for rec, doc in zip(records, docs):
        rec["hypothesis"] = rec["output"].strip().split("\n")[0].strip()
        rec["reference"] = _references(task, doc)[0]
    scores = translation_scores([r["hypothesis"] for r in records],
                                  [r["reference"] for r in records], target_lang)
    signatures = {m: translation_signature(target_lang, m) for m in task.spec.metrics}
    return Outcome(records, {m: scores[m] for m in task.spec.metrics}, {"signatures": signatures})


def code(task: Task, docs: list[dict], model: LanguageModel, chat: bool = False,
         execute: bool = True) -> Outcome:
    """Code completion run against the benchmark's tests in the sandbox: pass@1 from one
    greedy completion, or with k samples per problem the unbiased pass@k of Chen et al.
    2021 for k = 1, 10, 100 (those the sample count reaches) and any listed."""
    from hcx.evaluation import sandbox

    spec = task.spec.code
    n = task.spec.generation.samples
    records = _generate(task, docs, model, chat)
    programs = [task.template("code.program", spec.program, doc, completion=out)
                for rec, doc in zip(records, docs) for out in rec.get("outputs", [rec["output"]])]
    if not execute:  # a TP rank other than 0: the results are rank 0's to write
        return Outcome(records, {})
    results = sandbox.run_many(programs, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb,
                               progress=True)
    for i, rec in enumerate(records):
        mine = results[i * n:(i + 1) * n]
        rec.update(status=mine[0].status, passed=float(mine[0].status == "passed"),
                   stderr_tail=mine[0].stderr[-500:])
        if n > 1:
            rec.update(statuses=[r.status for r in mine],
                       n_passed=sum(r.status == "passed" for r in mine))
    counts = [(n, rec.get("n_passed", int(rec["passed"]))) for rec in records]
    return Outcome(records, {f"pass@{k}": pass_at_k_over_problems(counts, k)
                             for k in _at_k(task, "pass", (1, 10, 100))})


def ifeval(task: Task, docs: list[dict], model: LanguageModel, chat: bool = False) -> Outcome:
    """IFEval: the response is checked against each of the prompt's verifiable instructions."""
    from hcx.evaluation import ifeval

    _one_sample(task, "ifeval")
    records = _generate(task, docs, model, chat)
    results = []
    for rec, doc in zip(records, docs):
        ids = list(task.expr("ifeval.instructions", doc))
        kwargs = list(task.expr("ifeval.kwargs", doc))
        result = ifeval.check_example(ids, kwargs, task.prompt(doc), rec["output"])
        rec["checks"] = result
        results.append(result)
    agg = ifeval.aggregate(results)
    return Outcome(records, {m: MetricValue(*agg[m]) for m in task.spec.metrics})


def run(task: Task, docs: list[dict], model: LanguageModel, chat: bool = False,
        judge: LanguageModel | None = None) -> Outcome:
    """Run one task. ``judge``: the model that grades judged tasks (``hcx eval --judge``);
    the others ignore it."""
    kind = task.spec.kind
    if kind == "judged":  # chat by construction; reports its own per-category breakdown
        from hcx.evaluation.judged import judged

        return Outcome(*judged(task, docs, model, judge))
    if kind == "multiple_choice":
        outcome = multiple_choice(task, docs, model, chat)
    elif kind == "bias":
        outcome = bias(task, docs, model)
    elif kind == "code":
        outcome = code(task, docs, model, chat, execute=model.rank0)
    else:
        outcome = {"generation": generation, "translation": translation, "ifeval": ifeval}[kind](
            task, docs, model, chat)
    if task.spec.breakdown and outcome.metrics:
        outcome.notes["breakdown"] = breakdown(task, docs, outcome)
    return outcome


def breakdown(task: Task, docs: list[dict], outcome: Outcome) -> dict:
    """The task's mean-type metrics per group of each ``breakdown`` expression (KMMLU:
    per subject and per category): ``{name: {"groups": {group: {"n", metric: {value,
    stderr, higher_is_better}}}, "macro": {metric: mean of the group values}}}``. The
    task's own metrics stay the micro averages over all examples."""
    per_record = [m for m in outcome.metrics if all(m in r for r in outcome.samples)]
    out = {}
    for name in task.spec.breakdown:
        groups: dict[str, list[dict]] = {}
        for rec, doc in zip(outcome.samples, docs):
            groups.setdefault(str(task.expr(f"breakdown.{name}", doc)), []).append(rec)
        table = {g: {"n": len(recs), **{m: MetricValue(*mean_stderr([r[m] for r in recs]),
                                                       outcome.metrics[m].higher_is_better).to_json()
                                        for m in per_record}}
                 for g, recs in sorted(groups.items())}
        macro = {m: sum(t[m]["value"] for t in table.values()) / len(table) for m in per_record}
        out[name] = {"groups": table, "macro": macro}
    return out
