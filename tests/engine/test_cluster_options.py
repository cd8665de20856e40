"""Cluster options: communication overlap, activation recomputation, FP8 and context
parallelism (validation, refusal on this machine, planner figures), and the W&B / MLflow
trackers.

- overlap on and off (DP=2, gloo, two real runs) give the same losses within 1e-6; the
  "off" run also logs to W&B (offline) and MLflow (a local store), which must receive
  the scalars of metrics.jsonl and the recipe;
- selective and full recomputation give the losses and gradients of no recomputation
  within 1e-6 (one process);
- FP8 / CP: every rule names its key; this CPU machine refuses them saying what they need;
- planner: selective / full / none and cp figures against hand computations, and the
  selective formula for megatron's local layers against the tensors autograd keeps.
"""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, hcx, losses, small_recipe

TINY = ROOT / "recipes" / "tiny.yaml"


def _tiny(*overrides: str):
    from hcx.config import load_recipe

    return load_recipe(TINY, ["data.eval_every=0", *overrides])


def _refused(*overrides: str) -> str:
    from hcx.config import RecipeError

    with pytest.raises(RecipeError) as e:
        _tiny(*overrides)
    return str(e.value)


# --- recipe rules ----------------------------------------------------------------


def test_recompute_accepts_old_booleans_and_new_names():
    assert _tiny("train.recompute=true").train.recompute == "full"
    assert _tiny("train.recompute=false").train.recompute == "none"
    assert _tiny("train.recompute=selective").train.recompute == "selective"
    r = _tiny("train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=2")
    assert (r.train.recompute_method, r.train.recompute_num_layers) == ("block", 2)


@pytest.mark.parametrize("overrides, key, words", [
    (["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
      "parallel.distributed_optimizer=false"], "parallel.overlap_param_gather",
     "needs parallel.distributed_optimizer=true"),
    (["parallel.overlap_param_gather=true"], "parallel.overlap_param_gather",
     "needs parallel.overlap_grad_reduce=true"),
    (["train.recompute=selective", "train.recompute_num_layers=2"], "train.recompute_num_layers",
     "full recomputation only"),
    (["train.recompute=full", "train.recompute_num_layers=5"], "train.recompute_num_layers",
     "exceeds the 4 layers"),
    (["parallel.cp=3"], "data.seq_length", "divisible by 2 x parallel.cp = 6"),
    (["parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_length=8",
      "model.max_position_embeddings=8"], "data.seq_length", "2 x parallel.cp x parallel.tp = 16"),
    (["parallel.cp=2", "model.transformer_impl=local"], "parallel.cp",
     "needs Transformer Engine's attention"),
    (["train.fp8.recipe=delayed", "train.precision=fp32"], "train.fp8", "not fp32"),
    (["train.fp8.recipe=tensorwise", "model.transformer_impl=local"], "train.fp8",
     "needs Transformer Engine's layers"),
    (["train.fp8.format=e5m2"], "train.fp8.format", "e4m3"),
    (["train.fp8.recipe=nvfp4"], "train.fp8.recipe", "mxfp8"),
])
def test_cluster_option_rules_name_the_key(overrides, key, words):
    msg = _refused(*overrides)
    assert key in msg and words in msg, msg


def test_context_parallelism_is_refused_outside_pretraining():
    from hcx.config import RecipeError
    from hcx.stages import stage_for

    recipe = _tiny("parallel.cp=2")
    assert stage_for("pretrain", recipe).resolve(recipe).parallel.cp == 2
    with pytest.raises(RecipeError, match="parallel.cp=2: context parallelism is implemented "
                                          "for pretraining only, not for sft"):
        stage_for("sft", recipe).resolve(recipe)


# --- this machine ----------------------------------------------------------------


