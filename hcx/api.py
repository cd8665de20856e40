"""The Python API: what a notebook needs, with the command line's behaviour.

Training runs in this process, so the recipe's layout must be a single process
(``parallel.tp = pp = dp = 1``) unless the caller is itself one of torchrun's processes;
the commands (``hcx pretrain ...``) start the processes a layout needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from hcx.config import Recipe
from hcx.config import load_recipe as _load

__all__ = ["load_recipe", "train", "pretrain", "sft", "align", "evaluate", "report"]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file with its ``base:`` chain and ``KEY=VALUE`` overrides, validated
    (errors name ``file:line``). Shipped recipes can be named without a path
    (``"tiny.yaml"``)."""
    from hcx.resources import recipe_path

    return _load(recipe_path(path), list(overrides))


def train(command: str, recipe: Recipe | str | Path,
          overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run a training stage (``pretrain``, ``sft`` or ``align``) in this process and return
    its per-step records (loss, learning rate, throughput, ...)."""
    import os

    from hcx.engine.stage import run_stage
    from hcx.errors import MachineError
    from hcx.stages import stage_for

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to a recipe file; pass the path instead")
    stage = stage_for(command, recipe)
    recipe = stage.resolve(recipe)
    if recipe.parallel.world_size > 1 and "WORLD_SIZE" not in os.environ:
        raise MachineError(f"the recipe needs {recipe.parallel.world_size} processes: run "
                           f"'hcx {command}' on it (it starts them), or set "
                           "parallel.tp=1 parallel.pp=1 parallel.dp=1")
    return run_stage(stage, recipe)


def pretrain(recipe: Recipe | str | Path, overrides: Sequence[str] = ()) -> list[dict]:
    """``hcx pretrain`` in this process."""
    return train("pretrain", recipe, overrides)


def sft(recipe: Recipe | str | Path, overrides: Sequence[str] = ()) -> list[dict]:
    """``hcx sft`` in this process."""
    return train("sft", recipe, overrides)


def align(recipe: Recipe | str | Path, overrides: Sequence[str] = ()) -> list[dict]:
    """``hcx align`` in this process (the method is ``align.method``)."""
    return train("align", recipe, overrides)


def evaluate(model: str | Path, tasks: Sequence[str], out: str | Path, *,
             limit: int | None = None, chat: bool = False, max_new_tokens: int | None = None,
             batch_size: int = 16, log: Callable[[str], None] | None = None,
             judge: str | Path | None = None) -> dict[str, Any]:
    """Evaluate an hcx checkpoint or a Hugging Face directory on tasks and suites (names
    as ``hcx eval --tasks`` takes them, or task YAML files) into the run directory
    ``out``; returns its scores (the contents of ``scores.json``). ``judge``: the LLM
    judge of judged tasks (MT-Bench), as ``hcx eval --judge`` takes it."""
    from hcx.evaluation.judged import need_judge
    from hcx.evaluation.models import Budget, open_model
    from hcx.evaluation.runner import evaluate as run
    from hcx.evaluation.tasks import resolve_tasks

    selected = resolve_tasks(list(tasks))
    need_judge(selected, judge)
    quiet = log or (lambda msg: None)
    budget = Budget(batch_size=batch_size)
    model_obj = open_model(str(model), log=quiet, budget=budget)
    judge_obj = None
    try:
        if judge is not None:
            same = Path(judge).exists() and Path(judge).resolve() == Path(model).resolve()
            judge_obj = model_obj if same else open_model(str(judge), log=quiet, budget=budget)
        return run(model_obj, selected, Path(out), limit=limit, chat=chat,
                   max_new_tokens=max_new_tokens, log=quiet, judge=judge_obj)
    finally:
        if judge_obj is not None and judge_obj is not model_obj:
            judge_obj.close()
        model_obj.close()


def report(run_dirs: Sequence[str | Path], out: str | Path, title: str | None = None
           ) -> dict[str, Path]:
    """The bilingual report comparing evaluation run directories (the first is the
    baseline); returns the written files by format (``md``, ``html``, ``json``)."""
    from hcx.evaluation.report import build_report

    return build_report([Path(d) for d in run_dirs], Path(out), title=title)
