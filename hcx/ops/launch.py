"""``hcx launch``: a recipe as a multi-node job, for torchrun or SLURM.

Pure functions check the recipe's layout against the cluster (:func:`plan`) and render
the job (:func:`torchrun_command`, :func:`environment`, :func:`render_sbatch`,
:func:`render_torchrun_script`). :func:`launch` writes the script atomically to
``<output_dir>/launch/<job>.sbatch`` (or ``.sh``) and submits it with ``sbatch`` or runs
it here; with ``dry_run`` it only prints it. Submission and running are parameters, so
tests (and other schedulers) can replace them.

Restarts resume: hcx continues from the newest complete checkpoint
(``checkpoint.resume``), so a restarted torchrun or a requeued job picks up where the
last checkpoint left off.

Stopping: hcx workers checkpoint on the first SIGTERM and die on a second. Under SLURM a
signal to the job step reaches every process of it (torchrun *and* its workers, with the
usual cgroup process tracking), and torchrun passes its own on, so the workers would see
two. The sbatch script therefore asks SLURM for ``USR1`` to the batch shell only
(``--signal=B:USR1@GRACE``); the shell touches a stop file on the shared file system and a
small watcher beside each node's torchrun sends SIGTERM to that torchrun alone, which
forwards it once to its workers and gives them ``GRACE`` seconds
(``--shutdown-timeout``) to save. The job then requeues itself and resumes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hcx.config import Recipe, RecipeError, load_recipe, parse_override
from hcx.errors import HcxError
from hcx.files import write_text_atomic

SCHEDULERS = ("slurm", "torchrun")
STAGES = ("pretrain", "sft", "align")
SCRIPT_SUFFIX = {"slurm": ".sbatch", "torchrun": ".sh"}
DEFAULT_PORT = 29500
CPUS_PER_GPU = 8          # default --cpus-per-task under SLURM: 8 per GPU (64 on 8 GPUs)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")


class LaunchError(HcxError, ValueError):
    """A job that cannot be launched as asked; the message says what to change."""


@dataclass(frozen=True)
class LaunchOptions:
    """What ``hcx launch`` was asked for (the command-line flags)."""

    nodes: int
    gpus_per_node: int = 8
    scheduler: str = "slurm"
    stage: str = "pretrain"
    job_name: str | None = None
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int | None = None    # None: 8 per GPU (slurm), this machine's (torchrun)
    max_restarts: int = 3
    port: int | None = None             # None: 29500 (torchrun), 10000 + job id % 20000 (slurm)
    grace: int = 300                    # seconds to finish a step and save before the end
    env: tuple[str, ...] = ()           # extra KEY=VALUE exports
    sbatch_options: tuple[str, ...] = ()  # extra #SBATCH lines, e.g. --qos=high
    data_dir: str | None = None         # exported as HCX_DATA_DIR (None: $HCX_DATA_DIR if set)
    workdir: str | None = None          # where the job runs (None: the current directory)
    python: str = sys.executable


@dataclass
class Job:
    """A checked job: the recipe with the layout it will run at, and where things go."""

    recipe_path: str
    overrides: list[str]
    recipe: Recipe
    options: LaunchOptions
    name: str
    workdir: Path
    output_dir: Path
    log_dir: Path
    script_path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.options.nodes * self.options.gpus_per_node

    @property
    def torchrun(self) -> str:
        beside = Path(self.options.python).parent / "torchrun"
        return str(beside) if beside.exists() else "torchrun"

    @property
    def cpus_per_task(self) -> int:
        if self.options.cpus_per_task:
            return self.options.cpus_per_task
        if self.options.scheduler == "slurm":
            return CPUS_PER_GPU * self.options.gpus_per_node
        return os.cpu_count() or 1

    @property
    def omp_threads(self) -> int:
        return max(1, self.cpus_per_task // self.options.gpus_per_node)

    @property
    def data_dir(self) -> str | None:
        return self.options.data_dir or os.environ.get("HCX_DATA_DIR") or None


# --- checking ----------------------------------------------------------------------------


def _check_options(o: LaunchOptions) -> None:
    problems = []
    if o.scheduler not in SCHEDULERS:
        problems.append(f"--scheduler {o.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if o.stage not in STAGES:
        problems.append(f"--stage {o.stage!r}: choose one of {', '.join(STAGES)}")
    for flag, value in (("--nodes", o.nodes), ("--gpus-per-node", o.gpus_per_node),
                        ("--grace", o.grace)):
        if value < 1:
            problems.append(f"{flag} must be at least 1 (got {value})")
    if o.cpus_per_task is not None and o.cpus_per_task < 1:
        problems.append(f"--cpus-per-task must be at least 1 (got {o.cpus_per_task})")
    if o.max_restarts < 0:
        problems.append(f"--max-restarts must be 0 or more (got {o.max_restarts})")
    if o.port is not None and not 1024 <= o.port <= 65535:
        problems.append(f"--port must be in 1024-65535 (got {o.port})")
    if o.job_name is not None and not _NAME.match(o.job_name):
        problems.append(f"--job-name {o.job_name!r}: use letters, digits, '_', '.', '-'")
    if not _TIME.match(o.time):
        problems.append(f"--time {o.time!r}: use SLURM's format, e.g. 48:00:00 or 2-00:00:00")
    for item in o.env:
        key = item.split("=", 1)[0]
        if "=" not in item or not _ENV_KEY.match(key):
            problems.append(f"--env {item!r}: expected KEY=VALUE with a shell variable name")
    for opt in o.sbatch_options:
        if not opt.startswith("-") or "\n" in opt:
            problems.append(f"--sbatch-option {opt!r}: expected an sbatch flag such as --qos=high")
    if problems:
        raise LaunchError("cannot launch:\n  " + "\n  ".join(problems))


def plan(recipe_path: str, overrides: list[str] | tuple[str, ...],
         options: LaunchOptions) -> Job:
    """Validate the recipe (with its overrides) for ``nodes x gpus_per_node`` processes.

    The recipe's ``tp * pp * cp * dp`` must equal the number of processes. When it does not and
    ``parallel.dp`` was not given as an override, ``dp`` is derived (processes / (tp * pp * cp))
    and added as the override ``parallel.dp=K``: the global batch stays the same, so the
    run trains the same way on more or fewer nodes. Raises RecipeError or LaunchError."""
    _check_options(options)
    overrides = list(overrides)
    recipe = load_recipe(recipe_path, overrides)
    p = recipe.parallel
    world = options.nodes * options.gpus_per_node
    cluster = (f"{options.nodes} node{'s' if options.nodes > 1 else ''} x "
               f"{options.gpus_per_node} GPUs = {world} processes")
    notes = []
    if p.world_size != world:
        dp_given = any(parse_override(o)[0] == ["parallel", "dp"] for o in overrides)
        model_parallel = p.tp * p.pp * p.cp
        cp = (" * cp", f" * {p.cp}") if p.cp > 1 else ("", "")
        needs = (f"{recipe_path} needs parallel.tp * pp{cp[0]} * dp = {p.tp} * {p.pp}{cp[1]} "
                 f"* {p.dp} = {p.world_size}")
        if world % model_parallel:
            nodes = -(-model_parallel // options.gpus_per_node)
            raise LaunchError(
                f"{cluster}, but {needs}: the number of processes must be a multiple of "
                f"tp * pp{cp[0]} = {model_parallel} (e.g. --nodes {nodes} with --gpus-per-node "
                f"{options.gpus_per_node}), or change parallel.tp/parallel.pp")
        dp = world // model_parallel
        if dp_given:
            raise LaunchError(f"{cluster}, but {needs}: set parallel.dp={dp} (or leave it out "
                              "and hcx launch derives it)")
        overrides.append(f"parallel.dp={dp}")
        try:
            recipe = load_recipe(recipe_path, overrides)
        except RecipeError as e:
            raise RecipeError(f"{cluster} gives parallel.dp={dp} (world / (tp * pp{cp[0]})), which "
                              f"this recipe cannot use:\n{e}") from None
        notes.append(f"parallel.dp={dp}: derived from {cluster} / (tp {p.tp} x pp {p.pp}"
                     f"{f' x cp {p.cp}' if p.cp > 1 else ''}); "
                     f"the recipe says dp {p.dp}. Same global batch "
                     f"({recipe.train.global_batch_size} sequences), "
                     f"{recipe.num_microbatches} micro-batches per step")
    from hcx.stages import stage_for

    recipe = stage_for(options.stage, recipe).resolve(recipe)  # the stage's rules, file:line
    if p.tp > options.gpus_per_node or options.gpus_per_node % p.tp:
        notes.append(f"warning: parallel.tp={p.tp} does not divide {options.gpus_per_node} GPUs "
                     "per node, so tensor-parallel groups cross nodes (slow): keep tp a "
                     "divisor of the GPUs per node")
    workdir = Path(options.workdir or os.getcwd()).absolute()
    output_dir = Path(recipe.output_dir)
    output_dir = output_dir if output_dir.is_absolute() else workdir / output_dir
    name = options.job_name or recipe.name
    if not _NAME.match(name):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    job = Job(recipe_path=recipe_path, overrides=overrides, recipe=recipe, options=options,
              name=name, workdir=workdir, output_dir=output_dir,
              log_dir=output_dir / "logs",
              script_path=output_dir / "launch" / f"{name}{SCRIPT_SUFFIX[options.scheduler]}",
              notes=notes)
    note = _prepare_note(job)
    if note:
        notes.append(note)
    return job


def _prepare_note(job: Job) -> str | None:
    """A reminder when the recipe's raw sources have no prepared data yet (a cheap check:
    the manifest only; hcx pretrain checks that it is up to date)."""
    try:
        from hcx.data.prepare import MANIFEST, prepared_dir, raw_sources

        if not raw_sources(job.recipe):
            return None
        out = prepared_dir(job.recipe)
        out = out if out.is_absolute() else job.workdir / out
        if (out / MANIFEST).exists():
            return None
    except Exception:  # a data root that does not exist here: nothing to say
        return None
    cmd = _hcx_args(job, ["hcx", "data", "prepare"])
    return (f"note: no prepared data in {out} yet: run '{shlex.join(cmd)}' first (a CPU job); "
            f"otherwise one rank prepares the corpora while all {job.world_size} processes "
            "wait with their GPUs idle")


# --- rendering ---------------------------------------------------------------------------


class _Sh(str):
    """Shell text rendered as is (already quoted, may expand variables)."""


def _q(token: str) -> str:
    return token if isinstance(token, _Sh) else shlex.quote(token)


def _hcx_args(job: Job, command: list[str]) -> list[str]:
    return [*command, job.recipe_path, *job.overrides]


def torchrun_command(job: Job) -> list[str]:
    """torchrun's argv (shell words; ``_Sh`` ones expand variables), one per node.

    c10d rendezvous at ``$MASTER_ADDR:$MASTER_PORT`` with id ``$RDZV_ID``: node ranks are
    assigned by the rendezvous, so every node runs the same command. Under SLURM the
    batch script restarts everything itself (a fresh rendezvous), so torchrun's own
    restarts are off there."""
    o = job.options
    restarts = 0 if o.scheduler == "slurm" else o.max_restarts
    return [
        _Sh('"$TORCHRUN"'),
        f"--nnodes={o.nodes}",
        f"--nproc-per-node={o.gpus_per_node}",
        "--rdzv-backend=c10d",
        _Sh('--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"'),
        _Sh('--rdzv-id="$RDZV_ID"'),
        f"--max-restarts={restarts}",
        f"--shutdown-timeout={o.grace}",
        f"--log-dir={job.log_dir / 'ranks'}",
        "--tee=3",
        "-m", "hcx.cli", *_hcx_args(job, [o.stage]),
    ]


def _render_words(words: list[str], indent: str = "") -> str:
    """Words as one shell command, flags on continuation lines."""
    lines: list[str] = []
    for w in words:
        text = _q(w)
        if lines and (w.startswith("--") or w == "-m"):
            lines.append(text)
        elif lines:
            lines[-1] += " " + text
        else:
            lines.append(text)
    return (" \\\n" + indent + "    ").join(lines)


def environment(job: Job) -> list[str]:
    """``export`` lines for every process. NCCL settings that clusters commonly need;
    values already set in the job's environment win for NCCL_DEBUG and
    TORCH_NCCL_ASYNC_ERROR_HANDLING."""
    lines = [
        "export PYTHONUNBUFFERED=1",
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        # A failed collective aborts the communicator and the process (instead of hanging),
        # so torchrun or the restart loop can restart from the last checkpoint.
        'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"',
        # A fresh store for the workers of every rendezvous round: with torchrun's shared one,
        # restarted workers can read the previous attempt's addresses and fail to connect
        # (pytorch/pytorch#135712; seen with torch 2.13 and gloo).
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        # Megatron's tensor-parallel communication overlap needs kernels issued in order.
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
        f"export OMP_NUM_THREADS={job.omp_threads}",
    ]
    if job.data_dir:
        lines.append(f"export HCX_DATA_DIR={shlex.quote(str(Path(job.data_dir).absolute()))}")
    else:
        lines.append("# export HCX_DATA_DIR=/path/to/corpora   "
                     "# data:// paths (default: ../shared/data)")
    lines += [
        "# Cluster-specific NCCL settings, if your admins recommend them, e.g.:",
        "# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5",
    ]
    for item in job.options.env:
        key, value = item.split("=", 1)
        lines.append(f"export {key}={shlex.quote(value)}")
    return lines


def _header(job: Job, how: str) -> list[str]:
    o, r = job.options, job.recipe
    p = r.parallel
    cmd = shlex.join(_hcx_args(job, ["hcx", o.stage])).replace("\n", "\\n")  # stays a comment
    ckpt = r.checkpoint_dir if r.checkpoint_dir.is_absolute() else job.workdir / r.checkpoint_dir
    return [
        f"# Written by hcx launch: job {job.name}, {o.nodes} node(s) x {o.gpus_per_node} GPUs, "
        f"{how}.",
        f"#   {cmd}",
        f"# Layout: tp {p.tp} x pp {p.pp}{f' x cp {p.cp}' if p.cp > 1 else ''} x dp {p.dp} = "
        f"{p.world_size} processes; "
        f"{r.num_microbatches} micro-batches of {r.train.micro_batch_size} x "
        f"{r.data.seq_length} tokens per step.",
        f"# Checkpoints: {ckpt} (a restart resumes from the newest).",
        f"# Logs: {job.log_dir}",
    ]


def render_torchrun_script(job: Job) -> str:
    """A script to run on every node (the same one everywhere), starting torchrun."""
    o = job.options
    if o.nodes > 1:
        master = (': "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node '
                  '(the same on every node)}"\nexport MASTER_ADDR')
        where = (f"# Run this same script on each of the {o.nodes} nodes, with MASTER_ADDR set "
                 "to the first node's address.")
    else:
        master = 'export MASTER_ADDR="${MASTER_ADDR:-localhost}"'
        where = "# Run it on the node with the GPUs."
    lines = [
        "#!/usr/bin/env bash",
        *_header(job, "torchrun"),
        where,
        f"# A failed worker restarts all workers (up to {o.max_restarts} times, torchrun "
        "--max-restarts); each restart resumes",
        "# from the newest checkpoint. Ctrl-C or SIGTERM to torchrun: the workers finish the "
        "step, save and stop;",
        "# run the script again to resume.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(job.workdir))}",
        *environment(job),
        master,
        f'export MASTER_PORT="${{MASTER_PORT:-{o.port or DEFAULT_PORT}}}"',
        f'export RDZV_ID="${{RDZV_ID:-{job.name}}}"',
        f"TORCHRUN={shlex.quote(job.torchrun)}",
        f"LOG_DIR={shlex.quote(str(job.log_dir))}",
        'mkdir -p "$LOG_DIR"',
        f'LOG="$LOG_DIR/{job.name}-$(hostname)-$(date +%Y%m%d-%H%M%S).log"',
        'echo "hcx launch: $(hostname): rendezvous $MASTER_ADDR:$MASTER_PORT, log $LOG" >&2',
        "# Everything to the console and the log; tee ignores Ctrl-C so the shutdown is logged.",
        "exec > >(trap '' INT TERM; exec tee -a \"$LOG\") 2>&1",
        "exec " + _render_words(torchrun_command(job)),
    ]
    return "\n".join(lines) + "\n"


def render_sbatch(job: Job) -> str:
    """An sbatch script: one torchrun per node (srun), c10d rendezvous on the first node,
    a bounded restart loop that resumes from the newest checkpoint, and a checkpoint
    before the time limit followed by a requeue."""
    o = job.options
    log = job.log_dir
    sb = [
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --nodes={o.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={o.gpus_per_node}",
        f"#SBATCH --cpus-per-task={job.cpus_per_task}",
        f"#SBATCH --time={o.time}",
    ]
    if o.partition:
        sb.append(f"#SBATCH --partition={o.partition}")
    if o.account:
        sb.append(f"#SBATCH --account={o.account}")
    sb += [
        "#SBATCH --exclusive",
        f"#SBATCH --output={log}/%x-%j.out",
        f"#SBATCH --error={log}/%x-%j.err",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{o.grace}",
        *[f"#SBATCH {opt}" for opt in o.sbatch_options],
    ]
    port = str(o.port) if o.port else "$((10000 + SLURM_JOB_ID % 20000))"
    check = shlex.join([o.python, "-m", "hcx.cli", *_hcx_args(job, [o.stage]), "--check"])
    lines = [
        "#!/bin/bash",
        *sb,
        *_header(job, "SLURM"),
        f"# Restarts: a failed run is started again on all nodes up to {o.max_restarts} times, "
        "resuming from the newest checkpoint.",
        f"# Time limit: SLURM sends USR1 {o.grace} s before it; the run checkpoints, stops and the "
        "job requeues itself.",
        "# Stop and requeue now:  scancel --signal=USR1 --batch JOBID",
        "# Stop for good:         scancel --signal=USR2 --batch JOBID  (plain scancel loses the "
        "steps since the last checkpoint)",
        "set -uo pipefail",
        f"cd {shlex.quote(str(job.workdir))}",
        *environment(job),
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'export MASTER_PORT="${{MASTER_PORT:-{port}}}"',
        f"export TORCHRUN={shlex.quote(job.torchrun)}",
        f'export HCX_STOP_FILE={shlex.quote(str(log))}/stop-"$SLURM_JOB_ID"',
        f"MAX_RESTARTS={o.max_restarts}",
        "",
        'echo "hcx launch: job $SLURM_JOB_ID (requeued ${SLURM_RESTART_COUNT:-0} times) on '
        '$SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST), rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "# A recipe error fails here, before any GPU work and without restarts.",
        f"{check} || exit $?",
        "",
        'stop_requested=""',
        'requeue=1',
        "on_usr1() {  # the time limit is near (--signal), or scancel --signal=USR1 --batch",
        '  stop_requested=1; touch "$HCX_STOP_FILE"',
        '  echo "hcx launch: $(date -Is) USR1: checkpointing and stopping; the job will requeue"',
        "}",
        "on_usr2() {  # scancel --signal=USR2 --batch: checkpoint and end the job",
        '  stop_requested=1; requeue=""; touch "$HCX_STOP_FILE"',
        '  echo "hcx launch: $(date -Is) USR2: checkpointing and stopping for good"',
        "}",
        "trap on_usr1 USR1",
        "trap on_usr2 USR2",
        "",
        "wait_for() {  # wait for a process, riding out the traps above",
        "  local rc",
        "  while :; do",
        '    wait "$1"; rc=$?',
        '    if [ "$rc" -gt 128 ] && kill -0 "$1" 2>/dev/null; then continue; fi',
        '    return "$rc"',
        "  done",
        "}",
        "",
        "node_main() {  # once per node (srun --ntasks-per-node=1)",
        "  " + _render_words(torchrun_command(job), indent="  ") + " &",
        "  local tr=$!",
        "  # On the stop file, SIGTERM to this torchrun only: it passes it once to its workers,",
        "  # which finish the step and save (a signal to the whole step would reach them twice).",
        '  while kill -0 "$tr" 2>/dev/null; do',
        '    if [ -e "$HCX_STOP_FILE" ]; then kill -TERM "$tr"; break; fi',
        "    sleep 1",
        "  done",
        '  wait "$tr"',
        "}",
        "",
        "attempt=0",
        "while :; do",
        '  rm -f "$HCX_STOP_FILE"',
        '  export RDZV_ID="$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}-$attempt"',
        '  srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 '
        '--cpus-per-task="$SLURM_CPUS_PER_TASK" \\',
        '    bash -c "$(declare -f node_main); node_main" &',
        "  rc=0; wait_for $! || rc=$?",
        '  if [ -n "$stop_requested" ]; then',
        '    rm -f "$HCX_STOP_FILE"',
        '    if [ -n "$requeue" ]; then',
        '      echo "hcx launch: stopped at a checkpoint; requeueing job $SLURM_JOB_ID to resume"',
        f'      scontrol requeue "$SLURM_JOB_ID" || echo "hcx launch: requeue refused; resubmit: '
        f'sbatch {shlex.quote(str(job.script_path))}" >&2',
        "    fi",
        "    exit 0",
        "  fi",
        '  if [ "$rc" -eq 0 ]; then echo "hcx launch: finished"; exit 0; fi',
        "  attempt=$((attempt + 1))",
        '  if [ "$attempt" -gt "$MAX_RESTARTS" ]; then',
        '    echo "hcx launch: srun exited $rc; no restarts left ($MAX_RESTARTS used). Logs: '
        f'{log}" >&2',
        '    exit "$rc"',
        "  fi",
        '  echo "hcx launch: srun exited $rc; restart $attempt of $MAX_RESTARTS in '
        '${HCX_RESTART_DELAY:-30} s, from the newest checkpoint" >&2',
        '  sleep "${HCX_RESTART_DELAY:-30}"',
        "done",
    ]
    return "\n".join(lines) + "\n"


def render(job: Job) -> str:
    return render_sbatch(job) if job.options.scheduler == "slurm" else render_torchrun_script(job)


# --- writing, submitting, running --------------------------------------------------------


def write_script(path: Path, text: str) -> Path:
    """Write atomically (temporary file, fsync, rename), executable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text, mode=0o755)


