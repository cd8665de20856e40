"""``hcx eval`` and ``hcx report``: benchmarks on a model, and the bilingual report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcx.commands.common import log, needs_relaunch, relaunch_with_torchrun


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.evaluation import tasks
    from hcx.evaluation.endpoint_client import is_endpoint

    if args.list:
        for name in tasks.available_suites():
            print(f"suite {name}: {', '.join(tasks.suite_members(name))}")
        for task in tasks.resolve_tasks(tasks.available_tasks()):
            s = task.spec
            print(f"{s.name:20s} {s.language:6s} {s.category:13s} {s.kind:16s} {s.description}")
        return 0
    if not args.model:
        raise tasks.TaskError("give a checkpoint, a Hugging Face directory or an http(s):// "
                              "endpoint (or --list)")
    served = is_endpoint(args.model)
    check_model_flags(args, served)
    names = [n.strip() for item in args.tasks or [] for n in item.split(",") if n.strip()]
    if args.backend == "lm-eval":
        from hcx.evaluation.lm_eval.backend import run_lm_eval

        if args.dp != 1:
            raise tasks.TaskError("--dp applies to hcx's own backend; with --backend lm-eval "
                                  "use lm-eval's own data-parallel launch (accelerate)")
        out = Path(args.out) if args.out else default_eval_dir(args.model, args.limit, args.backend)
        run_lm_eval(args.model, names or ["kobest"], out, limit=args.limit, tp=args.tp,
                    batch_size=args.batch_size or DEFAULT_BATCH_SIZE)
        print(out)
        return 0
    selected = tasks.resolve_tasks(names or ["all"])  # unknown names fail before any process starts
    for t in selected:  # settings that do not fit a task fail before any process starts too
        tasks.with_settings(t, **run_settings(args))
    check_judged(selected, args.judge)
    if args.dp < 1 or args.tp < 1:
        raise tasks.TaskError("--tp and --dp are at least 1")
    if needs_relaunch(args.tp * args.dp):
        return relaunch_with_torchrun(args.tp * args.dp, argv)
    from hcx.evaluation.models import Budget, open_model
    from hcx.evaluation.runner import evaluate

    budget = Budget(batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
                    max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS)
    if served:
        model = open_model(args.model, endpoint=endpoint_options(args), log=log)
    else:
        model = open_model(args.model, tp=args.tp, dp=args.dp, dtype=args.dtype or "float32",
                           log=log, budget=budget)
    judge = None
    try:
        judge = open_judge(args, model, budget, selected)
        # a served model's name is known once the server has listed it
        out = Path(args.out) if args.out else default_eval_dir(
            args.model, args.limit, args.backend, served=model.name if served else None)
        if served and not args.no_request_cache:
            from hcx.evaluation.endpoint import REQUEST_CACHE

            model.use_request_cache(out / REQUEST_CACHE)
        if model.rank0:
            log(f"evaluating {model.path}{f' ({model.name})' if served else ''} on "
                f"{len(selected)} tasks -> {out}"
                + (f" (judge: {judge.path})" if judge is not None else ""))
        scores = evaluate(model, selected, out, limit=args.limit, chat=args.chat,
                          max_new_tokens=args.max_new_tokens,
                          log=log if model.rank0 else lambda m: None,
                          settings=run_settings(args), judge=judge)
        if args.log_to and model.rank0:
            log_to_trackers(Path(args.log_to), scores, model)
    finally:
        if judge is not None and judge is not model:
            judge.close()
        model.close()
    if model.rank0:
        print(out)
    return 0


def log_to_trackers(run_dir: Path, scores: dict, model) -> None:
    """``--log-to RUN_DIR``: the scores (``eval/<task>/<metric>``) into the W&B / MLflow
    runs of the training run in RUN_DIR, at the checkpoint's training step."""
    from hcx.engine.tracking import log_scores
    from hcx.evaluation.runner import checkpoint_step

    flat = {}
    for task, entry in scores.get("tasks", {}).items():
        for metric, value in entry.get("metrics", {}).items():
            v = value.get("value") if isinstance(value, dict) else value
            if isinstance(v, (int, float)):
                flat[f"{task}/{metric}"] = v
    done = log_scores(run_dir, flat, step=checkpoint_step(model))
    log(f"scores logged to the {' and '.join(done)} run of {run_dir}")


DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_TOKENS = 32768

#: Flags that only in-process models take, and what they mean when unset.
LOCAL_FLAGS = {"batch_size": "--batch-size", "max_tokens": "--max-tokens", "dtype": "--dtype"}
#: Flags that only endpoints take (unset: None, or False for a switch).
ENDPOINT_FLAGS = {"endpoint_model": "--endpoint-model", "api_key_env": "--api-key-env",
                  "concurrency": "--concurrency", "timeout": "--timeout",
                  "max_retries": "--max-retries", "api": "--api", "tokenizer": "--tokenizer",
                  "max_length": "--max-length", "no_request_cache": "--no-request-cache"}


def check_model_flags(args: argparse.Namespace, served: bool) -> None:
    """Flags that do not fit the model given fail before anything starts."""
    from hcx.evaluation.models import ModelOpenError

    if served:
        wrong = [flag for key, flag in LOCAL_FLAGS.items() if getattr(args, key) is not None]
        wrong += ["--tp"] if args.tp != 1 else []
        wrong += ["--dp"] if args.dp != 1 else []
        wrong += ["--backend lm-eval"] if args.backend == "lm-eval" else []
        if wrong:
            raise ModelOpenError(
                f"{args.model}: {', '.join(wrong)} appl{'ies' if len(wrong) == 1 else 'y'} to "
                "checkpoints and model directories run here; a served model runs as its server "
                "runs it (--concurrency sets how many requests are in flight)")
    else:
        wrong = [flag for key, flag in ENDPOINT_FLAGS.items() if getattr(args, key)]
        if wrong:
            raise ModelOpenError(f"{args.model}: {', '.join(wrong)} appl"
                                 f"{'ies' if len(wrong) == 1 else 'y'} to http(s):// endpoints")


def endpoint_options(args: argparse.Namespace):
    """The endpoint flags given, over :class:`EndpointOptions`'s defaults."""
    from hcx.evaluation.endpoint import EndpointOptions

    given = {"model": args.endpoint_model, "api_key_env": args.api_key_env,
             "concurrency": args.concurrency, "timeout": args.timeout,
             "max_retries": args.max_retries, "api": args.api, "tokenizer": args.tokenizer,
             "max_length": args.max_length}
    return EndpointOptions(**{k: v for k, v in given.items() if v is not None})


def check_judged(selected: list, judge: str | None) -> None:
    """Judged tasks need --judge, and their prompts and references must be usable: both
    checked before any model is opened. A judge given without judged tasks is unused."""
    from hcx.evaluation.judged import check, need_judge

    need_judge(selected, judge)
    for task in selected:
        if task.spec.kind == "judged":
            check(task)


def open_judge(args: argparse.Namespace, model, budget, selected: list):
    """The judge model of judged tasks: the evaluated model itself when --judge names the
    same path, else whatever open_model opens. An hcx checkpoint judge runs in the same
    processes as the model, at the same --tp (megatron's parallel state is shared: two
    checkpoints open side by side, as alignment keeps a frozen reference beside the
    policy); a judge that needs other parallelism is served (`hcx serve`) and named by
    its URL. None when no judged task is asked for (the judge is not loaded)."""
    from hcx.evaluation.endpoint_client import is_endpoint
    from hcx.evaluation.models import open_model

    if args.judge is None or not any(t.spec.kind == "judged" for t in selected):
        return None
    if args.judge == args.model or (
            Path(args.judge).exists() and Path(args.judge).resolve() == Path(args.model).resolve()):
        return model
    if is_endpoint(args.judge):  # served: the endpoint flags are the evaluated model's
        return open_model(args.judge, log=log)
    hf = (Path(args.judge) / "config.json").is_file()
    # the judge runs in the evaluation's processes: as many replicas as the model
    return open_model(args.judge, tp=1 if hf else args.tp, dp=args.dp,
                      dtype=args.dtype or "float32", log=log, budget=budget)


