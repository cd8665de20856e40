"""Cluster recipes and ``hcx launch``: the recipes validate and their layouts divide; the
rendered sbatch and torchrun scripts have the expected lines and are valid bash; the
sbatch script's restart loop and stop/requeue path run against stand-in srun/scontrol/
torchrun; world-size mismatches are refused with the numbers; the real CLI prints a dry
run and submits through sbatch; and the tiny recipe really trains through a launched
torchrun (1 node x 2 processes, gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, hcx, losses, small_recipe
from hcx import cli
from hcx.config import RecipeError, load_recipe
from hcx.ops.launch import LaunchError, LaunchOptions, launch, plan, render, sbatch

RECIPES = ROOT / "recipes"
CLUSTER = sorted(RECIPES.glob("cluster-*.yaml"))
STAGE1 = [p for p in CLUSTER if not p.stem.endswith("-32k")]
PARAMS = {"cluster-1b": 1.13e9, "cluster-8b": 7.25e9, "cluster-30b": 29.5e9, "cluster-70b": 69.0e9}


def n_params(m, vocab: int = 32768) -> float:
    head_dim = m.hidden_size // m.num_attention_heads
    attn = 2 * m.hidden_size ** 2 + 2 * m.hidden_size * m.query_groups * head_dim
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return m.num_layers * (attn + mlp + 2 * m.hidden_size) + 2 * vocab * m.hidden_size


# --- the recipes -----------------------------------------------------------------------


def test_there_are_four_sizes_each_with_a_32k_stage():
    assert [p.stem for p in STAGE1] == ["cluster-1b", "cluster-30b", "cluster-70b", "cluster-8b"]
    assert {p.stem for p in CLUSTER} - {p.stem for p in STAGE1} == {f"{p.stem}-32k" for p in STAGE1}


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.stem)
def test_cluster_recipe_validates_and_its_layout_divides(path, capsys):
    assert cli.main(["pretrain", str(path), "--check"]) == 0  # what `hcx pretrain --check` runs
    assert f"{path}: ok" in capsys.readouterr().out
    r = load_recipe(path)
    m, p, t = r.model, r.parallel, r.train
    assert r.name == path.stem and r.output_dir == f"runs/{path.stem}"
    assert m.num_attention_heads % p.tp == 0 and m.query_groups % p.tp == 0
    assert m.num_attention_heads % m.query_groups == 0 and m.hidden_size // m.num_attention_heads == 128
    assert m.ffn_hidden_size % p.tp == 0 and m.num_layers % p.pp == 0
    assert t.global_batch_size % (t.micro_batch_size * p.dp) == 0
    assert 8 % p.tp == 0, "TP stays inside an 8-GPU node"
    assert p.world_size % 8 == 0, "whole 8-GPU nodes"
    assert p.sequence_parallel == (p.tp > 1) and p.distributed_optimizer
    assert t.precision == "auto" and r.checkpoint.resume and r.checkpoint.save_every > 0
    assert not r.logging.progress
    assert (ROOT / r.data.tokenizer.path).is_file()
    base = path.stem.removesuffix("-32k")
    assert n_params(m) == pytest.approx(PARAMS[base], rel=0.01)
    # the HCX mix: about a third each of Korean, English/multilingual and code; FIM on code
    weights = {"ko": 0.0, "en": 0.0, "code": 0.0}
    for s in r.data.sources:
        group = "code" if s.language == "code" or s.name.startswith("code") else \
            "ko" if s.language == "ko" else "en"
        weights[group] += s.weight
        assert s.uses_fim == (s.language == "code")
        assert s.path and s.path.startswith("data://corpus/")
    total = sum(weights.values())
    assert all(abs(w / total - 1 / 3) < 0.02 for w in weights.values()), weights
    assert r.data.prepare.fim.rate > 0
    tokens = t.global_batch_size * r.data.seq_length
    if path.stem.endswith("-32k"):   # the long-context stage
        stage1 = load_recipe(RECIPES / f"{base}.yaml")
        assert r.data.seq_length == m.max_position_embeddings == 32768
        assert m.rope_base > stage1.model.rope_base
        assert r.model.model_dump(exclude={"rope_base", "max_position_embeddings"}) == \
            stage1.model.model_dump(exclude={"rope_base", "max_position_embeddings"})
        # Same GPUs and model parallelism; the planner's choice of context parallelism
        # or recomputation for the 32k activations (docs/recipes.md).
        assert r.parallel.world_size == stage1.parallel.world_size
        assert (r.parallel.tp, r.parallel.pp) == (stage1.parallel.tp, stage1.parallel.pp)
        # an input: made absolute at load time, from the current directory (where stage 1's
        # output_dir put its run); the prepared data is an output path and stays as written
        assert r.checkpoint.init_from == str(Path.cwd() / "runs" / base / "checkpoints")
        assert r.data.prepare.output_dir == f"runs/{base}/data_cache/prepared"
        assert t.lr == stage1.train.min_lr and t.steps * tokens <= 0.05 * stage1.train.steps * \
            stage1.train.global_batch_size * stage1.data.seq_length
    else:
        assert r.data.seq_length == m.max_position_embeddings == 4096
        assert 2e6 <= tokens <= 4.3e6


def test_the_data_mix_is_the_same_at_every_size():
    mixes = {p.stem: load_recipe(p).data.model_dump(exclude={"seq_length"}) for p in STAGE1}
    assert len({repr(m) for m in mixes.values()}) == 1


# --- rendering -----------------------------------------------------------------------------


def job_for(tmp_path, recipe="cluster-8b", overrides=(), **options):
    defaults = dict(nodes=2, gpus_per_node=8, workdir=str(tmp_path), python=sys.executable)
    return plan(str(RECIPES / f"{recipe}.yaml"), list(overrides), LaunchOptions(**{**defaults, **options}))


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sh"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_script_for_2_nodes_x_8_gpus(tmp_path):
    job = job_for(tmp_path, scheduler="slurm", partition="gpu", account="proj", time="48:00:00",
                  env=("NCCL_IB_HCA=mlx5",), sbatch_options=("--qos=high",))
    text = render(job)
    lines = text.splitlines()
    out = tmp_path / "runs" / "cluster-8b"
    assert lines[0] == "#!/bin/bash"
    for line in ["#SBATCH --job-name=cluster-8b", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64",
                 "#SBATCH --time=48:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 f"#SBATCH --output={out}/logs/%x-%j.out", f"#SBATCH --error={out}/logs/%x-%j.err",
                 "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --qos=high",
                 f"cd {tmp_path}",
                 'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
                 'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"',
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export OMP_NUM_THREADS=8",
                 "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                 "export NCCL_IB_HCA=mlx5",
                 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                 'export MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"',
                 f"export HCX_STOP_FILE={out}/logs/stop-\"$SLURM_JOB_ID\"",
                 "MAX_RESTARTS=3",
                 '  export RDZV_ID="$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}-$attempt"',
                 '  scontrol requeue "$SLURM_JOB_ID" || echo "hcx launch: requeue refused; resubmit: '
                 f'sbatch {out}/launch/cluster-8b.sbatch" >&2'.replace("  scontrol", "      scontrol"),
                 ]:
        assert line in lines, line
    assert (f"{sys.executable} -m hcx.cli pretrain {RECIPES}/cluster-8b.yaml parallel.dp=8 "
            "--check || exit $?") in lines
    assert any(line.startswith("  srun --kill-on-bad-exit=1 --nodes=\"$SLURM_JOB_NUM_NODES\" "
                               "--ntasks-per-node=1") for line in lines)
    assert '    bash -c "$(declare -f node_main); node_main" &' in lines
    torchrun = [line.strip().rstrip(" \\&") for line in lines[lines.index(
        "node_main() {  # once per node (srun --ntasks-per-node=1)") + 1:][:11]]
    assert torchrun == [
        '"$TORCHRUN"', "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id="$RDZV_ID"',
        "--max-restarts=0",  # the batch script's loop restarts (on every node at once)
        "--shutdown-timeout=300", f"--log-dir={out}/logs/ranks", "--tee=3",
        f"-m hcx.cli pretrain {RECIPES}/cluster-8b.yaml parallel.dp=8"]
    assert job.notes[0].startswith("parallel.dp=8: derived from 2 nodes x 8 GPUs = 16 processes")
    bash_syntax_ok(text, tmp_path)


def test_torchrun_script_for_2_nodes_x_8_gpus(tmp_path):
    job = job_for(tmp_path, scheduler="torchrun", max_restarts=5, port=31000, grace=600,
                  cpus_per_task=96)
    text = render(job)
    lines = text.splitlines()
    out = tmp_path / "runs" / "cluster-8b"
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    for line in [': "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node (the same '
                 'on every node)}"',
                 'export MASTER_PORT="${MASTER_PORT:-31000}"', 'export RDZV_ID="${RDZV_ID:-cluster-8b}"',
                 "export OMP_NUM_THREADS=12", f"LOG_DIR={out}/logs",
                 'LOG="$LOG_DIR/cluster-8b-$(hostname)-$(date +%Y%m%d-%H%M%S).log"']:
        assert line in lines, line
    start = lines.index('exec "$TORCHRUN" \\')
    assert [line.strip().rstrip(" \\") for line in lines[start + 1:]] == [
        "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id="$RDZV_ID"',
        "--max-restarts=5", "--shutdown-timeout=600", f"--log-dir={out}/logs/ranks", "--tee=3",
        f"-m hcx.cli pretrain {RECIPES}/cluster-8b.yaml parallel.dp=8"]
    bash_syntax_ok(text, tmp_path)
    one = render(job_for(tmp_path, scheduler="torchrun", nodes=1))
    assert 'export MASTER_ADDR="${MASTER_ADDR:-localhost}"' in one.splitlines()
    assert "--nnodes=1" in one and "parallel.dp=4" in one


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.stem)
def test_every_cluster_recipe_renders_valid_bash_at_its_own_size(path, tmp_path):
    r = load_recipe(path)
    for scheduler in ("slurm", "torchrun"):
        job = plan(str(path), [], LaunchOptions(nodes=r.parallel.world_size // 8,
                                                scheduler=scheduler, workdir=str(tmp_path)))
        assert not any(n.startswith(("parallel.dp", "warning")) for n in job.notes)
        bash_syntax_ok(render(job), tmp_path)


def test_odd_arguments_are_quoted(tmp_path):
    job = job_for(tmp_path, overrides=["train.lr=3e-4", "name=with space"], scheduler="slurm",
                  job_name="run-1")
    text = render(job)
    assert "'name=with space'" in text and job.script_path.name == "run-1.sbatch"
    bash_syntax_ok(text, tmp_path)


# --- checks --------------------------------------------------------------------------------


def test_world_size_mismatch_names_the_numbers(tmp_path, capsys):
    with pytest.raises(LaunchError, match=r"2 nodes x 8 GPUs = 16 processes, but .*cluster-8b.yaml "
                       r"needs parallel.tp \* pp \* dp = 2 \* 1 \* 4 = 8: set parallel.dp=8"):
        job_for(tmp_path, overrides=["parallel.dp=4"])
    with pytest.raises(LaunchError, match=r"1 node x 8 GPUs = 8 processes, but .* = 8 \* 4 \* 16 = "
                       r"512: the number of processes must be a multiple of tp \* pp = 32 "
                       r"\(e.g. --nodes 4 with --gpus-per-node 8\)"):
        job_for(tmp_path, recipe="cluster-70b", nodes=1)
    # a derived dp the global batch cannot use: 3 nodes -> dp 24, 512 % (4 x 24) != 0
    with pytest.raises(RecipeError, match=r"(?s)3 nodes x 8 GPUs = 24 processes gives "
                       r"parallel.dp=24.*train.global_batch_size=512 is not divisible"):
        job_for(tmp_path, recipe="cluster-1b", nodes=3)
    # the command line: exit status 1 and the message
    code = cli.main(["launch", str(RECIPES / "cluster-70b.yaml"), "--nodes", "1", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 1 and "hcx: error: 1 node x 8 GPUs = 8 processes" in err
    with pytest.raises(LaunchError, match="--nodes must be at least 1.*\n.*--env 'X'"):
        job_for(tmp_path, nodes=0, env=("X",))
    notes = job_for(tmp_path, gpus_per_node=1, nodes=16).notes
    assert any("tensor-parallel groups cross nodes" in n for n in notes)


def test_dry_run_through_the_cli_prints_the_script_and_writes_nothing(tmp_path):
    proc = hcx("launch", "recipes/cluster-8b.yaml", f"output_dir={tmp_path}/run", "--nodes", "2",
               "--gpus-per-node", "8", "--scheduler", "slurm", "--partition", "gpu", "--dry-run")
    out = proc.stdout.splitlines()
    assert out[0] == "#!/bin/bash" and "#SBATCH --nodes=2" in out and "#SBATCH --partition=gpu" in out
    assert (f"-m hcx.cli pretrain recipes/cluster-8b.yaml output_dir={tmp_path}/run "
            "parallel.dp=8") in proc.stdout
    script = tmp_path / "run/launch/cluster-8b.sbatch"
    assert f"dry run: would write {script} and submit it with sbatch" in proc.stderr
    assert "parallel.dp=8: derived from 2 nodes x 8 GPUs" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_submit_writes_atomically_and_calls_sbatch(tmp_path, monkeypatch, capsys):
    job = job_for(tmp_path, scheduler="slurm")
    submitted = []
    assert launch(job, submit=lambda p: submitted.append(p) or "4242") == 0
    assert submitted == [job.script_path] and job.script_path.read_text() == render(job)
    assert os.access(job.script_path, os.X_OK) and job.log_dir.is_dir()
    assert [p.name for p in job.script_path.parent.iterdir()] == ["cluster-8b.sbatch"]
    assert "submitted job 4242" in capsys.readouterr().out
    # sbatch itself: absent -> a clear error; present -> --parsable and the job id
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(LaunchError, match="sbatch not found on PATH"):
        sbatch(job.script_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\necho "777;cluster"\n')
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    code = cli.main(["launch", str(RECIPES / "cluster-1b.yaml"), f"output_dir={tmp_path}/run1b",
                     "--nodes", "1"])
    assert code == 0 and "submitted job 777" in capsys.readouterr().out
    assert (tmp_path / "sbatch.args").read_text().split() == [
        "--parsable", f"{tmp_path}/run1b/launch/cluster-1b.sbatch"]


# --- the sbatch script's logic, against stand-ins for srun, scontrol and torchrun --------


@pytest.fixture
def fake_slurm(tmp_path):
    """bin/ with srun (runs the node command once, as node 0), scontrol (hostnames, requeue
    recorded), python (--check: exit $FAKE_CHECK) and torchrun (behaviour from $FAKE_MODE)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls"
    scripts = {
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\nSLURM_NODEID=0 exec "$@"\n',
        "scontrol": f'if [ "$1" = show ]; then echo node1; echo node2; '
                    f'else echo "scontrol $*" >> {calls}; fi\n',
        "python": 'exit "${FAKE_CHECK:-0}"\n',
        "torchrun": f"""echo "torchrun $RDZV_ID $MASTER_ADDR:$MASTER_PORT $*" >> {calls}
n=$(grep -c '^torchrun' {calls})
case "$FAKE_MODE" in
  fail-once) [ "$n" -ge 2 ] && exit 0; exit 7 ;;
  fail) exit 7 ;;
  wait) trap 'echo TERM >> {calls}; exit 143' TERM; touch {tmp_path}/started
        while :; do sleep 0.2; done ;;
esac
""",
    }
    for name, body in scripts.items():
        (bin_ / name).write_text("#!/bin/bash\n" + body)
        (bin_ / name).chmod(0o755)
    return bin_, calls


