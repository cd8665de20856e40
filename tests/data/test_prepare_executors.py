"""hcx data prepare on datatrove's other executors: the same bytes on a real local Ray
cluster (2 workers) and through generated SLURM job scripts (run by stand-in sbatch/srun/
scontrol that execute the array tasks here), as on the local executor."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, hcx
from tests.data.test_prepare import make_recipe, prepared, stats

SOURCES = [
    {"name": "ko", "language": "ko", "path": "data://train/pretrain/ko_konlpy_kolaw_kobill/train.jsonl"},
    {"name": "en", "language": "en", "path": "data://train/pretrain/en_tiny_shakespeare/train.jsonl"},
]
# Several tasks per source, so that tasks really run side by side and their shards are
# concatenated, and dedup pairs cross shards.
SETTINGS = {"executor": {"shard_mb": 0.6}}


def outputs(tmp: Path) -> dict[str, bytes]:
    return {f"{n}{ext}": (prepared(tmp) / f"{n}{ext}").read_bytes()
            for n in ("ko", "en") for ext in (".bin", ".idx")}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, shared_data):
    """The reference: the local executor, 2 workers."""
    tmp = tmp_path_factory.mktemp("local")
    hcx("data", "prepare", str(make_recipe(tmp, SOURCES, workers=2, **SETTINGS)))
    return outputs(tmp), stats(tmp)


@pytest.fixture(scope="module")
def ray_cluster():
    """One real local Ray cluster (2 CPUs) for every Ray test of the module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_executor_writes_what_the_local_one_writes(tmp_path, local_run, ray_cluster):
    from hcx.config import load_recipe
    from hcx.data import prepare

    recipe = load_recipe(make_recipe(tmp_path, SOURCES, workers=2, **SETTINGS),
                         ["data.prepare.executor.kind=ray", "data.prepare.executor.mem_per_cpu_gb=0.25"])
    report = prepare.run(recipe, progress=False, log=lambda m: None)
    assert report["executor"] == "ray" and report["tasks"] > 2
    assert outputs(tmp_path) == local_run[0]
    assert without_timings(stats(tmp_path)) == without_timings(local_run[1])
    # a bad record inside a Ray task stops the run, named by file and line
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first document, long enough to keep"}\n{"text": "broken\n')
    recipe = load_recipe(make_recipe(tmp_path / "bad", [{"name": "bad", "path": str(bad)}]),
                         ["data.prepare.executor.kind=ray", "data.prepare.executor.mem_per_cpu_gb=0.25"])
    with pytest.raises(prepare.PrepareError, match=f"{bad}:2: malformed JSON.*--skip-bad"):
        prepare.run(recipe, progress=False, log=lambda m: None)


def without_timings(by_source: dict) -> dict:
    return {name: {k: v for k, v in s.items() if k not in ("seconds", "mb_per_second")}
            for name, s in by_source.items()}


FAKE_SBATCH = r"""#!/bin/bash
# Runs the job at once, here: every array index in turn (SLURM_ARRAY_TASK_ID), so a job
# submitted after another (--dependency) finds it finished.
script="${@: -1}"
for arg in "$@"; do case "$arg" in --export=ALL,RUN_OFFSET=*) export RUN_OFFSET="${arg#*RUN_OFFSET=}";; esac; done
echo "$@" >> "$FAKE_SLURM_LOG"
id=$(( $(wc -l < "$FAKE_SLURM_LOG") + 100 ))
array=$(sed -n 's/^#SBATCH --array=\([0-9]*\)-\([0-9]*\).*/\1 \2/p' "$script")
if [ -n "$array" ]; then
  set -- $array
  for i in $(seq "$1" "$2"); do
    SLURM_JOB_ID=$id SLURM_ARRAY_TASK_ID=$i SLURM_NODELIST=localhost bash "$script" >> "$FAKE_SLURM_LOG.out" 2>&1 || exit 1
  done
else
  SLURM_JOB_ID=$id SLURM_NODELIST=localhost bash "$script" >> "$FAKE_SLURM_LOG.out" 2>&1 || exit 1
fi
echo "Submitted batch job $id"
"""
FAKE_SRUN = r"""#!/bin/bash
while [ $# -gt 0 ]; do case "$1" in -n|-N|-c) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && echo localhost
"""