def test_fp8_and_cp_are_refused_without_cuda_saying_what_they_need(monkeypatch):
    import torch

    from hcx.engine.model import check_machine
    from hcx.errors import MachineError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_machine(_tiny())  # nothing asked: nothing refused
    with pytest.raises(MachineError) as e:
        check_machine(_tiny("train.fp8.recipe=delayed"))
    assert "train.fp8 (recipe delayed) needs NVIDIA GPUs with Transformer Engine" in str(e.value)
    assert "no CUDA device" in str(e.value) and "train.fp8=null" in str(e.value)
    with pytest.raises(MachineError, match=r"parallel.cp=2 needs NVIDIA GPUs .*parallel.cp=1"):
        check_machine(_tiny("parallel.cp=2"))


def test_fp8_without_transformer_engine_or_on_an_old_gpu_is_refused(monkeypatch):
    import torch

    from hcx.engine.model import check_machine
    from hcx.errors import MachineError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails
    with pytest.raises(MachineError, match=r"needs Transformer Engine, which does not import "
                                           r"here .*pip install .*transformer_engine"):
        check_machine(_tiny("train.fp8.recipe=tensorwise"))
    fake = type(sys)("transformer_engine")
    fake.pytorch = type(sys)("transformer_engine.pytorch")
    monkeypatch.setitem(sys.modules, "transformer_engine", fake)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", fake.pytorch)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(MachineError, match=r"compute capability 8.9 or newer .*A100.* is 8.0"):
        check_machine(_tiny("train.fp8.recipe=delayed"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check_machine(_tiny("train.fp8.recipe=blockwise"))  # Hopper: fine
    with pytest.raises(MachineError, match=r"mxfp8 needs GPUs of compute capability 10.0"):
        check_machine(_tiny("train.fp8.recipe=mxfp8"))


def test_megatron_settings_for_the_options():
    from hcx.config import FP8Config
    from hcx.engine.model import fp8_settings, recompute_settings

    assert recompute_settings("none") == {"recompute_granularity": None}
    assert recompute_settings(False) == {"recompute_granularity": None}
    assert recompute_settings("selective") == {"recompute_granularity": "selective",
                                               "recompute_modules": ["core_attn"]}
    assert recompute_settings(True) == {"recompute_granularity": "full",
                                        "recompute_method": "uniform", "recompute_num_layers": 1}
    assert recompute_settings("full", "block", None, 6)["recompute_num_layers"] == 6
    assert fp8_settings(None) == {}
    assert fp8_settings(FP8Config(recipe="tensorwise", format="e4m3")) == {
        "fp8": "e4m3", "fp8_recipe": "tensorwise"}
    assert fp8_settings(FP8Config(recipe="delayed"))["fp8_amax_history_len"] == 1024


# --- recomputation gives the same training -----------------------------------------


class _RandomTokens:
    """Fixed random micro-batches (no data files): what the loop needs of a task."""

    def __init__(self, engine, vocab: int):
        import torch

        self.engine = engine
        self.rows_per_microbatch = engine.recipe.train.micro_batch_size
        gen = torch.Generator().manual_seed(7)
        s, b = engine.recipe.data.seq_length, self.rows_per_microbatch
        self.data = [torch.randint(0, vocab, (b, s + 1), generator=gen) for _ in range(6)]

    def microbatches(self, step):
        import torch

        out = []
        for t in self.data[2 * step:2 * step + 2]:
            s = t.shape[1] - 1
            out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(t.shape[0], s),
                        "position_ids": torch.arange(s).expand(t.shape[0], s)})
        return out

    def forward_step(self, model, batch):
        from functools import partial

        from hcx.stages.pretrain import lm_loss

        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return out, partial(lm_loss, batch["loss_mask"])


def _train_three_steps(*overrides: str) -> tuple[list[float], list[float]]:
    from hcx.engine.loop import build_engine, run_step

    recipe = _tiny("model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
                   "model.vocab_size=256", "data.seq_length=64", "train.micro_batch_size=2",
                   "train.global_batch_size=4", "train.warmup_steps=0", *overrides)
    engine = build_engine(recipe, 256)
    task = _RandomTokens(engine, 256)
    out, norms = [], []
    for step in range(3):
        out.append(run_step(engine, task, step)["loss"])
        _, norm, _ = engine.optimizer.step()
        norms.append(float(norm))
        engine.scheduler.step(increment=recipe.train.global_batch_size)
    return out, norms