def run_sbatch(tmp_path, fake, mode, max_restarts=3, check=0, usr1=False):
    bin_, calls = fake
    job = job_for(tmp_path, scheduler="slurm", python=str(bin_ / "python"), max_restarts=max_restarts)
    job.log_dir.mkdir(parents=True)
    script = tmp_path / "job.sbatch"
    script.write_text(render(job))
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "FAKE_MODE": mode,
           "FAKE_CHECK": str(check), "HCX_RESTART_DELAY": "0", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_CPUS_PER_TASK": "64"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if usr1:
        deadline = time.time() + 20
        while not (tmp_path / "started").exists():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=60)[0]
    return proc.returncode, output, calls.read_text().splitlines() if calls.exists() else []


def test_sbatch_restarts_a_failed_run_with_a_fresh_rendezvous(tmp_path, fake_slurm):
    code, output, calls = run_sbatch(tmp_path, fake_slurm, "fail-once")
    assert code == 0, output
    assert [c.split()[:2] for c in calls] == [["torchrun", "4242-0-0"], ["torchrun", "4242-0-1"]]
    assert calls[0].split()[2] == "node1:14242"   # MASTER_ADDR: first node; port from the job id
    assert "srun exited 7; restart 1 of 3" in output and "hcx launch: finished" in output


