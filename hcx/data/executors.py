"""Where ``hcx data prepare``'s datatrove stages run: datatrove's own local, SLURM and
Ray executors, configured from ``data.prepare`` (``workers`` and ``executor``).

hcx adds only a few things to datatrove's executors: a task's console output goes to its
log file alone (``<work>/logs/<stage>/logs/task_NNNNN.log``; the user sees hcx's
messages, and an error once, not a traceback per task), a local worker process exits when
the run that started it is gone (SIGKILL), the local fork server starts early, tasks start
in a given order (the most work first), a local worker receives its stage's executor once
rather than with every task, a task's log sinks are cheap to add, SLURM directives
that are not set are left out rather than written empty, and SLURM jobs follow ``hcx
launch``'s conventions (log names, requeue before the time limit).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import multiprocess
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.utils.logging import logger
from datatrove.utils.stats import PipelineStats

from hcx.config import Recipe


def cache_loguru_library_dirs() -> None:
    """Make loguru's ``logger.add`` ~20x cheaper (5 -> 0.3 ms).

    datatrove adds three loguru sinks per task (console, task log, and the default one
    again after it), and every ``add`` builds an exception formatter that asks
    ``sysconfig`` for the library directories of every install scheme: 5 ms each, ~15 ms
    per task, a tenth of a second per 10 small tasks on each worker. The answer only
    changes if ``sys.path`` does (it marks which frames are library code in a traceback),
    so one answer per process is enough. Without that private function (another loguru)
    nothing changes but the speed."""
    try:
        from loguru._better_exceptions import ExceptionFormatter
    except ImportError:
        return
    original = getattr(ExceptionFormatter, "_get_lib_dirs", None)
    if original is None or hasattr(original, "cache_info"):
        return
    ExceptionFormatter._get_lib_dirs = staticmethod(functools.cache(original))


cache_loguru_library_dirs()

_WATCHING: list[int] = []
# Where a task's console output goes. Never closed: datatrove's console sink, added for a
# task, stays registered after it and must still be writable.
_NULL = open(os.devnull, "w")  # noqa: SIM115


def _exit_with_parent() -> None:
    """In a local pool worker: exit once the process that forked it is gone (its parent is
    datatrove's fork server, which ends with the run), so a killed run leaves nothing
    running that could write into a rerun's files."""
    if _WATCHING:
        return
    _WATCHING.append(os.getppid())

    def watch():
        while os.getppid() == _WATCHING[0]:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _die_with_parent() -> None:
    """In a forked child (datatrove's local executor forks a multiprocessing manager):
    ask Linux to kill it when its parent dies, so a SIGKILLed run leaves nothing behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child ends with its work instead
        pass


_HOOKED: list[bool] = []


def reap_children_on_exit() -> None:
    """Children forked from now on die with this process (once per process)."""
    if not _HOOKED:
        os.register_at_fork(after_in_child=_die_with_parent)
        _HOOKED.append(True)


class _QuietTasks:
    """A task's log goes to its file only (datatrove also prints it to stderr), and the
    tasks start in ``order`` (when given): the most work first, so that the last ones to
    finish are small and the workers end together."""

    order: list[int] | None = None

    def get_incomplete_ranks(self, ranks=None, skip_completed=None) -> list[int]:
        left = super().get_incomplete_ranks(ranks, skip_completed)
        if not self.order:
            return left
        position = {rank: i for i, rank in enumerate(self.order)}
        return sorted(left, key=lambda rank: position.get(rank, len(position)))

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with contextlib.redirect_stderr(_NULL):
            return super()._run_for_rank(rank, local_rank, node_rank)


# In a local pool worker: the stage's executor, received once when the worker starts.
_POOL: list = []


def _start_pool_worker(executor) -> None:
    _POOL[:] = [executor, executor.pipeline]


def _run_in_pool_worker(rank: int):
    executor, pipeline = _POOL
    executor.pipeline = copy.deepcopy(pipeline)  # fresh step statistics for each task
    return executor._run_for_rank(rank)


class LocalExecutor(_QuietTasks, LocalPipelineExecutor):
    """datatrove's local executor; its :meth:`run` sends the executor to each worker once.

    datatrove's own loop sends, with every task, the executor and three proxies to a
    multiprocessing manager (a queue of local ranks, a counter of finished tasks and its
    lock). A proxy that arrives in a worker opens an authenticated connection to the
    manager to count itself, and another when it is dropped: six handshakes per task,
    11-15 ms even when the tasks only sleep (measured on 2 cores), a few percent of a
    small corpus's run. The local rank only decides which task also logs to the console,
    which hcx's tasks never do (:class:`_QuietTasks`), and the counter feeds one log line,
    so this loop has no manager. The rest is datatrove's: the same tasks, completion
    markers, task logs and statistics. hcx runs local stages one after the other itself,
    so ``depends`` is not used here."""

    def run(self):
        if self.depends:
            raise ValueError("hcx's local executor runs one stage; run its dependency first")
        self._launched = True
        ranks = self.get_incomplete_ranks(
            range(self.local_rank_offset, self.local_rank_offset + self.local_tasks))
        if not ranks:
            logger.info(f"Not doing anything as all {self.local_tasks} tasks have already been completed.")
            return PipelineStats()
        self.save_executor_as_json()
        if self.workers == 1:
            pipeline, stats = self.pipeline, []
            for rank in ranks:
                self.pipeline = copy.deepcopy(pipeline)
                stats.append(self._run_for_rank(rank))
            self.pipeline = pipeline
        else:
            context = multiprocess.get_context(self.start_method)
            with context.Pool(self.workers, initializer=_start_pool_worker, initargs=(self,)) as pool:
                stats = list(pool.imap_unordered(_run_in_pool_worker, ranks))
        stats = sum(stats, start=PipelineStats())
        with self.logging_dir.open("stats.json", "wt") as f:
            stats.save_to_disk(f)
        logger.success(stats.get_repr(f"All {self.local_tasks} tasks"))
        return stats

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        if self.workers > 1:
            _exit_with_parent()
        return super()._run_for_rank(rank, local_rank, node_rank)


class RayExecutor(_QuietTasks, RayPipelineExecutor):
    pass


class SlurmExecutor(_QuietTasks, SlurmPipelineExecutor):
    def get_sbatch_args(self, max_array: int = 1) -> dict:
        return {k: v for k, v in super().get_sbatch_args(max_array).items() if v is not None}


def start_local_workers(recipe: Recipe) -> None:
    """Start the local executor's fork server now, in the background.

    Local workers are forked from datatrove's fork server (a clean process, no threads).
    It imports hcx's pipeline modules and the datatrove steps they run once, so every
    worker of every stage starts with them loaded instead of importing hcx, datatrove and
    numpy again (seconds per stage on 2 busy cores). Starting it takes a new interpreter and those imports (~0.7 s), which
    this overlaps with the driver's own start (fingerprint, plan, eval index)."""
    cfg = recipe.data.prepare
    if cfg.executor.kind != "local" or cfg.workers < 2:
        return
    from multiprocess import forkserver

    multiprocess.get_context("forkserver").set_forkserver_preload(
        ["hcx.data.pipeline", "hcx.data.documents", "hcx.data.executors",
         "datatrove.executor.local", "datatrove.pipeline.dedup.minhash",
         "datatrove.pipeline.tokens.megatron_tokenizer", "sentencepiece"])
    threading.Thread(target=forkserver.ensure_running, daemon=True).start()


def make_executor(recipe: Recipe, stage: str, pipeline: list, tasks: int, logging_dir: Path,
                  depends=None, order: list[int] | None = None):
    """The executor for one stage of a run, as the recipe's ``data.prepare`` asks;
    ``order``: the ranks in the order to start them (local and Ray; default: 0, 1, ...)."""
    cfg = recipe.data.prepare
    ex = cfg.executor
    workers = max(1, min(cfg.workers, tasks))
    if ex.kind in ("local", "ray"):
        if ex.kind == "local":
            reap_children_on_exit()
            start_local_workers(recipe)
            executor = LocalExecutor(pipeline, tasks=tasks, workers=workers,
                                     logging_dir=str(logging_dir))
        else:
            executor = RayExecutor(pipeline, tasks=tasks, workers=workers,
                                   logging_dir=str(logging_dir), cpus_per_task=ex.cpus_per_task,
                                   mem_per_cpu_gb=ex.mem_per_cpu_gb,
                                   tasks_per_job=ex.tasks_per_job)
        executor.order = order
        return executor
    # hcx launch's conventions: <job name>-<job id> log files, appended to across requeues,
    # and USR1 `grace` seconds before the time limit to every job step, on which
    # datatrove's handler requeues the job (scontrol requeue) and exits; the task restarts
    # from its beginning, as one killed mid-way does (no completion marker yet).
    logs = logging_dir / "slurm_logs"
    sbatch_args = {"account": ex.account, "output": f"{logs}/%x-%A_%a.out",
                   "error": f"{logs}/%x-%A_%a.err", "open-mode": "append"}
    if ex.grace:
        sbatch_args["signal"] = f"USR1@{ex.grace}"
    for opt in ex.sbatch_options:  # --qos=high -> qos: high (and may replace the above)
        key, _, value = opt.lstrip("-").partition("=")
        sbatch_args[key] = value or ""
    python = Path(sys.executable)
    # The job runs where hcx was started, with this Python's environment and data root,
    # as hcx launch's jobs do.
    env = [f"cd {shlex.quote(os.getcwd())}",
           f"export PATH={shlex.quote(str(python.parent))}:$PATH"]
    for var in ("PYTHONPATH", "HCX_DATA_DIR"):
        if os.environ.get(var):
            env.append(f"export {var}={shlex.quote(os.environ[var])}")
    return SlurmExecutor(
        pipeline, tasks=tasks, time=ex.time, partition=ex.partition,
        cpus_per_task=ex.cpus_per_task, mem_per_cpu_gb=ex.mem_per_cpu_gb,
        tasks_per_job=ex.tasks_per_job, job_name=f"hcx-prepare-{stage}", qos="", env_command="\n".join(env),
        sbatch_args=sbatch_args, logging_dir=str(logging_dir), depends=depends,
        slurm_logs_folder=str(logs), mail_type="",
        requeue_signals=("SIGUSR1",) if ex.grace else None)


@contextlib.contextmanager
def ray_cluster(recipe: Recipe, log):
    """Connect to ``executor.address`` or start a local Ray cluster of ``workers`` CPUs
    (stopped at the end); an already connected driver (a test) is used as it is."""
    from hcx.errors import require

    ray = require("ray", "ray", purpose="data.prepare.executor.kind: ray")
    if ray.is_initialized():
        yield
        return
    address = recipe.data.prepare.executor.address
    if address:
        log(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=False)
    else:
        log(f"starting a local Ray cluster ({recipe.data.prepare.workers} CPUs)")
        ray.init(num_cpus=recipe.data.prepare.workers, include_dashboard=False,
                 log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
