"""The one way a training stage runs.

A stage (pretraining, SFT, DPO and its family, reward models, f-DPG) is a subclass of
:class:`Stage` that declares

- ``section``: the recipe section it reads (``sft``, ``align``; None for pretraining);
- :meth:`Stage.rules`: the recipe rules it adds to the shared ones, as ``(key, message)``
  pairs, so ``--check`` refuses a recipe before any process starts, naming ``file:line``;
- :meth:`Stage.read`: its data, read before the process group exists (reading a large
  source can outlast any collective's timeout);
- :meth:`Stage.tasks`: the :class:`~hcx.engine.loop.TrainingTask` to train and an optional
  validation task, once the engine is built and restored;

and :func:`run_stage` does the rest identically for all of them: tokenizer (whose files
every checkpoint carries), vocabulary, process group, engine, ``recipe.json``, resume or
``init_from``, the loop (which also restores the task's own state), shutdown.
"""

from __future__ import annotations

from typing import Any, Callable

from hcx.config import Recipe, refuse
from hcx.engine.checkpoint import tokenizer_bundle
from hcx.engine.loop import (Engine, TrainingTask, build_engine, log_rank0, restore, train,
                             write_run_recipe)
from hcx.engine.model import check_machine, model_vocab_size
from hcx.engine.parallel import Topology, initialize, shutdown
from hcx.tokenizer.loading import Tokenizer, load_tokenizer


class Stage:
    """A training stage on the shared engine (see the module docstring)."""

    name: str = ""
    section: str | None = None  # the recipe section this stage reads
    per_token_loss: bool = True  # megatron's calculate_per_token_loss (see build_engine)
    # Context parallelism splits each sequence over parallel.cp ranks: a stage must cut
    # its batches into those parts (hcx.engine.batches.context_parallel_part).
    context_parallel: bool = False

    def rules(self, recipe: Recipe) -> list[tuple[str, str]]:
        """``(key, message)`` for every rule of this stage the recipe breaks."""
        return []

    def resolve(self, recipe: Recipe) -> Recipe:
        """The recipe as this stage runs it, checked: its own section only (see
        :meth:`hcx.config.Recipe.for_stage`); raises RecipeError naming ``file:line``."""
        recipe = recipe.for_stage(self.section)
        rules = self.rules(recipe)
        if recipe.parallel.cp > 1 and not self.context_parallel:
            rules.append(("parallel.cp", f"parallel.cp={recipe.parallel.cp}: context "
                          f"parallelism is implemented for pretraining only, not for "
                          f"{self.name or 'this stage'}; use parallel.cp=1 (and full "
                          "recomputation for long sequences)"))
        refuse(recipe, rules)
        return recipe

    def read(self, recipe: Recipe, tokenizer: Tokenizer, log: Callable[[str], None]) -> Any:
        """This stage's data, before any process group exists. Every process reads it."""
        return None

    def before_engine(self, recipe: Recipe, topo: Topology, vocab_size: int, data: Any,
                      tokenizer: Tokenizer) -> Any:
        """Collective work before the model and its optimizer exist (a reference model's
        log-probs, when that model should be the only one in memory). Returns ``data``."""
        return data

    def modify_model(self, recipe: Recipe) -> Callable[[Any], None] | None:
        """A change to the built model before DDP sees it (a reward head)."""
        return None

    def restore(self, engine: Engine) -> None:
        """Resume the run's own checkpoint, else load ``checkpoint.init_from``."""
        restore(engine)

    def tasks(self, engine: Engine, tokenizer: Tokenizer,
              data: Any) -> tuple[TrainingTask, TrainingTask | None]:
        """The training task and the validation task (None: no validation pass)."""
        raise NotImplementedError


def run_stage(stage: Stage, recipe: Recipe) -> list[dict[str, Any]]:
    """Train ``recipe`` with ``stage`` in this process (one of the recipe's world size of
    processes: torchrun starts them). Returns the loop's per-step records."""
    recipe = stage.resolve(recipe)
    check_machine(recipe)  # FP8 / context parallelism need CUDA and Transformer Engine
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    # Its files, read with it (every process, before any collective can wait on a failure):
    # each checkpoint carries them, so it opens wherever it is moved.
    tokenizer_files = tokenizer_bundle(recipe.data.tokenizer)
    vocab = model_vocab_size(recipe, tokenizer.vocab_size)
    data = stage.read(recipe, tokenizer, log_rank0)
    topo = initialize(recipe.parallel, recipe.train.seed)
    try:
        data = stage.before_engine(recipe, topo, vocab, data, tokenizer)
        engine = build_engine(recipe, vocab, per_token_loss=stage.per_token_loss,
                              modify_model=stage.modify_model(recipe))
        engine.tokenizer_files = tokenizer_files if topo.rank == 0 else None  # rank 0 saves it
        write_run_recipe(engine)
        stage.restore(engine)
        task, valid = stage.tasks(engine, tokenizer, data)
        return train(engine, task, valid)
    finally:
        shutdown()
