"""The engine under torchrun on gloo: parallel layouts, resharding, crash and resume.

Every run goes through the real ``hcx pretrain`` command line, which starts
``torchrun --nproc-per-node 2`` itself when the recipe needs two processes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hcx.engine import checkpoint as ckpt
from tests.conftest import ROOT, hcx, losses, small_recipe

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "dp2": ["parallel.dp=2"],  # the distributed optimizer shards its state over the 2 ranks
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared_prefix):
    """An uninterrupted single-process run, checkpointing every step."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = small_recipe(tmp / "recipe.yaml", tmp / "run", prepared_prefix,
                          checkpoint={"save_every": 1, "keep_last": 10})
    proc = hcx("pretrain", str(recipe))
    return {"recipe": recipe, "run": tmp / "run", "losses": losses(tmp / "run"), "log": proc}


@pytest.fixture(scope="module")
def layout_run(reference, tmp_path_factory):
    """``layout_run(name)``: the reference's checkpoint of step 1 resumed at layout
    ``name`` for steps 2-6 (synchronous saves at 2, 4, 6), run once per module."""
    runs = {}

    def run(layout: str) -> dict:
        if layout not in runs:
            dest = tmp_path_factory.mktemp(layout) / "run"
            start_from(reference, 1, dest)
            proc = hcx("pretrain", str(reference["recipe"]), f"output_dir={dest}",
                       *LAYOUTS[layout])
            runs[layout] = {"run": dest, "proc": proc, "losses": losses(dest)}
        return runs[layout]

    return run


def start_from(reference, step: int, dest: Path) -> None:
    """Give a new run directory the reference's checkpoint of ``step`` to resume from."""
    name = ckpt.step_dir_name(step)
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference["run"] / "checkpoints" / name, dest / "checkpoints" / name)
    (dest / "checkpoints" / "latest").write_text(name + "\n")


