"""``hcx plan``, ``hcx launch``, ``hcx run``: sizing, cluster jobs and pipelines."""

from __future__ import annotations

import argparse
import sys

from hcx.commands.common import OVERRIDES_HELP, log
from hcx.ops import launch


def cmd_plan(args: argparse.Namespace, argv: list[str]) -> int:
    import json

    from hcx.ops import plan

    gpu = plan.gpu_spec(args.gpu, args.peak_tflops, args.gpu_memory_gb)
    tokens = plan.parse_tokens(args.tokens) if args.tokens is not None else None
    result = plan.plan_recipe(args.recipe, args.overrides, gpus=args.gpus, gpu=gpu,
                           mfu=args.mfu, tokens=tokens)
    print(json.dumps(result.to_dict(), indent=1) if args.json else plan.format_plan(result))
    return result.exit_code


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.ops.pipeline import run_pipeline

    out = run_pipeline(args.pipeline, from_stage=args.from_stage, dry_run=args.dry_run,
                       log=lambda msg: log(f"hcx run: {msg}"))
    if not args.dry_run:
        print(out)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "plan", help="parameters, FLOPs, memory per GPU and time to train of a recipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Estimate a recipe on N GPUs without starting anything: parameters "
                    "(total, per GPU and pipeline stage), training FLOPs per token, memory "
                    "per GPU (weights, fp32 main weights, fp32 gradients, Adam moments, "
                    "activations with and without full recomputation) and the time to train "
                    "at the stated MFU. Flags layouts that do not fit in 90% of the GPU's "
                    "memory, naming the largest part and layouts of the same GPUs that fit. "
                    "train.precision=auto is planned as bf16. Formulas and sources: "
                    "hcx/ops/plan/ and docs/recipes.md.",
        epilog="exit status: 0 fits, 3 does not fit, 2 invalid recipe or layout (heads or "
               "query groups not divisible by TP, layers by PP, global batch by micro batch "
               "x DP, ...), 1 bad arguments")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/bench-1b.yaml")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs in all; parallel.dp becomes N / (tp * pp) (default: the "
                        "recipe's tp * pp * dp)")
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100"],
                   help="GPU model: dense peak bf16 TFLOP/s 989.4 / 989.4 / 312, memory 80 / "
                        "141 / 80 GiB (default: h100)")
    p.add_argument("--peak-tflops", type=float, metavar="X",
                   help="per-GPU peak TFLOP/s instead of the --gpu datasheet figure")
    p.add_argument("--gpu-memory-gb", type=float, metavar="X",
                   help="per-GPU memory in GiB instead of the --gpu figure")
    p.add_argument("--mfu", type=float, default=0.40,
                   help="model FLOPs utilization assumed for the time to train "
                        "(default: 0.40)")
    p.add_argument("--tokens", metavar="T",
                   help="training tokens, e.g. 300B or 1.5T (default: train.steps x "
                        "train.global_batch_size x data.seq_length)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "run", help="run a pipeline: tokenizer -> data -> pretrain -> SFT -> align -> eval -> report",
        description="Run the stages of a pipeline file (e.g. recipes/pipeline/demo.yaml) in "
                    "order, each an hcx command, with its output shown and kept in "
                    "<output_dir>/logs/<stage>.log. Stages are cached by a hash of their "
                    "command, the files it names and the stages it uses "
                    "(<output_dir>/pipeline.json): a rerun skips finished stages, an "
                    "interrupted or failed stage resumes in its folder, and a stage whose "
                    "inputs changed starts afresh (and so do the stages after it). Prints "
                    "the last stage's output (the report).")
    p.add_argument("pipeline", help="pipeline YAML, e.g. recipes/pipeline/demo.yaml")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="rerun from this stage on, even if cached")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run (and what is cached) without running it")
    p.set_defaults(func=cmd_run)
    add_launch_parser(sub)


def add_launch_parser(sub) -> None:
    p = sub.add_parser(
        "launch", help="write and submit a multi-node job (SLURM sbatch or torchrun)",
        description="Write the job for a recipe on NODES x GPUS processes and submit it: "
                    "an sbatch script (--scheduler slurm: one torchrun per node through srun, "
                    "c10d rendezvous on the first node, a bounded restart loop, a checkpoint "
                    "and requeue before the time limit) or a script that starts torchrun "
                    "(--scheduler torchrun: run it on every node; torchrun --max-restarts). "
                    "Restarts resume from the newest checkpoint. The recipe's tp*pp*dp must "
                    "match NODES x GPUS; without a parallel.dp override, dp is derived from "
                    "them (the global batch stays the same). Written to "
                    "<output_dir>/launch/<job>.sbatch|.sh, logs under <output_dir>/logs. "
                    "See docs/recipes.md.")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/cluster-8b.yaml")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="processes per node (default: 8)")
    p.add_argument("--scheduler", choices=launch.SCHEDULERS, default="slurm",
                   help="slurm (default): write an sbatch script and submit it; torchrun: "
                        "write a script that starts torchrun and run it here")
    p.add_argument("--dry-run", action="store_true",
                   help="print the script and where it would go; write and submit nothing")
    p.add_argument("--stage", choices=launch.STAGES, default="pretrain",
                   help="the hcx command to run (default: pretrain)")
    p.add_argument("--job-name", help="job and script name (default: the recipe's name)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit (default: 24:00:00)")
    p.add_argument("--cpus-per-task", type=int,
                   help=f"CPUs per node (default: {launch.CPUS_PER_GPU} per GPU with SLURM, all with "
                        "torchrun); OMP_NUM_THREADS is this / GPUs per node")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts after a failure, each from the newest checkpoint (default: 3)")
    p.add_argument("--port", type=int, help=f"rendezvous port on the first node (default: "
                   f"{launch.DEFAULT_PORT}; SLURM: 10000 + job id %% 20000)")
    p.add_argument("--grace", type=int, default=300,
                   help="seconds the run gets to finish its step and save: SLURM signals this "
                        "long before the time limit; torchrun --shutdown-timeout (default: 300)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra environment variable for every process (repeatable)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="FLAG",
                   help="an extra #SBATCH line, e.g. --sbatch-option=--qos=high (repeatable)")
    p.set_defaults(func=cmd_launch)


def cmd_launch(args, argv: list[str]) -> int:
    options = launch.LaunchOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, scheduler=args.scheduler,
        stage=args.stage, job_name=args.job_name, partition=args.partition,
        account=args.account, time=args.time, cpus_per_task=args.cpus_per_task,
        max_restarts=args.max_restarts, port=args.port, grace=args.grace,
        env=tuple(args.env), sbatch_options=tuple(args.sbatch_option))
    job = launch.plan(args.recipe, args.overrides, options)
    return launch.launch(job, dry_run=args.dry_run)
