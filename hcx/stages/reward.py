"""Bradley-Terry reward models (``align.method: reward``) and scoring with them.

The model is the policy's decoder (megatron-core ``GPTModel``) with its vocabulary
projection replaced by a scalar head, :class:`RewardHead`: ``r = w . h + b`` on the
final hidden states (after the final norm). It trains on the shared loop
(:mod:`hcx.engine.loop`) with the paired preference data of :mod:`hcx.stages.align` and the loss
:func:`hcx.stages.losses.bradley_terry_loss` (-log sigmoid(r_chosen - r_rejected)).

Where the reward is read: a row is a prompt and one completion, ``ids`` of length
``L``; the reward is the head's value at input position ``L - 1``, the hidden state of
the row's final token (the completion's ``<|endofturn|>``, unless the completion was cut
to fit), which has seen the whole row. For that token to be an *input*, training rows
are cut to ``data.seq_length`` tokens (not ``seq_length + 1`` as for the log-prob
methods, whose last token is only a label). In a batch from
:func:`hcx.stages.preference.rows_to_batch` that position is one after the last 1 of
``loss_mask`` (``loss_mask[j] = 1``: label ``j``, i.e. token ``j + 1``, is a completion
token): :func:`reward_positions`. Scoring takes ``lengths`` and reads ``lengths - 1``:
the same position.

The head starts with zero bias and weights drawn from N(0, (model.init_std / sqrt(hidden))^2),
from a generator seeded with ``train.seed`` (the same on every rank and layout): rewards
of about +-init_std at the start whatever the width, so the first losses are close to
log 2 and the backbone still gets gradients from the first step (Adam's steps do not
depend on the gradient's scale).

Checkpoints: the head's parameters are the model's ``output_layer.weight`` [1, hidden]
and ``output_layer.bias`` [1] (megatron's GPTModel keeps looking for an
``output_layer.weight`` entry), stored in the dist checkpoint under their own keys
``output_layer.reward_head.weight`` / ``.bias``, replicated over TP and DP: the
vocabulary projection of an SFT checkpoint never lands in the head, and a language model
with its own output layer refuses a reward checkpoint (it has no ``output_layer.weight``).
``checkpoint.init_from`` (the SFT model) fills every other tensor and must hold all of
them; the head keeps its fresh init (or takes the stored one when ``init_from`` is itself a
reward checkpoint). Resuming the run's own checkpoints is the loop's usual resume.

Parallelism: the head is replicated on the TP ranks; with sequence parallelism the
sequence is gathered first (backward: each rank keeps its own slice of the gradient),
so every TP rank computes the same rewards, loss and head gradients. Pipeline
parallelism works for untied embeddings (the head is on the last stage); tied
embeddings with ``parallel.pp > 1`` are refused (megatron would all-reduce the
embedding's gradient with the head's). Scoring runs at ``pp == 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hcx.engine import checkpoint as ckpt
from hcx.stages.loss_helpers import loop_output
from hcx.stages.losses import bradley_terry_loss
from hcx.stages import preference
from hcx.data.sources import raw_source_errors
from hcx.engine.loop import restore
from hcx.engine.scoring import freeze
from hcx.engine.stage import Stage
from hcx.stages.align import AlignError, AlignTask, held_out_errors, load_examples
from hcx.errors import HcxError
from hcx.engine.parallel import device

HEAD_CHECKPOINT_NAME = "reward_head"  # checkpoint keys: <prefix>reward_head.{weight,bias}


class RewardError(HcxError, ValueError):
    pass


# --- the model ---------------------------------------------------------------------------


class RewardHead(torch.nn.Module):
    """A linear map from the hidden size to one value, in place of GPTModel's output
    layer: called as megatron calls that layer, ``head(hidden_states, weight=...,
    runtime_gather_output=...)`` -> ``(values [s, b, 1], None)``; ``weight`` (the tied
    embedding) is ignored. GPTModel's forward with ``labels=None`` then returns the
    values ``[b, s, 1]``, and no vocabulary projection is computed anywhere."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32, *,
                 std: float = 0.0, seed: int = 0, sequence_parallel: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(1, hidden_size, generator=g, dtype=torch.float32) * std
        self.weight = torch.nn.Parameter(w.to(dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # The loss after the head is replicated on the TP ranks, so the backward
            # keeps this rank's slice of the gradient instead of summing the ranks'.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        return F.linear(hidden_states, self.weight, self.bias), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Replicated tensors (one writer: TP rank 0 of DP rank 0) under their own keys."""
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        return {f"{prefix}{name}": make_sharded_tensor_for_checkpoint(
                    p, f"{prefix}{HEAD_CHECKPOINT_NAME}.{name}",
                    prepend_offsets=sharded_offsets)
                for name, p in self.named_parameters()}


def check_layout(recipe) -> None:
    if recipe.model.tie_embeddings and recipe.parallel.pp > 1:
        raise RewardError(
            "a reward model with model.tie_embeddings=true cannot run at parallel.pp="
            f"{recipe.parallel.pp}: the last stage would share its output layer (now the "
            "reward head) with the embedding; set parallel.pp=1 (use parallel.tp to split "
            "the model)")


def head_init_std(recipe) -> float:
    return recipe.model.init_std / math.sqrt(recipe.model.hidden_size)


def attach_head(model, recipe) -> None:
    """``build_engine``'s ``modify_model``: swap the last stage's output layer for a
    :class:`RewardHead` (other pipeline stages have none)."""
    check_layout(recipe)
    if not model.post_process:
        return
    model.output_layer = RewardHead(
        model.config.hidden_size, model.config.params_dtype, std=head_init_std(recipe),
        seed=recipe.train.seed, sequence_parallel=model.config.sequence_parallel)


def reward_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Input position of each row's final token, ``[rows]``: one after the last 1 of
    ``loss_mask`` (see the module docstring)."""
    mask = loss_mask > 0
    if not bool(mask.any(1).all()):
        raise RewardError("a row has no completion tokens: nothing to score")
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    pos = last + 1
    if bool((pos >= mask.shape[1]).any()):
        raise RewardError("a row's final token is not an input of the sequence: reward rows "
                          "must fit data.seq_length tokens (hcx.stages.reward cuts them so)")
    return pos


def values_at(output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The head's values ``[rows]`` at ``positions`` from GPTModel's output
    ``[rows, s(, 1)]``."""
    values = output.reshape(output.shape[0], output.shape[1]).float()
    return values.gather(1, positions.to(values.device).long().unsqueeze(1)).squeeze(1)


# --- loading weights ---------------------------------------------------------------------


def _head_keys(state: dict) -> set[str]:
    """State-dict keys of the reward head's tensors."""
    return {k for k, v in state.items()
            if f".{HEAD_CHECKPOINT_NAME}." in "." + getattr(v, "key", "")}


def load_backbone(path: Path, model, log=print) -> bool:
    """Load every tensor of ``model`` except the reward head from the checkpoint ``path``
    (an SFT or other language-model checkpoint; its vocabulary projection is not read).
    A reward checkpoint's head is loaded too. Returns whether the head was loaded."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    ckpt.verify_contents(path, log)
    state = model.sharded_state_dict()
    head = _head_keys(state)
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    with_head = bool(head) and all(state[k].key in saved for k in head)
    wanted = state if with_head else {k: v for k, v in state.items() if k not in head}
    missing = [s.key for s in nested_values(wanted)
               if isinstance(s, ShardedTensor) and s.key not in saved]
    if missing:
        raise ckpt.CheckpointError(
            f"checkpoint.init_from {path} has no tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": a reward model starts from a checkpoint of the same model (the SFT model), "
            "which must hold every tensor but the output layer")
    ckpt.check_shapes(path, wanted)
    try:
        # Nested as hcx.engine.checkpoint saves it; the checkpoint's common (non-sharded) state
        # comes back merged in, so take the model's part.
        loaded = dist_checkpointing.load({"model": wanted}, str(path))["model"]
    except Exception as e:  # noqa: BLE001 - name the checkpoint
        raise ckpt.CheckpointError(f"cannot load {path} into the reward model: {e}") from e
    missing_keys, unexpected = model.load_state_dict(loaded, strict=False)
    left = [k for k in missing_keys if k not in head and not k.endswith("_extra_state")]
    if left or unexpected:
        raise ckpt.CheckpointError(f"{path}: loading left {left or unexpected} unset")
    return with_head


# --- training ----------------------------------------------------------------------------


class RewardTask(AlignTask):
    """Bradley-Terry on the shared loop: AlignTask's micro-batches (chosen rows, then
    rejected rows), rewards read by :func:`reward_positions`, and AlignTask's reporting
    convention (the loss sums over pairs and reports their count, so a step's gradient
    is the mean over the global batch's pairs)."""

    def forward_step(self, model, batch):
        dev = device()
        tokens = batch["tokens"].to(dev)
        pos = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
        output = model(tokens, pos, None)  # labels=None: the head's values [rows, s, 1]
        return output, partial(self.loss, batch)

    def loss(self, batch, output):
        dev = output.device
        rewards = values_at(output, reward_positions(batch["loss_mask"]).to(dev))
        mb = rewards.numel() // 2
        losses, metrics = bradley_terry_loss(
            rewards[:mb], rewards[mb:], center_rewards_coefficient=self.cfg.center_rewards)
        return loop_output(losses, metrics)


def rows_recipe(recipe):
    """The recipe :func:`hcx.stages.align.load_examples` cuts reward rows with: rows of at most
    ``data.seq_length`` tokens, so each row's final token is an input."""
    return recipe.model_copy(update={"data": recipe.data.model_copy(
        update={"seq_length": recipe.data.seq_length - 1})})


def restore_reward_model(engine) -> None:
    """Resume from the run's own newest checkpoint (:func:`hcx.engine.loop.restore`),
    else load ``checkpoint.init_from`` into the backbone (:func:`load_backbone`)."""
    from hcx.paths import resolve

    r = engine.recipe

    def own() -> bool:
        if not r.checkpoint.resume:  # train.restore refuses to write over them
            return bool(ckpt.complete_checkpoints(r.checkpoint_dir))
        return ckpt.find_resumable(r.checkpoint_dir, log=lambda _: None) is not None

    if ckpt.on_rank0(own, "looking for a checkpoint to resume from"):
        restore(engine)
        return
    if not r.checkpoint.init_from:
        engine.log("reward: no checkpoint.init_from: the backbone starts from random weights")
        return
    path = ckpt.checkpoint_path(resolve(r.checkpoint.init_from))
    with_head = load_backbone(path, engine.model, log=engine.log)
    if engine.optimizer is not None:
        engine.optimizer.reload_model_params()
    engine.log(f"checkpoint: initialized the backbone from {path}; reward head "
               + ("from the same checkpoint" if with_head
                  else f"new (std {head_init_std(r):.3g}, zero bias)"))


class RewardStage(Stage):
    """``hcx align`` with ``align.method: reward``: train a Bradley-Terry reward model."""

    name = "reward"
    section = "align"

    def rules(self, recipe):
        problems = raw_source_errors(recipe.data.sources, "preference examples")
        problems += held_out_errors(recipe)
        if recipe.model.tie_embeddings and recipe.parallel.pp > 1:
            problems.append(("parallel.pp", "align.method=reward with "
                             "model.tie_embeddings=true needs parallel.pp=1 (the reward head "
                             "replaces the output layer the last stage would share)"))
        return problems

    def read(self, recipe, tokenizer, log):
        return load_examples(rows_recipe(recipe), tokenizer, log)

    def modify_model(self, recipe):
        return partial(attach_head, recipe=recipe)

    def restore(self, engine):
        restore_reward_model(engine)

    def tasks(self, engine, tokenizer, data):
        examples, valid = data
        task = RewardTask(engine, examples, tokenizer.pad)
        valid_task = (RewardTask(engine, valid, tokenizer.pad, held_out=True)
                      if valid and engine.recipe.data.eval_every else None)
        return task, valid_task


# --- scoring -----------------------------------------------------------------------------


@torch.no_grad()
def rewards(model, tokens: torch.Tensor, lengths: torch.Tensor | list[int]) -> torch.Tensor:
    """Rewards ``[b]`` (float32, CPU) of right-padded rows ``tokens`` ``[b, s]`` whose
    first ``lengths[i]`` tokens are real: the head's value at position ``lengths - 1``.

    ``model``: a reward model of ``pp == 1`` (:func:`load_reward_model`'s ``.module``, or
    a training engine's model at pp=1). Collective over TP: every TP rank passes the
    same rows and gets the same values."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    b, s = tokens.shape
    if lengths.shape != (b,) or bool((lengths < 1).any()) or bool((lengths > s).any()):
        raise RewardError(f"lengths must be {b} values in 1..{s}, got {lengths.tolist()}")
    dev = device()
    tokens = tokens.to(dev)
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    training = model.training
    model.eval()
    try:
        output = model(tokens, pos, None)
    finally:
        model.train(training)
    return values_at(output, lengths - 1).to("cpu")


def is_reward_checkpoint(path: Path) -> bool:
    from hcx.engine.inference import checkpoint_recipe

    return recipe_method(checkpoint_recipe(ckpt.checkpoint_path(Path(path)))) == "reward"


def recipe_method(recipe) -> str | None:
    """The alignment method a checkpoint's recipe records (None: not an alignment run;
    checkpoints of earlier hcx versions record the default, dpo, for every stage)."""
    return recipe.align.method if recipe.align is not None else None


@dataclass
class RewardModel:
    """A trained reward model, frozen, on this rank (TP shard; pp = 1)."""

    module: Any  # GPTModel with a RewardHead (Float16Module around it in bf16)
    recipe: Any  # the checkpoint's recipe (model shape, tokenizer, seq_length)
    path: Path
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from hcx.tokenizer.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.recipe.data.tokenizer)
        return self._tokenizer

    @property
    def seq_length(self) -> int:
        return self.recipe.data.seq_length

    def rewards(self, tokens: torch.Tensor, lengths) -> torch.Tensor:
        return rewards(self.module, tokens, lengths)

    def encode(self, prompt, completion) -> list[int]:
        """Token ids of a prompt (a string = one user turn, or chat messages) and an
        assistant completion (a string, or assistant messages), laid out and cut as the
        training rows were (the prompt loses its oldest tokens first)."""
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        head, tail = preference.encode(prompt, completion, self.tokenizer)
        head, [tail] = preference.fit(head, [tail], self.seq_length, self.recipe.align.max_prompt_length)
        return head + tail

    def score(self, prompts: list, completions: list, batch_size: int = 8) -> list[float]:
        """Rewards of (prompt, completion) pairs; completions are scored as finished
        assistant turns (ending with ``<|endofturn|>``). Collective over TP."""
        if len(prompts) != len(completions):
            raise RewardError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            width = max(len(r) for r in chunk)
            pad = self.tokenizer.pad if self.tokenizer.pad is not None else self.tokenizer.eod
            tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
            for j, r in enumerate(chunk):
                tokens[j, :len(r)] = torch.tensor(r)
            out += self.rewards(tokens, [len(r) for r in chunk]).tolist()
        return out

    __call__ = score  # the f-DPG scorer protocol: (prompts, completions) -> floats


def load_reward_model(path, layout=None, log=print) -> RewardModel:
    """Open a reward checkpoint (a step directory, or a checkpoints directory: its
    latest) for scoring at the current tensor-parallel size, frozen.

    ``layout``: the caller's recipe (its ``parallel.tp`` must be megatron's current TP
    size; its ``train.precision`` is used); None = the checkpoint's precision. Without
    initialized process groups, a single process (TP=1) is set up. The model's shape comes
    from the checkpoint's recorded recipe, which must be a reward model's
    (``align.method: reward``)."""
    from megatron.core import parallel_state as ps

    from hcx.engine.inference import checkpoint_recipe, inference_recipe
    from hcx.engine.model import build_gpt, compute_dtype, padded_vocab_size
    from hcx.engine.model import model_vocab_size

    path = ckpt.checkpoint_path(Path(path))
    saved = checkpoint_recipe(path)
    if recipe_method(saved) != "reward":
        has = (f"align.method={recipe_method(saved)}" if saved.align is not None
               else "no align section (an SFT or pretraining run)")
        raise RewardError(f"{path} is not a reward model checkpoint: its recipe has {has}; "
                          "train one with `hcx align` and align.method: reward")
    if not ps.model_parallel_is_initialized():
        from hcx.config import ParallelConfig
        from hcx.engine.parallel import initialize

        initialize(ParallelConfig(), saved.train.seed)
    tp = ps.get_tensor_model_parallel_world_size()
    if layout is not None and layout.parallel.tp != tp:
        raise RewardError(f"layout has parallel.tp={layout.parallel.tp} but this process "
                          f"runs at tensor-parallel size {tp}")
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise RewardError("a reward model scores at pipeline size 1: set parallel.pp=1")
    recipe = inference_recipe(saved, tp)
    precision = layout.train.precision if layout is not None else saved.train.precision
    dtype = compute_dtype(precision)
    model_obj = RewardModel(None, saved, path)
    vocab = padded_vocab_size(model_vocab_size(saved, model_obj.tokenizer.vocab_size), tp)
    model = build_gpt(recipe.model, recipe.parallel, vocab, recipe.data.seq_length, dtype,
                      pre_process=True, post_process=True)
    attach_head(model, recipe)
    model_obj.module = freeze(model, path, dtype, log)
    log(f"reward: scoring with {path} (tp={tp})")
    return model_obj