def test_reference_run_learns_and_logs(reference):
    ref = reference["losses"]
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert ref[6] < ref[1] - 0.5  # it learns
    records = [json.loads(x) for x in (reference["run"] / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu"):
        assert all(key in r for r in records), key
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(3e-3)  # warmup of 2
    assert list((reference["run"] / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layout_matches_single_process(reference, layout_run, layout):
    """Resume the single-process checkpoint of step 1 at another layout: the next 5
    optimizer steps (same global batches) give the same losses within 1e-5."""
    run = layout_run(layout)
    proc = run["proc"]
    assert "launching 2 processes" in proc.stderr
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    got, ref = run["losses"], reference["losses"]
    assert sorted(got) == [2, 3, 4, 5, 6]
    for step in got:
        assert abs(got[step] - ref[step]) < 1e-5, (layout, step, got[step], ref[step])


def test_tp1_checkpoint_loads_at_tp2_and_pp2_with_identical_logits(reference, tmp_path):
    final = reference["run"] / "checkpoints" / ckpt.step_dir_name(6)
    worker = ROOT / "tests" / "workers" / "logits.py"
    out = {}
    for name, nproc, overrides in [("tp1", 1, []), ("tp2", 2, ["parallel.tp=2"]),
                                   ("pp2", 2, ["parallel.pp=2"])]:
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                        str(worker), str(reference["recipe"]), str(final), str(path), *overrides],
                       check=True, capture_output=True, timeout=300, cwd=ROOT)
        out[name] = torch.load(path)
    assert out["tp1"].shape == (2, 32, 259)
    assert torch.equal(out["pp2"], out["tp1"])  # same math, split across stages
    # TP splits each matmul's reduction across ranks: equal up to fp32 rounding.
    assert torch.allclose(out["tp2"], out["tp1"], atol=1e-5, rtol=0)


def run_and_kill_after(args: list[str], run_dir: Path, kill_after_step: int,
                       command: str = "pretrain", env: dict | None = None,
                       before_kill=None) -> None:
    """Start ``hcx COMMAND`` and SIGKILL its whole process group once ``kill_after_step``
    is in metrics.jsonl (calling ``before_kill()`` just before)."""
    proc = subprocess.Popen([sys.executable, "-m", "hcx.cli", command, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if metrics.exists() and any(json.loads(x)["step"] >= kill_after_step
                                        for x in metrics.read_text().splitlines()):
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("the run did not reach the step to kill at")
        if before_kill is not None:
            before_kill()
    finally:
        kill_process_tree(proc.pid)
        proc.wait()


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and everything it started, as a machine failure would: its process
    group and those of its descendants (torchrun starts each worker in a session of its
    own, and a worker's checkpoint writers are forked into the worker's group)."""
    import psutil

    groups = {pid}
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                groups.add(os.getpgid(child.pid))
            except ProcessLookupError:
                pass
    except psutil.NoSuchProcess:
        pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("layout", ["single", "pp2"])
def test_sigkill_then_resume_is_bit_exact(reference, layout_run, tmp_path, layout):
    extra = [] if layout == "single" else LAYOUTS[layout]
    run = tmp_path / "killed"
    if layout == "single":
        expected = reference["losses"]
    else:  # bit-exactness is against an uninterrupted run of the same layout from step 1
        expected = layout_run(layout)["losses"]
        start_from(reference, 1, run)
    args = [str(reference["recipe"]), f"output_dir={run}", "checkpoint.save_every=2", *extra]
    run_and_kill_after(args, run, kill_after_step=3)
    assert max(losses(run)) < 6, "killed too late to test anything"
    proc = hcx(*["pretrain", *args])
    assert "resumed from" in proc.stdout
    assert losses(run) == expected  # exact float equality, every step


def test_half_written_checkpoint_is_skipped(reference, tmp_path):
    """What a crash leaves on disk: a save interrupted in the middle (``.incomplete``),
    and a ``latest`` naming a damaged checkpoint. Resume skips both and says so."""
    run = tmp_path / "run"
    start_from(reference, 2, run)
    start_from_dir = run / "checkpoints"
    # An older complete one too, for the fallback.
    shutil.copytree(reference["run"] / "checkpoints" / ckpt.step_dir_name(1),
                    start_from_dir / ckpt.step_dir_name(1))
    # 1) Crash while writing step 4: partial shards, no hcx.json.
    partial = start_from_dir / (ckpt.step_dir_name(4) + ckpt.INCOMPLETE)
    shutil.copytree(reference["run"] / "checkpoints" / ckpt.step_dir_name(4), partial)
    (partial / ckpt.META).unlink()
    shard = next(partial.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    # 2) The checkpoint 'latest' names lost a file after it was written.
    damaged = start_from_dir / ckpt.step_dir_name(2)
    next(damaged.glob("*.distcp")).unlink()
    # 3) A newer one, complete, whose shard had a byte flipped on disk.
    flipped = start_from_dir / ckpt.step_dir_name(3)
    shutil.copytree(reference["run"] / "checkpoints" / flipped.name, flipped)
    flip_byte(flipped / "__0_1.distcp")

    proc = hcx("pretrain", str(reference["recipe"]), f"output_dir={run}")
    assert f"skipping half-written checkpoint {partial}" in proc.stdout
    assert f"names {damaged}, which is not usable (missing file" in proc.stdout
    assert f"skipping {flipped}: file __0_1.distcp is damaged" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    assert losses(run) == {s: v for s, v in reference["losses"].items() if s > 1}
    assert not partial.exists()  # cleaned up once a new checkpoint landed


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(reference, tmp_path):
    run = tmp_path / "run"
    proc = hcx("pretrain", str(reference["recipe"]), f"output_dir={run}", "train.lr=1e6",
               "train.grad_clip=0", "checkpoint.save_every=1", check=False)
    assert proc.returncode == 1
    import re

    m = re.search(r"(loss|gradient norm) is (nan|inf|-inf) at step (\d+); stopping", proc.stderr)
    assert m, proc.stderr[-2000:]
    bad_step = int(m.group(3))
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == ckpt.step_dir_name(bad_step - 1)
    assert ckpt.verify(run / "checkpoints" / latest) is None
    assert not list((run / "checkpoints").glob(f"*{bad_step:08d}*"))


@pytest.mark.parametrize("layout", ["single", "tp2", "async"])
def test_sigterm_saves_and_resumes(reference, tmp_path, layout):
    """SIGTERM (as SLURM preemption sends) stops after the current step with a
    checkpoint of it; the same command resumes and reproduces the losses. With async
    saves, the stop waits for the checkpoint's background write and publishes it."""
    own = {"single": [], "async": ["checkpoint.async_save=true"]}
    extra = own[layout] if layout in own else LAYOUTS[layout]
    run = tmp_path / "run"
    args = [str(reference["recipe"]), f"output_dir={run}", "checkpoint.save_every=0", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "hcx.cli", "pretrain", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to hcx itself; it forwards to torchrun's workers
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    m = __import__("re").search(r"stopped by signal 15 after step (\d+)", err)
    assert m, err[-3000:]
    stopped = int(m.group(1))
    assert stopped < 6
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.step_dir_name(stopped)
    resumed = hcx("pretrain", *args)
    assert f"at step {stopped}" in resumed.stdout  # it resumed from the SIGTERM checkpoint
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    ref = reference["losses"]
    assert all(abs(got[s] - ref[s]) < 1e-5 for s in got)


def test_bf16_path_trains_and_resumes_across_layouts(reference, tmp_path):
    """The GPU precision path (Float16Module, bf16 params, fp32 main weights in the
    distributed optimizer) on CPU: tracks fp32 closely, resumes at TP=2."""
    run = tmp_path / "run"
    args = [str(reference["recipe"]), f"output_dir={run}", "train.precision=bf16"]
    hcx("pretrain", *args, "train.steps=4", "train.decay_steps=6", "checkpoint.save_every=2")
    proc = hcx("pretrain", *args, *LAYOUTS["tp2"])
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    got, ref = losses(run), reference["losses"]
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(abs(got[s] - ref[s]) < 0.05 for s in got), (got, ref)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_init_from_loads_weights_into_a_fresh_run(reference, tmp_path, precision):
    """Weights only, fresh optimizer at step 0. Under bf16 the optimizer's fp32 main
    weights must be reloaded too, or its first update restores the random init."""
    final = reference["run"] / "checkpoints" / ckpt.step_dir_name(6)
    proc = hcx("pretrain", str(reference["recipe"]), f"output_dir={tmp_path / 'run'}",
               f"checkpoint.init_from={final}", "train.steps=3", f"train.precision={precision}")
    assert f"initialized weights from {final}" in proc.stdout
    got, ref = losses(tmp_path / "run"), reference["losses"]
    # Step 1 trains at lr 0 (warm-up); step 2 and 3 start from trained weights, far
    # below the random-init loss of the reference's first step.
    assert all(got[s] < ref[1] - 0.3 for s in (1, 2, 3)), (got, ref)


def test_extending_a_finished_run_follows_the_new_schedule(reference, tmp_path):
    run = tmp_path / "run"
    start_from(reference, 6, run)
    proc = hcx("pretrain", str(reference["recipe"]), f"output_dir={run}", "train.steps=8")
    assert "resuming with changed train.steps" in proc.stdout
    records = {json.loads(x)["step"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    # cosine from 3e-3 to 3e-4 over steps 2..8 (2 warm-up steps): at step 7, 4 of 6 decay steps done
    import math
    expected = 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * 4 / 6))
    assert records[7]["lr"] == pytest.approx(expected, rel=1e-6)
    assert sorted(records) == [7, 8]


def test_resume_false_refuses_to_mix_runs(reference):
    proc = hcx("pretrain", str(reference["recipe"]), f"output_dir={reference['run']}",
               "checkpoint.resume=false", check=False)
    assert proc.returncode == 1
    assert "already holds checkpoints (newest step_00000006)" in proc.stderr


def test_prune_keeps_the_new_checkpoint_and_leaves_later_steps(tmp_path):
    for step in (4, 6, 8, 90, 100):
        (tmp_path / ckpt.step_dir_name(step)).mkdir()
    (tmp_path / (ckpt.step_dir_name(10) + ckpt.INCOMPLETE)).mkdir()
    ckpt._prune(tmp_path, keep_last=2, newest=8)
    # the new one and one before it; later steps untouched; interrupted saves removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ckpt.step_dir_name(s) for s in (6, 8, 90, 100)]


def test_validation_loss_is_logged_on_held_out_data(reference, tmp_path):
    run = tmp_path / "run"
    hcx("pretrain", str(reference["recipe"]), f"output_dir={run}", "data.split=50,50,0",
        "data.eval_every=2", "data.eval_batches=2", "train.steps=4", "parallel.pp=2")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    valid = {r["step"]: r["valid/loss"] for r in records if "valid/loss" in r}
    assert sorted(valid) == [2, 4]
    assert all(4.0 < v < 7.0 for v in valid.values())
    assert valid[4] != valid[2]  # the same held-out batches, a model that changed


def test_checkpoint_of_another_shape_is_refused_naming_the_tensor(reference, tmp_path):
    """megatron-core would load a tensor of another shape without complaint; hcx names it."""
    final = reference["run"] / "checkpoints" / ckpt.step_dir_name(6)
    proc = hcx("pretrain", str(reference["recipe"]), f"output_dir={tmp_path / 'run'}",
               f"checkpoint.init_from={final}", "model.ffn_hidden_size=192", check=False)
    assert proc.returncode == 1, proc.stderr
    assert ("tensor decoder.layers.mlp.linear_fc2.weight has shape (2, 64, 176) in the checkpoint "
            "but (2, 64, 192) in this model") in proc.stderr, proc.stderr


# --- checksums, async and fully parallel saves ----------------------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["__0_0.distcp", "common.pt", ".metadata", "metadata.json",
                                    "hcx.json", "rng/rank_00000.pt", "manifest.json"])
def test_flipped_byte_is_refused_naming_the_file(reference, tmp_path, victim):
    """Every file of a checkpoint is checksummed: one flipped byte anywhere and loading
    refuses it by name; resume falls back to the checkpoint before it."""
    import re

    ckpts = tmp_path / "checkpoints"
    for step in (2, 3):
        shutil.copytree(reference["run"] / "checkpoints" / ckpt.step_dir_name(step),
                        ckpts / ckpt.step_dir_name(step))
    (ckpts / "latest").write_text(ckpt.step_dir_name(3) + "\n")
    bad = ckpts / ckpt.step_dir_name(3)
    assert ckpt.checksum_failure(bad) is None
    flip_byte(bad / victim)
    named = rf"(file|unreadable) {re.escape(victim)}"
    with pytest.raises(ckpt.CheckpointError, match=rf"cannot load {re.escape(str(bad))}: {named}"):
        ckpt.load(bad, model=None)
    for find in (ckpt.find_resumable, ckpt.resume_point):
        log = []
        found = find(ckpts, log=log.append)
        assert (found if isinstance(found, Path) else found.path) == ckpts / ckpt.step_dir_name(2)
        assert any(re.search(rf"{re.escape(str(bad))}.*{named}", line) for line in log), log


def test_checkpoint_without_manifest_loads_with_a_warning(reference, tmp_path):
    """Checkpoints of earlier hcx versions have no manifest: still resumable/loadable."""
    old = tmp_path / ckpt.step_dir_name(2)
    shutil.copytree(reference["run"] / "checkpoints" / old.name, old)
    (old / ckpt.MANIFEST).unlink()
    log = []
    ckpt.verify_contents(old, log=log.append)
    assert "has no manifest.json" in log[0] and "without verifying checksums" in log[0]
    assert ckpt.find_resumable(tmp_path, log=log.append).path == old


def test_async_fully_parallel_dp2_survives_sigkill_mid_write(reference, layout_run, tmp_path):
    """DP=2, checkpoints written in the background (async) with the replicated state split
    over both ranks (fully parallel save). SIGKILL while the step-4 save is still being
    written (training already at step 5): resume takes the complete step-2 checkpoint
    (fully parallel load) and reproduces the synchronous DP=2 run bit for bit; keep_last
    prunes only finished checkpoints."""
    sync = layout_run("dp2")["losses"]  # steps 2-6 from step 1, synchronous saves
    run = tmp_path / "run"
    start_from(reference, 1, run)
    ckpts = run / "checkpoints"
    args = [str(reference["recipe"]), f"output_dir={run}", *LAYOUTS["dp2"],
            "checkpoint.async_save=true", "checkpoint.fully_parallel_save=true",
            "checkpoint.fully_parallel_load=true", "checkpoint.save_every=2",
            "checkpoint.keep_last=2"]
    in_flight = ckpts / (ckpt.step_dir_name(4) + ckpt.INCOMPLETE)
    seen = {}

    def mid_write() -> None:  # step 5 trained while the step-4 save is being written
        seen.update(latest=(ckpts / "latest").read_text().strip(), in_flight=in_flight.is_dir())

    # Each rank's writer sleeps 3 s after its shards: the save of step 4 is in flight
    # while step 5 trains.
    run_and_kill_after(args, run, kill_after_step=5, env={ckpt.WRITE_DELAY_ENV: "3"},
                       before_kill=mid_write)
    assert seen == {"latest": ckpt.step_dir_name(2), "in_flight": True}, seen
    assert not (ckpts / ckpt.step_dir_name(4)).exists()
    assert list((ckpts / ckpt.step_dir_name(2)).glob("__1_*.distcp"))  # rank 1 wrote a share
    killed = losses(run)
    assert killed == {s: sync[s] for s in killed} and max(killed) == 5

    proc = hcx("pretrain", *args)
    assert f"skipping half-written checkpoint {in_flight}" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert "in the background" in proc.stdout
    assert losses(run) == sync  # exact float equality, every step
    # keep_last=2 of the finished ones; nothing half-written left behind
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "latest", ckpt.step_dir_name(4), ckpt.step_dir_name(6)]
    assert (ckpts / "latest").read_text().strip() == ckpt.step_dir_name(6)
    assert ckpt.find_resumable(ckpts, log=lambda _: None).step == 6
