"""The training loop: one loop for pretraining, SFT and alignment.

A stage trains a :class:`TrainingTask`: how to get this rank's micro-batches for a step
and how to turn one micro-batch into a loss. Everything else (parallelism, precision,
megatron's pipeline schedules, optimizer, LR schedule, checkpoints, metrics, NaN
guard) lives here once.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from hcx.engine import checkpoint as ckpt
from hcx.engine.batches import rank_microbatches
from hcx.engine import metrics, tracking, trainable
from hcx.config import Recipe
from hcx.errors import HcxError, Stopped
from hcx.engine.model import build_gpt, check_machine, compute_dtype, padded_vocab_size
from hcx.engine.optim import build_optimizer, build_scheduler, sync_params, wrap_ddp
from hcx.engine.parallel import Topology, device, initialize


class NonFiniteLoss(HcxError, RuntimeError):
    pass


class _StopSignals:
    """Remembers SIGTERM/SIGINT (SLURM preemption, scancel, Ctrl-C forwarded by torchrun)
    so the loop can stop after the current step. Ranks agree on it collectively:
    one rank acting alone would deadlock the others in the next collective."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        # A second signal is not ignored: it gets the usual behaviour (for a hung step).
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def agreed(self) -> int:
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingTask(Protocol):
    """What makes a training stage: everything the loop asks of one."""

    rows_per_microbatch: int
    """Sequences in one micro-batch (it sets the pipeline's tensor shapes): usually
    ``train.micro_batch_size``; a preference example holds two (chosen and rejected)."""

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This DP rank's micro-batches for optimizer step ``step`` (0-based)."""

    def forward_step(self, model, batch: dict[str, torch.Tensor]):
        """Run the model on a batch; return ``(output, loss_func)`` as megatron's
        schedules expect. ``loss_func(output)`` returns ``(loss_sum, num_tokens,
        {"loss": tensor([sum, count]), ...})``."""

    def state_dict(self) -> dict[str, Any]:
        """State of the task that a resumed run needs (BCO's running reward mean,
        f-DPG's partition estimate): JSON-able, saved in the checkpoint's metadata.
        Called on every rank (it may be collective)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned (called when resuming)."""


def log_rank0(msg: str) -> None:
    """Print once per job, not once per process."""
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        print(msg, flush=True)


@dataclass
class Engine:
    """The model and its optimizer on this rank, ready to train or to run."""

    recipe: Recipe
    topo: Topology
    model: Any  # the GPTModel stage (unwrapped)
    ddp: Any  # megatron DDP around it (what the schedules and optimizer see)
    optimizer: Any
    scheduler: Any
    dtype: torch.dtype
    vocab_size: int
    log: Callable[[str], None] = log_rank0
    start_step: int = 0
    consumed_samples: int = 0  # data position at start_step
    resumed: dict[str, Any] | None = None  # the metadata of the checkpoint resumed from
    # The tokenizer files each checkpoint carries (rank 0; None: bytes, or other ranks).
    tokenizer_files: ckpt.TokenizerBundle | None = None

    def first_sample(self, step: int) -> int:
        """The data position at the start of (0-based) ``step``: samples consumed so far."""
        return self.consumed_samples + (step - self.start_step) * self.recipe.train.global_batch_size

    def microbatch_positions(self, step: int, held_out: bool = False) -> list[range]:
        """The data positions of this DP rank's micro-batches for ``step``: from the
        run's data position, or from ``step * global_batch_size`` for a fixed validation
        pass (``held_out``)."""
        t = self.recipe.train
        first = step * t.global_batch_size if held_out else self.first_sample(step)
        return rank_microbatches(first, t.global_batch_size, t.micro_batch_size,
                                 self.topo.dp, self.topo.dp_rank)