@pytest.mark.slow
def test_slurm_job_scripts_write_what_the_local_executor_writes(tmp_path, local_run):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {**os.environ, "PATH": f"{bin_}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FAKE_SLURM_LOG": str(log)}
    recipe = make_recipe(tmp_path, SOURCES, **SETTINGS)
    proc = subprocess.run([sys.executable, "-m", "hcx.cli", "data", "prepare", str(recipe),
                           "data.prepare.executor.partition=cpu",
                           "data.prepare.executor.time=01:00:00",
                           "data.prepare.executor.tasks_per_job=16",  # one array job per stage
                           "--executor", "slurm"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    jobs_output = log.with_name(log.name + ".out")
    assert proc.returncode == 0, proc.stderr + (jobs_output.read_text() if jobs_output.exists() else "")
    assert "submitted" in proc.stdout, proc.stdout
    submitted = log.read_text().splitlines()
    # process, duplicates, clusters, finish; each followed by datatrove's stats merge
    assert len(submitted) == 8 and all("--dependency=afterok:" in s for s in submitted[2:7:2])
    assert outputs(tmp_path) == local_run[0]
    assert without_timings(stats(tmp_path)) == without_timings(local_run[1])
    from hcx.config import load_recipe
    from hcx.data.prepare import is_prepared

    assert is_prepared(load_recipe(recipe, ["data.prepare.executor.kind=slurm"]))


def test_slurm_script_has_the_cluster_settings(tmp_path):
    """The generated sbatch script: partition, time, CPUs, memory, the job's environment."""
    from hcx.config import load_recipe
    from hcx.data.executors import make_executor
    from hcx.data.pipeline import ProcessShard

    recipe = load_recipe(make_recipe(tmp_path, SOURCES), [
        "data.prepare.executor.kind=slurm", "data.prepare.executor.partition=cpu",
        "data.prepare.executor.time=02:00:00", "data.prepare.executor.cpus_per_task=2",
        "data.prepare.executor.account=lab", 'data.prepare.executor.sbatch_options=["--qos=high"]'])
    ex = make_executor(recipe, "process", [ProcessShard(recipe, str(tmp_path / "w"), [])], 7,
                       tmp_path / "logs")
    script = ex.get_launch_file_contents(ex.get_sbatch_args(7), "srun launch_pickled_pipeline x")
    for line in ("#SBATCH --partition=cpu", "#SBATCH --time=02:00:00", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --mem-per-cpu=2.0G", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --array=0-6", "#SBATCH --job-name=hcx-prepare-process",
                 f"#SBATCH --output={tmp_path}/logs/slurm_logs/%x-%A_%a.out",
                 f"#SBATCH --error={tmp_path}/logs/slurm_logs/%x-%A_%a.err",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 f"cd {os.getcwd()}", f"export PATH={Path(sys.executable).parent}:$PATH"):
        assert line in script.splitlines() or line in script, line
    assert "None" not in script


def test_tasks_start_by_estimated_work(tmp_path):
    """The process stage starts its tasks by decreasing estimated work: input bytes times
    the text per byte sampled from each file, so 1 MB of English (a character a byte)
    goes before 1 MB of Korean escaped by JSON (six bytes a syllable). Finished tasks are
    still left out, and the order changes nothing else (the same ranks, the same files)."""
    from hcx.config import load_recipe
    from hcx.data.executors import make_executor
    from hcx.data.pipeline import largest_first, plan_tasks, task_costs, text_per_byte

    ko_line = json.dumps({"text": "한국어 문장입니다. " * 20}) + "\n"    # ensure_ascii: \uXXXX
    en_line = json.dumps({"text": "An English sentence. " * 20}) + "\n"
    files = {"ko": (tmp_path / "ko.jsonl", ko_line * 1600), "en": (tmp_path / "en.jsonl", en_line * 800)}
    for path, body in files.values():
        path.write_text(body)
    ko_per_byte = len("한국어 문장입니다. " * 20) / len(ko_line)
    assert text_per_byte(str(files["ko"][0]), "jsonl") == pytest.approx(ko_per_byte, rel=0.01)
    assert ko_per_byte < 0.25 and text_per_byte(str(files["en"][0]), "jsonl") > 0.9

    recipe = load_recipe(make_recipe(tmp_path, [
        {"name": "ko", "language": "ko", "path": str(files["ko"][0])},
        {"name": "en", "language": "en", "path": str(files["en"][0])}], executor={"shard_mb": 0.25}))
    tasks = plan_tasks(recipe)
    costs = task_costs(recipe, tasks)
    order = largest_first(recipe, tasks)
    assert sorted(order) == list(range(len(tasks)))
    assert [costs[r] for r in order] == sorted(costs, reverse=True)
    # the Korean source has more bytes (and tasks) but every English task comes first
    ko_tasks = [r for r, t in enumerate(tasks) if t.source == 0]
    assert len(ko_tasks) > len(tasks) - len(ko_tasks)
    assert {tasks[r].source for r in order[:len(tasks) - len(ko_tasks)]} == {1}

    ex = make_executor(recipe, "process", [], len(tasks), tmp_path / "logs", order=order)
    assert ex.get_incomplete_ranks() == order
    (tmp_path / "logs" / "completions").mkdir(parents=True)
    (tmp_path / "logs" / "completions" / f"{order[0]:05d}").touch()
    assert ex.get_incomplete_ranks() == order[1:]
    assert make_executor(recipe, "process", [], len(tasks),
                         tmp_path / "logs2").get_incomplete_ranks() == list(range(len(tasks)))


def test_task_log_sinks_keep_loguru_library_dirs():
    """The per-process answer hcx caches for loguru is the one loguru computes."""
    from loguru._better_exceptions import ExceptionFormatter

    import hcx.data.executors  # noqa: F401 - installs the cache

    cached = ExceptionFormatter._get_lib_dirs
    assert hasattr(cached, "cache_info")
    assert cached() == cached.__wrapped__() and cached() == cached()


COUNTING_TASKS = r"""
import sys
from pathlib import Path
import multiprocess
from datatrove.pipeline.base import PipelineStep
from hcx.config import load_recipe
from hcx.data.executors import make_executor

class Count(PipelineStep):
    name = "count"
    def run(self, data=None, rank=0, world_size=1):
        self.stat_update("documents", value=rank + 1)

def no_manager(*args, **kwargs):
    raise AssertionError("the local executor started a multiprocessing manager")

if __name__ == "__main__":
    multiprocess.Manager = no_manager
    recipe = load_recipe(sys.argv[1], [f"data.prepare.workers={sys.argv[3]}"])
    make_executor(recipe, "process", [Count()], 6, Path(sys.argv[2])).run()
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_local_tasks_run_without_a_manager_and_count_their_own_stats(tmp_path, workers):
    """hcx's local executor sends the executor to each pool worker once instead of with
    every task (and with no multiprocessing manager, whose proxies cost six handshakes a
    task). Each task still gets a fresh pipeline: its statistics are its own, and the
    stage's are their sum."""
    script = tmp_path / "count.py"
    script.write_text(COUNTING_TASKS)
    recipe = make_recipe(tmp_path, [{"name": "a", "language": "en", "path": str(tmp_path / "a.jsonl")}])
    logs = tmp_path / "logs"
    subprocess.run([sys.executable, str(script), str(recipe), str(logs), str(workers)], check=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)

    def documents(path: Path) -> int:
        from datatrove.utils.stats import MetricStats

        return MetricStats.from_dict(json.loads(path.read_text())[0]["stats"]["documents"]).total

    assert sorted(p.name for p in (logs / "completions").iterdir()) == [f"{r:05d}" for r in range(6)]
    assert [documents(logs / "stats" / f"{r:05d}.json") for r in range(6)] == [1, 2, 3, 4, 5, 6]
    assert documents(logs / "stats.json") == 21


REQUEUED_TASK = r"""
import os, signal, sys
from pathlib import Path
from datatrove.pipeline.base import PipelineStep
from hcx.config import load_recipe
from hcx.data.executors import make_executor

class TimeLimit(PipelineStep):
    # What SLURM does `grace` seconds before the time limit: USR1 to the job step.
    name = "time limit"
    def run(self, data=None, rank=0, world_size=1):
        Path(sys.argv[2], "started").touch()
        if not Path(sys.argv[2], "requeued").exists():
            os.kill(os.getpid(), signal.SIGUSR1)

ex = make_executor(load_recipe(sys.argv[1], ["data.prepare.executor.kind=slurm"]), "process",
                   [TimeLimit()], 1, Path(sys.argv[2]) / "logs")
ex.logging_dir.open("ranks_to_run.json", "w").write("[0]")
ex.run()  # as in the job: SLURM_ARRAY_TASK_ID is set, so the task runs here
"""


def test_slurm_task_requeues_its_job_on_usr1_before_the_time_limit(tmp_path):
    """USR1 (sent `grace` seconds before the limit) makes the task ask SLURM to requeue
    its job and exit without a completion marker; the requeued job then completes it."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text(FAKE_SCONTROL + 'if [ "$1" = requeue ]; then echo "$@" >> '
                                   '"$FAKE_SLURM_LOG"; touch "$(dirname "$FAKE_SLURM_LOG")/requeued"; fi\n')
    (bin_ / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_NODELIST": "localhost",
           "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log")}
    args = [sys.executable, "-c", REQUEUED_TASK, str(make_recipe(tmp_path, SOURCES)), str(tmp_path)]
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 15, first.stderr
    assert (tmp_path / "started").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not (tmp_path / "logs" / "completions" / "00000").exists()
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "logs" / "completions" / "00000").exists()


DEDUP_ONLY = r"""
import json, resource, sys
from pathlib import Path
from hcx.config import load_recipe
from hcx.data.pipeline import ClusterDuplicates, FindDuplicates, load_plan

recipe, work = load_recipe(sys.argv[1]), sys.argv[2]
find = FindDuplicates(recipe, work, [])
for rank in range(find.tasks()):
    find.run(None, rank, find.tasks())
ClusterDuplicates(recipe, work, []).run(None, 0, 1)
removed = sum(Path(f).stat().st_size // 4 for f in Path(work).glob("*/remove/*.remove"))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "removed": removed}))
"""


def fake_signatures(recipe, work: Path, shards: int, docs: int) -> int:
    """Stage 1's dedup output for ``shards`` x ``docs`` documents (random signatures; every
    20th document an exact copy of the one before it and every 20th+10 a near copy),
    without tokenizing anything. Returns the number of duplicates planted."""
    import numpy as np

    from hcx.data.pipeline import FindDuplicates, write_buckets

    config = FindDuplicates(recipe, str(work), []).near_config()
    rng = np.random.default_rng(0)
    planted = 0
    for rank in range(shards):
        sig = rng.integers(0, 2**32 - 2, size=(docs, 128), dtype=np.uint32)
        exact = rng.integers(0, 2**32 - 2, size=(docs, 2), dtype=np.uint32)
        sig[20::20] = sig[19:-1:20]
        exact[20::20] = exact[19:-1:20]
        sig[10::20, :8] = sig[9:-1:20, :8]        # 120 of 128 entries equal: a near copy
        sig[10::20, 8:] = sig[9:-1:20, 8:]
        sig[10::20, :8] += 1
        planted += len(range(20, docs, 20)) + len(range(10, docs, 20))
        used = config.num_buckets * config.hashes_per_bucket
        write_buckets(work / "near" / "signatures", rank,
                      sig[:, :used].reshape(docs, config.num_buckets, config.hashes_per_bucket))
        write_buckets(work / "exact" / "signatures", rank, exact.reshape(docs, 1, 2))
        (work / "near" / "full").mkdir(parents=True, exist_ok=True)
        np.save(work / "near" / "full" / f"{rank:05d}.npy", sig)
    return planted


@pytest.mark.slow
def test_dedup_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of the process running every dedup task (buckets and clusters), for
    20,000 and 80,000 documents: the same, within noise. (Keeping signatures in memory,
    as hcx did before datatrove, costs ~1.5 KB per document: +90 MB here; memory-mapping
    them for the confirmation pass cost +60 MB at 160,000 documents.)"""
    recipe = make_recipe(tmp_path, SOURCES)
    peaks = {}
    for scale in (1, 4):
        work = tmp_path / f"x{scale}"
        planted = fake_signatures(__import__("hcx.config").config.load_recipe(recipe), work,
                                  shards=4 * scale, docs=5_000)
        proc = subprocess.run([sys.executable, "-c", DEDUP_ONLY, str(recipe), str(work)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.splitlines()[-1])
        assert result["removed"] == planted  # every planted copy found, nothing else
        peaks[scale] = result["peak_rss_mb"]
    print(f"dedup peak RSS: {peaks[1]:.0f} MB at 1x, {peaks[4]:.0f} MB at 4x")
    assert peaks[4] < peaks[1] + 30, peaks