def test_selective_and_full_recomputation_train_as_none():
    from hcx.engine import parallel

    try:
        ref = _train_three_steps()
        for overrides in (["train.recompute=selective"], ["train.recompute=full"],
                          ["train.recompute=full", "train.recompute_method=block",
                           "train.recompute_num_layers=1"]):
            got = _train_three_steps(*overrides)
            for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
                assert abs(a - b) < 1e-6, (overrides, ref, got)
    finally:
        parallel.shutdown()
    assert ref[0][2] < ref[0][0]  # it trains (the comparison is not between constants)


def test_overlap_param_gather_with_several_buckets_is_refused():
    from hcx.config import RecipeError
    from hcx.engine import parallel
    from hcx.engine.loop import build_engine

    recipe = _tiny("model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
                   "model.vocab_size=256", "data.seq_length=64",
                   "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
                   "parallel.bucket_size=20000")
    try:
        with pytest.raises(RecipeError, match=r"parallel.overlap_param_gather with \d+ buckets "
                                              r".*cannot resume correctly"):
            build_engine(recipe, 256)
    finally:
        parallel.shutdown()


# --- planner ---------------------------------------------------------------------


def test_planner_recompute_and_cp_by_hand():
    """The tiny model (h 128, f 352, 4 heads, 2 KV groups of 32, 4 layers), fused
    layers, bf16, micro batch 4 x 256, vocabulary 32,768."""
    from hcx.ops.plan import (estimate_stage, layer_input_bytes, layout_from_recipe,
                              parameter_counts, stage_activation_bytes)

    m = _tiny().model
    lo = layout_from_recipe(_tiny()).replace(precision="bf16", layer_impl="fused")
    s, b = 256, 4
    # Per token: 4h replicated + (h + 2kv + h + 2f + f) split, 2 bytes, + 4a fp32 stats.
    layer = s * b * (2 * 4 * 128 + 2 * (128 + 128 + 128 + 704 + 352) + 4 * 4)
    selective = layer - s * b * 4 * 4  # core attention recomputed: the statistics go
    inp = s * b * 128 * 2  # a layer's input
    rope = 4.0 * s * 32
    ids = s * b * 8
    out = stage_activation_bytes(m, 32768, lo, 0, "none") - 4 * layer - ids
    assert stage_activation_bytes(m, 32768, lo, 0, "none") == 4 * layer + ids + out
    assert stage_activation_bytes(m, 32768, lo, 0, "selective") == 4 * selective + ids + out
    assert stage_activation_bytes(m, 32768, lo, 0, "full") == 4 * inp + rope + layer + ids + out
    two = lo.replace(recompute_num_layers=2)  # uniform chunks of 2: 2 inputs, 2 layers rebuilt
    assert stage_activation_bytes(m, 32768, two, 0, "full") == 2 * inp + rope + 2 * layer + ids + out
    block = lo.replace(recompute_method="block", recompute_num_layers=1)
    assert stage_activation_bytes(m, 32768, block, 0, "full") == \
        inp + 3 * layer + rope + layer + ids + out
    assert layer_input_bytes(m, lo) == inp
    # Context parallelism 2: every activation over 2, optimizer shards over dp x cp.
    cp = lo.replace(cp=2, dp=1)
    for r in ("none", "selective", "full"):
        assert stage_activation_bytes(m, 32768, cp, 0, r) == \
            stage_activation_bytes(m, 32768, lo, 0, r) / 2
    padded = 32768
    counts = parameter_counts(m, padded)
    one, two_cp = estimate_stage(m, counts, padded, lo, 0), estimate_stage(m, counts, padded, cp, 0)
    assert two_cp.moments == one.moments / 2 and two_cp.main_weights == one.main_weights / 2
    assert two_cp.weights == one.weights and two_cp.grads == one.grads
    assert cp.gpus == 2