def run_settings(args: argparse.Namespace) -> dict:
    """The flags that change how tasks are asked (applied where they fit)."""
    return {"mc_mode": args.mc_mode, "shuffle_seed": args.shuffle_seed, "samples": args.samples,
            "temperature": args.temperature, "top_p": args.top_p}


def default_eval_dir(model: str, limit: int | None, backend: str, served: str | None = None) -> Path:
    """``runs/eval/<name>[-limitN][-lm-eval]``: the checkpoint's name, or for an endpoint
    ``<served model>@<host>-<port>``."""
    from hcx.evaluation.endpoint import endpoint_dir_name
    from hcx.evaluation.endpoint_client import is_endpoint
    from hcx.evaluation.models import checkpoint_name

    name = endpoint_dir_name(model, served) if is_endpoint(model) else checkpoint_name(Path(model))
    suffix = (f"-limit{limit}" if limit else "") + ("-lm-eval" if backend == "lm-eval" else "")
    return Path("runs") / "eval" / f"{name}{suffix}"


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.evaluation.report import build_report

    out = Path(args.out) if args.out else Path(args.run_dirs[-1]) / "report"
    written = build_report([Path(d) for d in args.run_dirs], out, title=args.title)
    for path in written.values():
        print(path)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "eval", help="run Korean/English benchmarks, safety and translation on a model",
        description="Evaluate an hcx checkpoint (any saved TP/PP layout; --tp N runs N "
                    "tensor-parallel processes), a Hugging Face model directory, or a model "
                    "served by an OpenAI-compatible server (an http(s):// URL: hcx serve, vLLM, "
                    "a hosted API) on tasks "
                    "defined in eval/tasks/*.yaml and suites in eval/suites/*.yaml (korean, "
                    "english, safety, translation, all, quick). Writes a run directory: "
                    "scores.json (metrics with standard errors) and samples/<task>.jsonl "
                    "(every example's prompt, output and scores). Running the same command "
                    "again keeps finished tasks. --backend lm-eval runs lm-evaluation-"
                    "harness's own task definitions (kobest_*) on the local data instead. "
                    "See docs/eval.md.")
    p.add_argument("model", nargs="?", help="hcx checkpoint (e.g. runs/tiny-sft/checkpoints), "
                                            "Hugging Face model directory, or the /v1 URL of an "
                                            "OpenAI-compatible server (http://localhost:8000/v1: "
                                            "hcx serve, vLLM, SGLang, a hosted API)")
    p.add_argument("--tasks", "--suite", dest="tasks", action="append", metavar="NAMES",
                   help="comma-separated tasks and suites (repeatable; default: all, or kobest "
                        "with --backend lm-eval)")
    p.add_argument("--limit", type=int, help="only the first N examples of each task "
                                             "(scores are then not comparable to published ones)")
    p.add_argument("--out", help="run directory (default: runs/eval/<model name>[-limitN]; for "
                                 "an endpoint runs/eval/<served model>@<host>-<port>[-limitN])")
    p.add_argument("--log-to", metavar="RUN_DIR",
                   help="also log the scores to the Weights & Biases / MLflow runs of the "
                        "training run in RUN_DIR (its trackers.json, written when its recipe "
                        "sets logging.wandb or logging.mlflow), at the checkpoint's step")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes (hcx checkpoints)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel replicas: N copies of the model (each --tp processes) "
                        "share every task's batches; scores equal --dp 1 exactly")
    p.add_argument("--batch-size", type=int, help="questions or prompts per forward pass "
                                                  f"(default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-tokens", type=int,
                   help="at most this many cached tokens per scoring pass (each choice "
                        f"holds its context's cache and its own tokens; default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--max-new-tokens", type=int,
                   help="cap every generation task's max_new_tokens (for quick smoke runs)")
    p.add_argument("--chat", action="store_true",
                   help="render generation prompts as a user turn of the model's chat template")
    p.add_argument("--mc-mode", choices=["loglikelihood", "generate"],
                   help="multiple-choice tasks: score the choices (default) or list them and "
                        "read the generated answer (docs/eval.md)")
    p.add_argument("--shuffle-seed", type=int,
                   help="with --mc-mode generate: shuffle the options (seeded per question); "
                        "the unshuffled accuracy is reported beside it")
    p.add_argument("--samples", type=int,
                   help="generation and code tasks: generations per example (maj@k, pass@k); "
                        "needs --temperature > 0")
    p.add_argument("--temperature", type=float, help="sampling temperature (0: greedy, the default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep the smallest set of tokens "
                                               "whose probability reaches p")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype for Hugging Face models (default: float32)")
    e = p.add_argument_group(
        "endpoints", "when MODEL is an http(s):// URL: an OpenAI-compatible server (docs/eval.md, "
                     "Endpoints). Every answer is kept in <run dir>/requests.jsonl, so a run "
                     "started again resends nothing already answered")
    e.add_argument("--endpoint-model", metavar="NAME",
                   help="the served model to evaluate (default: the only one /v1/models lists)")
    e.add_argument("--api-key-env", metavar="VAR",
                   help="environment variable holding the API key, sent as 'Authorization: "
                        "Bearer' when set (default: OPENAI_API_KEY)")
    e.add_argument("--concurrency", type=int, metavar="N", help="requests in flight at once (default 8)")
    e.add_argument("--timeout", type=float, metavar="SECONDS", help="seconds to wait for one answer (default 600)")
    e.add_argument("--max-retries", type=int, metavar="N",
                   help="retries of a request that met a connection error, a timeout, HTTP 429 "
                        "or 5xx, with exponential backoff (default 5)")
    e.add_argument("--api", choices=["completions", "chat"],
                   help="completions (default): /v1/completions, which gives log-likelihoods "
                        "(prompt logprobs with echo) and plain generation, chat requests going to "
                        "/v1/chat/completions; chat: /v1/chat/completions only (no "
                        "log-likelihoods: multiple choice needs --mc-mode generate)")
    e.add_argument("--tokenizer", metavar="DIR",
                   help="a local Hugging Face tokenizer directory of the served model (default: "
                        "the server's /tokenize and /detokenize)")
    e.add_argument("--max-length", type=int, metavar="N",
                   help="the model's context window in tokens (default: max_model_len from "
                        "/v1/models)")
    e.add_argument("--no-request-cache", action="store_true",
                   help="neither read nor write <run dir>/requests.jsonl")
    p.add_argument("--backend", choices=["hcx", "lm-eval"], default="hcx",
                   help="hcx (default): the tasks in eval/tasks; lm-eval: lm-evaluation-"
                        "harness's own Korean tasks (kobest_*) on the local data")
    p.add_argument("--judge", metavar="JUDGE",
                   help="the LLM judge of judged tasks (mt_bench, ko_mt_bench; suite chat): "
                        "an hcx checkpoint (run at --tp beside the model; the model's own path "
                        "reuses it), a Hugging Face directory, or an endpoint URL")
    p.add_argument("--list", action="store_true", help="list tasks and suites and exit")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "report", help="bilingual report (Markdown, HTML, JSON) from evaluation run dirs",
        description="Compare evaluation run directories (written by hcx eval), the first "
                    "being the baseline: Korean and English side by side, category averages, "
                    "every task's metrics with standard errors and deltas, plots. Writes "
                    "report.md, a self-contained report.html and report.json.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder (default: <last RUN_DIR>/report)")
    p.add_argument("--title", help="report title")
    p.set_defaults(func=cmd_report)