def build_engine(recipe: Recipe, vocab_size: int, with_optimizer: bool = True,
                 per_token_loss: bool = False,
                 modify_model: Callable[[Any], None] | None = None) -> Engine:
    """Initialize distributed state and build model (+ optimizer and schedule).

    ``per_token_loss``: the step's gradient is the mean over every loss token of the
    global batch (megatron's ``calculate_per_token_loss``), not the mean of
    per-micro-batch means. The two agree when micro-batches hold equal token counts
    (pretraining); with loss masks of varying size (SFT) only the first is the mean.
    ``modify_model(model)`` changes the built stage before DDP and the optimizer see its
    parameters (a reward model swaps the output layer for a scalar head)."""
    check_machine(recipe)  # FP8 / context parallelism: before any process group exists
    topo = initialize(recipe.parallel, recipe.train.seed)
    dtype = compute_dtype(recipe.train.precision)
    padded = padded_vocab_size(vocab_size, recipe.parallel.tp)
    t = recipe.train
    model = build_gpt(recipe.model, recipe.parallel, padded, recipe.data.seq_length, dtype,
                      pre_process=topo.is_first_stage, post_process=topo.is_last_stage,
                      recompute=t.recompute, recompute_method=t.recompute_method,
                      recompute_num_layers=t.recompute_num_layers, fp8=t.fp8)
    # Before DDP is built: it sets its gradient scaling from this flag.
    model.config.calculate_per_token_loss = per_token_loss
    if modify_model is not None:
        modify_model(model)
    # train.trainable: freeze before DDP and the optimizer see the parameters.
    masked = trainable.apply(model, recipe, vocab_size, log=log_rank0) if with_optimizer else {}
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    module = model
    if dtype == torch.bfloat16:
        from megatron.core.transformer.module import Float16Module

        module = Float16Module(model.config, model)
    ddp = wrap_ddp(recipe, module, model.config)
    optimizer = scheduler = None
    if with_optimizer:
        from megatron.core.distributed import finalize_model_grads

        optimizer = build_optimizer(recipe, [ddp], dtype)
        scheduler = build_scheduler(recipe, optimizer)
        # As Megatron-LM's training.py: DP/TP grad reduction (incl. tied embeddings
        # across pipeline stages and sequence-parallel norms) after the backward pass.
        model.config.finalize_model_grads_func = trainable.after_reduction(finalize_model_grads,
                                                                           masked)
        model.config.grad_scale_func = optimizer.scale_loss
    return Engine(recipe, topo, model, ddp, optimizer, scheduler, dtype, padded)


def write_run_recipe(engine: Engine) -> None:
    """``<output_dir>/recipe.json``: the resolved recipe of the run (rank 0)."""
    import json

    if engine.topo.rank == 0:
        out = Path(engine.recipe.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(engine.recipe.to_dict(), indent=1,
                                                    ensure_ascii=False))


def restore(engine: Engine) -> None:
    """Resume from the newest complete checkpoint, or load ``init_from`` weights."""
    r = engine.recipe

    def refuse_existing() -> None:
        existing = ckpt.complete_checkpoints(r.checkpoint_dir)
        if existing:
            raise ckpt.CheckpointError(
                f"{r.checkpoint_dir} already holds checkpoints (newest {existing[-1].name}) "
                "and checkpoint.resume is false: use a new output_dir or checkpoint.dir, "
                "remove them, or set checkpoint.resume=true"
            )

    found = None
    if r.checkpoint.resume:  # the newest checkpoint whose files verify (all ranks check)
        found = ckpt.resume_point(r.checkpoint_dir, log=engine.log)
    else:
        ckpt.on_rank0(refuse_existing, "looking for a checkpoint to resume from")
    if found is not None:
        meta = ckpt.load(found, engine.model, engine.optimizer, engine.scheduler,
                         log=engine.log, fully_parallel=r.checkpoint.fully_parallel_load)
        engine.start_step = meta["step"]
        engine.resumed = meta
        engine.consumed_samples = meta.get("consumed_samples", meta["step"] * r.train.global_batch_size)
        _warn_on_changed_recipe(engine, meta.get("recipe", {}))
        engine.log(f"checkpoint: resumed from {found} at step {meta['step']}")
    elif r.checkpoint.init_from:
        from hcx.paths import resolve

        path = ckpt.checkpoint_path(resolve(r.checkpoint.init_from))
        ckpt.load(path, engine.model, None, None, restore_rng=False, log=engine.log,
                  fully_parallel=r.checkpoint.fully_parallel_load)
        if engine.optimizer is not None:
            # The optimizer's fp32 main weights were copied from the random init when it
            # was built; with bf16 its first step would write them back over the loaded ones.
            engine.optimizer.reload_model_params()
        engine.log(f"checkpoint: initialized weights from {path}")