def test_plan_reports_korthikanti_none_selective_full():
    from hcx.ops.plan import format_plan, korthikanti_layer_bytes, plan_recipe

    s, b, h, a = 32768, 1, 4096, 32
    assert korthikanti_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_layer_bytes(s, b, h, a, selective=True) == s * b * h * 34
    assert korthikanti_layer_bytes(s, b, h, a, 2, True, full=True) == 2 * s * b * h / 2
    plan = plan_recipe(ROOT / "recipes" / "cluster-8b-32k.yaml")
    assert plan.layout.cp == 2 and plan.layout.recompute == "none" and plan.verdict == "fits"
    st = plan.worst
    assert st.activations_full_recompute < st.activations_selective_recompute < \
        st.activations_no_recompute
    text = format_plan(plan)
    assert "layout: tp=2 pp=1 cp=2 dp=8" in text and "parallel.cp=2: each GPU holds 16384" in text
    before = plan_recipe(ROOT / "recipes" / "cluster-8b-32k.yaml", ["parallel.cp=1",
                                                                    "parallel.dp=16"])
    assert before.verdict == "does not fit"
    assert any("parallel.cp=2" in x for x in before.suggestions), before.suggestions


def test_selective_formula_matches_saved_tensors_of_local_layers():
    """megatron's core-attention checkpoint on the local layers, measured: with GQA it
    keeps more than no recomputation (V keeps the fused QKV output alive)."""
    import torch

    from hcx.engine import parallel
    from hcx.engine.model import build_gpt
    from hcx.ops.plan import local_layer_activation_bytes
    from tests.ops.test_plan import saved_activation_bytes

    recipe4, recipe2 = _tiny(), _tiny("model.num_layers=2")
    from hcx.config import ParallelConfig

    parallel.initialize(ParallelConfig(), seed=1)
    try:
        measured = {L: saved_activation_bytes(build_gpt(r.model, r.parallel, 32768, 256,
                                                        torch.float32, True, True,
                                                        recompute="selective"), 4, 256, 32768)
                    for L, r in ((4, recipe4), (2, recipe2))}
    finally:
        parallel.shutdown()
    layer = (measured[4] - measured[2]) / 2
    est = local_layer_activation_bytes(recipe4.model, 256, 4, 1, False, 4, selective=True)
    assert est == pytest.approx(layer, rel=0.01)
    assert est > local_layer_activation_bytes(recipe4.model, 256, 4, 1, False, 4)


# --- trackers --------------------------------------------------------------------


def wandb_records(run_dir: Path):
    """The records of W&B's offline run file (LevelDB log format after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    path = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[-1]
    data, pos, block, buf = Path(path).read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for r in wandb_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                     for i in r.history.item}
            out.setdefault(int(items["_step"]), {}).update(items)
    return out


def test_missing_tracker_package_names_the_extra(monkeypatch, tmp_path):
    from hcx.engine.tracking import Trackers, TrackerError

    for extra in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, extra, None)
        recipe = _tiny(f"logging.{extra}.{'mode' if extra == 'wandb' else 'experiment'}="
                       f"{'offline' if extra == 'wandb' else 'x'}")
        with pytest.raises(TrackerError, match=rf"pip install hcx\[{extra}\]"):
            Trackers.from_recipe(recipe, tmp_path)
        monkeypatch.delitem(sys.modules, extra)


@pytest.mark.slow
def test_overlap_on_and_off_train_alike_and_trackers_get_the_scalars(tmp_path, prepared_prefix,
                                                                      monkeypatch):
    """DP=2 over gloo: megatron's overlapped gradient reduce-scatter and parameter
    all-gather (async collectives issued from backward hooks / forward pre-hooks) give
    the losses of the synchronous path. The "off" run logs to W&B and MLflow."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = small_recipe(tmp_path / "recipe.yaml", tmp_path / "off", prepared_prefix,
                          train={"steps": 5, "global_batch_size": 8, "micro_batch_size": 2,
                                 "warmup_steps": 1},
                          checkpoint={"save_every": 0},
                          logging={"progress": False, "tensorboard": False, "log_every": 1,
                                   "wandb": {"project": "hcx-test", "mode": "offline"},
                                   "mlflow": {"tracking_uri": store, "experiment": "hcx-test"}})
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    hcx("pretrain", str(recipe), "parallel.dp=2", cache)
    hcx("pretrain", str(recipe), "parallel.dp=2", cache, f"output_dir={tmp_path / 'on'}",
        "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
        "logging.wandb=null", "logging.mlflow=null")
    off, on = losses(tmp_path / "off"), losses(tmp_path / "on")
    assert sorted(off) == sorted(on) == [1, 2, 3, 4, 5]
    for step in off:
        assert abs(off[step] - on[step]) < 1e-6, (step, off[step], on[step])

    records = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    history = wandb_history(tmp_path / "off")
    for rec in records:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert history[rec["step"]][f"train/{key}"] == pytest.approx(rec[key], rel=1e-6)
    config = [r for r in wandb_records(tmp_path / "off") if r.WhichOneof("record_type") == "run"]
    items = {i.key: json.loads(i.value_json) for i in config[-1].run.config.update}
    assert items["train"]["steps"] == 5 and items["parallel"]["dp"] == 2

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    ids = json.loads((tmp_path / "off" / "trackers.json").read_text())
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.data.params["train.steps"] == "5" and run.data.params["parallel.dp"] == "2"
    losses_logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert losses_logged == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)

    # hcx eval --log-to: the scores land in the same runs (here through the helper the
    # command calls, at the checkpoint's step).
    from hcx.engine.tracking import log_scores

    assert log_scores(tmp_path / "off", {"kobest_boolq/acc": 0.5}, step=5) == ["wandb", "mlflow"]
    got = client.get_metric_history(run.info.run_id, "eval/kobest_boolq/acc")
    assert [(m.step, m.value) for m in got] == [(5, 0.5)]


