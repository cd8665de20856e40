"""What the command modules share: the overrides argument, logging to stderr, and
starting the processes a command needs on this machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

OVERRIDES_HELP = ("recipe overrides as dotted KEY=VALUE, e.g. train.lr=3e-4 parallel.tp=2 "
                  "(values are parsed as YAML)")


def add_judge_prompt_args(parser, kind: str, default: str, prefix: str = "") -> None:
    """``--judge-prompts FILE`` and ``--judge-prompt NAME``: the judge's prompts (FastChat's
    format) and which ``kind`` of prompt in them (``default``), for every command that
    judges. ``prefix`` starts each help text (``"judge: "`` where other flags are not)."""
    parser.add_argument("--judge-prompts", metavar="FILE",
                        help=f"{prefix}FastChat judge_prompts.jsonl or YAML (default: "
                             "data://eval/mt_bench_en/judge_prompts.jsonl; Korean: "
                             "data://eval/ko_mt_bench/judge_prompts_ko.jsonl)")
    parser.add_argument("--judge-prompt", metavar="NAME",
                        help=f"{prefix}the {kind} prompt in it (default: {default})")


def log(msg: str) -> None:
    """Progress and notes go to stderr; stdout holds the command's result."""
    print(msg, file=sys.stderr, flush=True)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_relaunch(nproc: int) -> bool:
    """More than one process is needed and this one was not started by torchrun."""
    return nproc > 1 and not under_torchrun()


def relaunch_with_torchrun(nproc: int, argv: list[str], signal_workers: bool = False) -> int:
    """Start ``nproc`` local processes running this same command (single node).
    For clusters use ``hcx launch`` or your own torchrun/srun line.

    ``signal_workers``: SIGTERM/SIGINT go to the worker processes themselves rather than
    to torchrun, for commands whose clean stop on a signal is a success (``hcx serve``):
    torchrun then sees its workers exit 0 and exits 0 (signalled itself, it would
    report a failure however cleanly they stopped)."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", "hcx.cli", *argv]
    env = dict(os.environ)
    # Share the cores instead of torchrun's default of one thread per process.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"hcx: launching {nproc} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    child = subprocess.Popen(cmd, env=env)
    received: list[int] = []

    def forward(signum, frame):  # torchrun passes it on to every worker
        received.append(signum)
        if signal_workers:
            for worker in workers(child.pid):
                worker.send_signal(signum)
        else:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    if signal_workers:
        return code
    # torchrun exits 1 after shutting its workers down on a signal; report the signal.
    return 128 + received[0] if received else code


def workers(torchrun_pid: int) -> list:
    """torchrun's worker processes (its children; psutil ``Process`` objects)."""
    import psutil

    try:
        return psutil.Process(torchrun_pid).children()
    except psutil.NoSuchProcess:
        return []