def _warn_on_changed_recipe(engine: Engine, saved: dict) -> None:
    """Resuming with another schedule or data is allowed (that is how runs are extended),
    but it is not the uninterrupted run any more: say what changed."""
    now = engine.recipe.to_dict()
    keys = [("train", "steps"), ("train", "global_batch_size"), ("train", "seed"),
            ("train", "lr"), ("train", "min_lr"), ("train", "decay_style"),
            ("train", "decay_steps"), ("train", "warmup_steps"), ("data", "sources"),
            ("data", "split"), ("data", "seq_length"), ("data", "tokenizer")]
    changed = [f"{a}.{b}" for a, b in keys if saved.get(a, {}).get(b) != now[a][b]]
    if saved and changed:
        engine.log(f"checkpoint: resuming with changed {', '.join(changed)}: the LR schedule "
                   "follows the recipe from the saved position; sample order may differ from "
                   "an uninterrupted run where data repeats")


def _reduce_loss(engine: Engine, losses: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted mean of every reported quantity over micro-batches and DP ranks,
    made known to every rank (it is computed on the last pipeline stage only)."""
    from megatron.core import parallel_state as ps

    keys = sorted(losses[0]) if losses else []
    # All ranks need the same tensor shape: the last stage's keys decide.
    names = [keys]
    if engine.topo.pp > 1:
        dist.broadcast_object_list(names, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    keys = names[0]
    # On the device: NCCL only reduces GPU tensors.
    totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=device())
    if engine.topo.is_last_stage:
        for mb in losses:
            for i, k in enumerate(keys):
                totals[i] += mb[k].detach().to(totals.device, torch.float64)
        if engine.topo.dp * engine.topo.cp > 1:  # CP ranks hold parts of each sequence
            dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    if engine.topo.pp > 1:
        dist.broadcast(totals, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return {k: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}


def run_step(engine: Engine, task: TrainingTask, step: int, forward_only: bool = False,
             batches: list | None = None) -> dict[str, float]:
    """One optimizer step (or, with forward_only, one evaluation pass)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    r = engine.recipe
    mbs = batches if batches is not None else task.microbatches(step)
    # Sequences per micro-batch: an alignment example holds two (chosen and rejected).
    rows = task.rows_per_microbatch
    if not forward_only:
        engine.ddp.zero_grad_buffer()
        engine.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=lambda it, model: task.forward_step(model, next(it)),
        data_iterator=iter(mbs),
        model=[engine.ddp],
        num_microbatches=len(mbs),
        seq_length=r.data.seq_length,
        micro_batch_size=rows,
        forward_only=forward_only,
    )
    return _reduce_loss(engine, losses)