# --- bench/gpu_check.sh ----------------------------------------------------------


def test_gpu_check_dry_run_prints_the_plan(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run",
                           "--out", str(tmp_path / "gpu.md")], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout
    for step in ("pip install --no-index --find-links", "nvidia-smi",
                 "hcx.cli pretrain recipes/tiny.yaml", "train.precision=bf16",
                 "train.precision=fp32", "parallel.tp=2", "bench/train_throughput.py",
                 "recipes/bench-1b.yaml", "bench/eval_throughput.py",
                 "bench/generate_throughput.py", "checkpoint.async_save=true",
                 str(tmp_path / "gpu.md")):
        assert step in plan, (step, plan)
    assert not (tmp_path / "gpu.md").exists()  # a dry run runs nothing


def test_eval_log_to_sends_every_task_metric_at_the_checkpoint_step(monkeypatch, tmp_path):
    """``hcx eval --log-to``: scores.json's metrics, flattened, at the checkpoint's step."""
    from hcx.commands import evaluate as cmd
    from hcx.engine import tracking
    from hcx.evaluation import runner

    sent = {}
    monkeypatch.setattr(tracking, "log_scores",
                        lambda run, scores, step: sent.update(run=run, scores=scores, step=step)
                        or ["mlflow"])
    monkeypatch.setattr(runner, "checkpoint_step", lambda model: 40)
    scores = {"tasks": {"kobest_copa": {"metrics": {"acc": {"value": 0.5, "stderr": 0.1},
                                                    "acc_norm": {"value": 0.25}}},
                        "ifeval": {"metrics": {"strict": {"value": None}}}}}
    cmd.log_to_trackers(tmp_path, scores, model=None)
    assert sent == {"run": tmp_path, "step": 40,
                    "scores": {"kobest_copa/acc": 0.5, "kobest_copa/acc_norm": 0.25}}


def test_context_parallel_part_is_megatrons_load_balanced_split():
    """cp=2: the sequence in 4 chunks, rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
    (each gets an equal share of causal attention's work)."""
    import torch

    from hcx.engine.batches import context_parallel_part

    batch = {"tokens": torch.arange(16).expand(2, 16), "n": 3}
    assert context_parallel_part(batch, 1, 0) is batch
    r0, r1 = (context_parallel_part(batch, 2, r) for r in (0, 1))
    assert r0["tokens"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert r1["tokens"][1].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert r0["n"] == 3 and r0["tokens"].shape == (2, 8)