def sbatch(path: Path) -> str:
    """Submit with ``sbatch --parsable``; returns the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise LaunchError(f"sbatch not found on PATH: run hcx launch on a SLURM login node, or "
                          f"submit the written script yourself (sbatch {path}); --dry-run "
                          "prints it without writing")
    proc = subprocess.run([exe, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch {path} failed (exit {proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip().split(";")[0]


def run_script(path: Path) -> int:
    """Run a torchrun script here, passing SIGTERM/SIGINT on; returns its exit code."""
    child = subprocess.Popen(["bash", str(path)])
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received and code != 0 else code


def launch(job: Job, dry_run: bool = False, *, submit: Callable[[Path], str] = sbatch,
           run: Callable[[Path], int] = run_script, out=print,
           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    """Print (``dry_run``) or write and submit/run the job. Returns an exit code."""
    text = render(job)
    for note in job.notes:
        log(f"hcx launch: {note}")
    o = job.options
    if dry_run:
        out(text.rstrip("\n"))
        action = "submit it with sbatch" if o.scheduler == "slurm" else "run it here"
        log(f"hcx launch: dry run: would write {job.script_path} and {action}")
        return 0
    if o.scheduler == "torchrun" and o.nodes > 1 and not os.environ.get("MASTER_ADDR"):
        raise LaunchError(f"{o.nodes} nodes with torchrun: set MASTER_ADDR to the first node's "
                          "address, then start the same command (or the written script) on "
                          "every node; with SLURM use --scheduler slurm")
    job.log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create --output's folder
    write_script(job.script_path, text)
    log(f"hcx launch: wrote {job.script_path}")
    if o.scheduler == "slurm":
        job_id = submit(job.script_path)
        out(f"submitted job {job_id}: {job.script_path}")
        log(f"hcx launch: logs {job.log_dir}/{job.name}-{job_id}.out (.err); checkpoint and "
            f"stop: scancel --signal=USR2 --batch {job_id}")
        return 0
    if o.nodes > 1:
        log(f"hcx launch: start 'bash {job.script_path}' on the other {o.nodes - 1} nodes too, "
            f"with MASTER_ADDR={os.environ['MASTER_ADDR']}")
    return run(job.script_path)


# --- command line ------------------------------------------------------------------------