def train(engine: Engine, task: TrainingTask,
          valid_task: TrainingTask | None = None) -> list[dict[str, Any]]:
    """Train from ``engine.start_step`` to ``recipe.train.steps``. Returns the records."""
    r, topo = engine.recipe, engine.topo
    t = r.train
    flops_per_token = metrics.training_flops_per_token(r.model, engine.vocab_size, r.data.seq_length)
    peak = metrics.peak_tflops(r.logging.peak_tflops, engine.dtype)
    tokens_per_step = t.global_batch_size * r.data.seq_length
    logger = None
    trackers = tracking.Trackers([])
    if topo.is_logging_rank:
        logger = metrics.MetricsLogger(Path(r.output_dir), t.steps, engine.start_step,
                                 r.logging.tensorboard, r.logging.progress, r.logging.log_every)
        # W&B / MLflow (logging.wandb, logging.mlflow): the same scalars + the recipe.
        trackers = tracking.Trackers.from_recipe(r, Path(r.output_dir))
    records = []
    saved_state = (engine.resumed or {}).get("task_state")
    if saved_state:
        task.load_state_dict(saved_state)
    if engine.start_step >= t.steps:
        engine.log(f"nothing to do: the run is already at step {engine.start_step} of {t.steps} "
                   "(raise train.steps to continue)")

    def saved_message(path: Path) -> None:
        if logger:
            logger.write(f"checkpoint: saved {path}")

    c = r.checkpoint
    saver = ckpt.Saver(r.checkpoint_dir, c.keep_last, async_save=c.async_save,
                       fully_parallel=c.fully_parallel_save, tokenizer=engine.tokenizer_files,
                       on_saved=saved_message, log=engine.log)

    def save(done: int) -> None:
        # A background save still in flight is published first: the task's state_dict may
        # clean up after the checkpoints that exist (J-BOND's anchors).
        saver.wait()
        sync_params(r, engine.ddp)  # overlap_param_gather: the weights as last updated
        extra = {"consumed_samples": engine.first_sample(done), "recipe": r.to_dict()}
        state = task.state_dict()  # a loss's own state (BCO's running reward mean)
        if state:
            extra["task_state"] = state
        path = saver.save(done, engine.model, engine.optimizer, engine.scheduler, extra)
        if logger and saver.pending:
            logger.write(f"checkpoint: writing {path} in the background")

    try:
        with _StopSignals() as signals:
            for step in range(engine.start_step, t.steps):
                done = step + 1
                t0 = time.perf_counter()
                reduced = run_step(engine, task, step)
                loss = reduced.get("loss", float("nan"))
                if not math.isfinite(loss):
                    saver.wait()  # the last good checkpoint, if still being written
                    raise NonFiniteLoss(
                        f"loss is {loss} at step {done}; stopping without saving. The last good "
                        f"checkpoint in {r.checkpoint_dir} is untouched; lower train.lr or check the "
                        "data of this step, then resume."
                    )
                lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step applies
                _, grad_norm, _ = engine.optimizer.step()
                if grad_norm is not None and not math.isfinite(grad_norm):
                    saver.wait()
                    raise NonFiniteLoss(
                        f"gradient norm is {grad_norm} at step {done}; stopping without saving. The "
                        f"last good checkpoint in {r.checkpoint_dir} is untouched."
                    )
                engine.scheduler.step(increment=t.global_batch_size)
                dt = time.perf_counter() - t0
                tflops = flops_per_token * tokens_per_step / dt / topo.world_size / 1e12
                record = {"step": done, **reduced,
                          "lr": lr,
                          "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                          "tokens": done * tokens_per_step,
                          "step_time_s": dt,
                          "tokens_per_s": tokens_per_step / dt,
                          "tflops": tflops}
                if peak:
                    record["mfu"] = tflops / peak
                if valid_task is not None and r.data.eval_every and done % r.data.eval_every == 0:
                    sync_params(r, engine.ddp)
                    passes = [run_step(engine, valid_task, k, forward_only=True)
                              for k in range(r.data.eval_batches)]
                    record.update({f"valid/{k}": sum(p[k] for p in passes) / len(passes)
                                   for k in passes[0]})
                records.append(record)
                if logger:
                    logger.log(record)
                trackers.log(record)
                saved = (r.checkpoint.save_every and done % r.checkpoint.save_every == 0) or done == t.steps
                if saved:
                    save(done)
                saver.poll()  # publish a finished background save
                signum = signals.agreed()
                if signum and done < t.steps:  # after the last step there is nothing to stop
                    if not saved:
                        save(done)
                    saver.wait()
                    raise Stopped(f"stopped by signal {signum} after step {done}; its checkpoint is "
                                  "saved: run the same command again to resume", signum)
            saver.wait()  # the final checkpoint
    finally:
        saver.abort()  # only a failure leaves a save in flight here
        if logger:
            logger.close()
        trackers.close()
    engine.log(f"done: metrics in {Path(r.output_dir) / 'metrics.jsonl'}, checkpoints in "
               f"{r.checkpoint_dir}")
    return records