def test_sbatch_gives_up_after_max_restarts(tmp_path, fake_slurm):
    code, output, calls = run_sbatch(tmp_path, fake_slurm, "fail", max_restarts=1)
    assert code == 7 and len(calls) == 2 and "no restarts left (1 used)" in output


def test_sbatch_stops_on_a_recipe_error_before_srun(tmp_path, fake_slurm):
    code, output, calls = run_sbatch(tmp_path, fake_slurm, "fail", check=2)
    assert code == 2 and calls == []


def test_sbatch_usr1_checkpoints_once_and_requeues(tmp_path, fake_slurm):
    code, output, calls = run_sbatch(tmp_path, fake_slurm, "wait", usr1=True)
    assert code == 0, output
    assert calls[1:] == ["TERM", "scontrol requeue 4242"]  # one SIGTERM, to torchrun only
    assert "USR1: checkpointing and stopping" in output and "requeueing job 4242" in output


# --- a real run ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tiny_recipe_trains_through_launched_torchrun_and_a_restart_resumes(tmp_path,
                                                                           prepared_prefix):
    """1 node x 2 processes (TP 2, gloo). In torchrun's first attempt rank 1 exits 3 after the
    run finished (a sitecustomize put on PYTHONPATH with --env): torchrun restarts both
    workers, which resume from the step-2 checkpoint."""
    recipe = small_recipe(tmp_path / "small.yaml", tmp_path / "run", prepared_prefix,
                          train={"steps": 2, "warmup_steps": 1})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "def fail():\n"
        "    if sys.argv[1:2] == ['pretrain'] and os.environ.get('RANK') == '1' \\\n"
        "            and os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0':\n"
        "        os._exit(3)\n"
        "atexit.register(fail)\n")
    proc = hcx("launch", str(recipe), "parallel.tp=2", "--nodes", "1",
               "--gpus-per-node", "2", "--scheduler", "torchrun", "--port", str(free_port()),
               "--max-restarts", "1", "--env", f"PYTHONPATH={hook}", timeout=300)
    run = tmp_path / "run"
    script = run / "launch" / "test.sh"
    assert f"wrote {script}" in proc.stderr
    assert "--nproc-per-node=2" in script.read_text()
    assert sorted(losses(run)) == [1, 2]
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000002"]
    deadline = time.time() + 10   # tee may still be flushing the console log
    while time.time() < deadline:
        logs = list((run / "logs").glob("test-*.log"))
        if logs and "nothing to do" in logs[0].read_text():
            break
        time.sleep(0.2)
    log = logs[0].read_text()
    assert "[default0]:step 2 | loss" in log
    assert f"resumed from {run}/checkpoints/step_00000002 at step 2" in log   # the restart
    assert "nothing to do: the run is already at step 2" in log
    assert list((run / "logs" / "ranks").rglob("attempt_1"))


def test_launch_applies_the_stage_rules_before_writing_anything(tmp_path):
    options = LaunchOptions(nodes=1, gpus_per_node=2, scheduler="torchrun", stage="align",
                            workdir=str(tmp_path))
    with pytest.raises(RecipeError, match=r"override 'parallel.pp=2': parallel.pp: "
                                          r"align.method=fdpg samples through"):
        plan(str(RECIPES / "tiny-fdpg.yaml"), ["parallel.pp=2"], options)
    assert not list(tmp_path.iterdir())
