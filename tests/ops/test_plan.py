"""``hcx plan``'s estimates against the real megatron model of the tiny recipe.

- parameters: exact, in one process (TP=1: untied, tied, MHA, one KV group) and per
  rank under torchrun at TP=2 and PP=2 (untied and tied);
- activations: the tensors autograd keeps for backward during one forward pass,
  counted by storage (``saved_tensors_hooks``; CPU has no allocator statistics), against
  the estimate for megatron's local layers — per layer and for the output layer, in
  one process and per rank at TP=2 with and without sequence parallelism;
- weights, gradients, optimizer state: the built engine's parameter buffer, DDP
  gradient buffer and distributed-optimizer shards per rank at DP=2, bf16 and fp32;
- the fused-layer formula gives back Korthikanti et al.'s ``34 + 5as/h``;
- FLOPs, time to train, pipeline in-flight counts and the CLI against hand values.

Run alone: ``.venv/bin/python -m pytest -q tests/ops/test_plan.py``; as a worker (by the
test itself): ``torchrun --nproc-per-node 2 tests/ops/test_plan.py OUT.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
BENCH = ROOT / "recipes" / "bench-1b.yaml"

MB, SEQ = 4, 256  # the tiny recipe's micro batch and sequence length
# Measured fp32 activations against the estimate for megatron's local layers (fp32,
# B = 4 bytes): the count follows every tensor those layers keep, so the two agree to
# within a few hundred bytes. 1% leaves room for a PyTorch version that saves one
# small tensor more or less, not for a missing term (the smallest, a norm's output,
# is 5% of a layer).
TOLERANCE = 0.01


def _tiny(*overrides: str):
    from hcx.config import load_recipe

    return load_recipe(TINY, ["data.eval_every=0", *overrides])


def _layout(recipe, **changes):
    from hcx.ops.plan import layout_from_recipe

    return layout_from_recipe(recipe).replace(**changes)


def _padded(recipe) -> int:
    from hcx.engine.model import padded_vocab_size
    from hcx.ops.plan import recipe_vocab_size

    return padded_vocab_size(recipe_vocab_size(recipe), recipe.parallel.tp)


def _build(recipe, padded: int, pre: bool = True, post: bool = True, recompute: bool = False):
    import torch

    from hcx.engine.model import build_gpt

    return build_gpt(recipe.model, recipe.parallel, padded, recipe.data.seq_length,
                     torch.float32, pre, post, recompute=recompute)


def saved_activation_bytes(model, micro_batch: int, seq: int, vocab: int) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward
    pass with loss (parameters left out): what a layout needs for activations."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in params:
            seen[ptr] = storage.nbytes()
        return t  # kept: a saved storage stays alive, so no address is reused

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (micro_batch, seq), generator=gen)
    positions = torch.arange(seq).expand(micro_batch, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, None, labels=tokens)
    return sum(seen.values())


@pytest.fixture(scope="module")
def one_process():
    from hcx.engine import parallel
    from hcx.config import ParallelConfig

    parallel.initialize(ParallelConfig(), seed=1)
    yield
    parallel.shutdown()


# --- parameters ------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=true"],
                                       ["model.num_query_groups=4"],  # MHA
                                       ["model.num_query_groups=1"]])
def test_parameter_count_equals_megatron_model(one_process, overrides):
    from hcx.ops.plan import parameter_counts, stage_parameters

    recipe = _tiny(*overrides)
    padded = _padded(recipe)
    assert padded == 32768  # the shipped tokenizer: 32,768 pieces, already a multiple of 128
    counts = parameter_counts(recipe.model, padded)
    model = _build(recipe, padded)
    real = sum(p.numel() for p in model.parameters())
    assert counts.total == real
    assert stage_parameters(counts, recipe.model.tie_embeddings, 1, 1, 0) == real


def test_parameter_parts_hand_computed():
    from hcx.ops.plan import parameter_counts

    m = _tiny().model  # h 128, f 352, 4 heads of 32, 2 KV groups (kv width 64), 4 layers
    c = parameter_counts(m, 32768)
    assert c.attention_per_layer == 128 * (128 + 2 * 64) + 128 * 128 == 49152
    assert c.mlp_per_layer == 3 * 128 * 352 == 135168
    assert c.per_layer == 49152 + 135168 + 256
    assert c.total == 4 * c.per_layer + 2 * 32768 * 128 + 128 == 9127040
    assert c.matmul == 4 * (49152 + 135168) + 32768 * 128


def test_stage_parameters_hand_computed():
    """TP splits every linear layer and the vocabulary, never the norms; PP puts the
    embedding first and the final norm and output layer last (a copy when tied)."""
    from hcx.ops.plan import parameter_counts, stage_parameters

    m = _tiny().model
    c = parameter_counts(m, 32768)
    layer_tp2 = (49152 + 135168) // 2 + 256
    assert stage_parameters(c, False, 2, 1, 0) == 4 * layer_tp2 + 2 * 16384 * 128 + 128
    assert stage_parameters(c, False, 1, 2, 0) == 2 * c.per_layer + 32768 * 128
    assert stage_parameters(c, False, 1, 2, 1) == 2 * c.per_layer + 32768 * 128 + 128
    tied = parameter_counts(m.model_copy(update={"tie_embeddings": True}), 32768)
    assert stage_parameters(tied, True, 1, 1, 0) == tied.total
    assert stage_parameters(tied, True, 1, 2, 1) == 2 * c.per_layer + 32768 * 128 + 128


# --- activations -----------------------------------------------------------------


def test_activations_match_saved_tensors(one_process):
    """One layer (the difference of 4 and 2 layers), the output layer and loss, and the
    whole stage, measured against the estimate, without and with full recomputation."""
    from hcx.ops.plan import (input_activation_bytes, local_layer_activation_bytes,
                          layer_input_bytes, output_activation_bytes, stage_activation_bytes)

    recipe4, recipe2 = _tiny(), _tiny("model.num_layers=2")
    padded = _padded(recipe4)
    lo = _layout(recipe4, precision="fp32", layer_impl="local")  # what runs on CPU
    m = recipe4.model
    measured = {L: saved_activation_bytes(_build(r, padded), MB, SEQ, padded)
                for L, r in ((4, recipe4), (2, recipe2))}
    layer = (measured[4] - measured[2]) / 2
    est_layer = local_layer_activation_bytes(m, SEQ, MB, 1, False, 4)
    rest = measured[2] - 2 * layer
    est_rest = input_activation_bytes(lo) + output_activation_bytes(m, padded, lo, transient=False)
    whole = stage_activation_bytes(m, padded, lo, 0, recompute=False)
    print(f"\nactivations, tiny recipe, micro batch {MB} x {SEQ}, fp32, local layers:\n"
          f"  one layer   measured {layer:,.0f} B  estimated {est_layer:,.0f} B\n"
          f"  embedding + output + loss  measured {rest:,.0f} B  estimated {est_rest:,.0f} B\n"
          f"  whole model measured {measured[4]:,} B  estimated {whole:,.0f} B")
    assert est_layer == pytest.approx(layer, rel=TOLERANCE)
    assert est_rest == pytest.approx(rest, rel=TOLERANCE)
    assert whole == pytest.approx(measured[4], rel=TOLERANCE)

    # Full recomputation keeps each layer's input (+ RoPE's table, once): the forward
    # pass saves that; the estimate adds one layer rebuilt in the backward pass.
    lo_r = lo.replace(recompute=True)
    kept = saved_activation_bytes(_build(recipe4, padded, recompute=True), MB, SEQ, padded)
    est_kept = stage_activation_bytes(m, padded, lo_r, 0, recompute=True) - est_layer
    layers_kept = kept - rest
    print(f"  full recompute: forward keeps {kept:,} B (layer inputs {layers_kept:,.0f} B), "
          f"estimated {est_kept:,.0f} B (layer inputs {4 * layer_input_bytes(m, lo_r):,.0f} B)")
    assert est_kept == pytest.approx(kept, rel=TOLERANCE)
    assert 4 * layer_input_bytes(m, lo_r) == pytest.approx(layers_kept, rel=0.05)


def test_fused_formula_gives_korthikanti():
    """Their GPT layer (4h GeLU MLP, MHA, dropout, unfused attention, 16-bit values):
    ``s*b*h*(34 + 5as/h)`` with TP + SP over t, ``10 + 24/t + 5as/(ht)`` with TP alone."""
    from hcx.config import ModelConfig
    from hcx.ops.plan import fused_layer_activation_bytes, korthikanti_layer_bytes

    h, a, s, b = 1024, 16, 2048, 2
    gpt = ModelConfig(num_layers=1, hidden_size=h, ffn_hidden_size=4 * h, num_attention_heads=a)
    for t, sp in ((1, False), (4, False), (4, True)):
        ours = fused_layer_activation_bytes(gpt, s, b, t, sp, 2, gated=False, dropout=True,
                                            attention_scores=True)
        assert ours == korthikanti_layer_bytes(s, b, h, a, t, sp)
    assert korthikanti_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_layer_bytes(s, b, h, a, 8, True, selective=True) == s * b * h * 34 / 8


def test_fused_layer_hand_computed():
    """hcx's layer on fused kernels, bf16 (B = 2): per token 4h (norm inputs and
    outputs) + Q h + K, V kv + attention output h + SwiGLU 2f + f values, + 4a bytes of
    softmax statistics. bench-1b: h 2048, kv 512, f 5632, a 16."""
    from hcx.config import load_recipe
    from hcx.ops.plan import fused_layer_activation_bytes

    m = load_recipe(BENCH).model
    per_token = 2 * (4 * 2048 + 2048 + 2 * 512 + 2048 + 3 * 5632) + 4 * 16
    assert fused_layer_activation_bytes(m, 4096, 2, 1, False, 2) == 4096 * 2 * per_token
    # TP 2 + SP: all of it over 2; TP 2 alone: the 4h part stays whole
    assert fused_layer_activation_bytes(m, 4096, 2, 2, True, 2) == 4096 * 2 * per_token / 2
    assert fused_layer_activation_bytes(m, 4096, 2, 2, False, 2) == \
        4096 * 2 * (2 * 4 * 2048 + (per_token - 2 * 4 * 2048) / 2)


def test_microbatches_in_flight_1f1b():
    from hcx.ops.plan import microbatches_in_flight

    assert [microbatches_in_flight(4, i, 8) for i in range(4)] == [4, 3, 2, 1]
    assert [microbatches_in_flight(4, i, 2) for i in range(4)] == [2, 2, 2, 1]
    assert microbatches_in_flight(1, 0, 16) == 1


def test_state_bytes_per_parameter_megatron_table():
    """Megatron-LM's table: bf16 params + fp32 grads 18 / 6 + 12/d; fp32 16 / 8 + 8/d."""
    from hcx.ops.plan import state_bytes_per_parameter as sb

    assert sb("bf16", False, 8).total == 18
    assert sb("bf16", True, 8).total == 6 + 12 / 8
    assert sb("fp32", False, 4).total == 16
    assert sb("fp32", True, 4).total == 8 + 8 / 4


# --- per rank, under torchrun ----------------------------------------------------


def _worker(out: str) -> None:
    """Each rank's parameters, saved activations and optimizer state at several layouts
    of 2 processes."""
    import torch
    from megatron.core import parallel_state

    from hcx.engine import checkpoint
    from hcx.engine import parallel
    from hcx.engine.loop import build_engine

    rank = int(os.environ["RANK"])
    results = []
    layouts = [("tp2_sp", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
               ("tp2", ["parallel.tp=2"]),
               ("pp2", ["parallel.pp=2"]),
               ("pp2_tied", ["parallel.pp=2", "model.tie_embeddings=true"])]
    for name, overrides in layouts:
        for layers in (4, 2):
            recipe = _tiny(*overrides, f"model.num_layers={layers}")
            topo = parallel.initialize(recipe.parallel, seed=1)
            padded = _padded(recipe)
            model = _build(recipe, padded, topo.is_first_stage, topo.is_last_stage)
            row = {"layout": name, "layers": layers, "rank": rank, "tp_rank": topo.tp_rank,
                   "pp_rank": topo.pp_rank, "params": sum(p.numel() for p in model.parameters())}
            if topo.pp == 1:  # a forward pass alone needs no pipeline schedule
                row["activations"] = saved_activation_bytes(model, MB, SEQ, padded)
            results.append(row)
            del model
            parallel_state.destroy_model_parallel()
    for precision in ("bf16", "fp32"):
        recipe = _tiny("parallel.dp=2", f"train.precision={precision}")
        engine = build_engine(recipe, _padded(recipe))
        model_ptrs = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
        main = moments = 0
        for opt in checkpoint._distributed_optimizers(engine.optimizer):
            opt._init_optimizer_states_with_dummy_values()
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    if p.untyped_storage().data_ptr() not in model_ptrs:  # a copy, not a view
                        main += p.numel() * p.element_size()
                    state = opt.optimizer.state[p]
                    moments += sum(state[k].numel() * state[k].element_size()
                                   for k in ("exp_avg", "exp_avg_sq"))
        results.append({
            "layout": f"dp2_{precision}", "rank": rank,
            "params": sum(p.numel() for p in engine.model.parameters()),
            "weights": sum(p.numel() * p.element_size() for p in engine.model.parameters()),
            "grads": sum(b.grad_data.numel() * b.grad_data.element_size()
                         for b in engine.ddp.buffers),
            "main_weights": main, "moments": moments})
        del engine
        parallel_state.destroy_model_parallel()
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps([r for rows in gathered for r in rows]))
    parallel.shutdown()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("plan") / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(Path(__file__)), str(out)], capture_output=True, text=True, timeout=300,
        cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


def _rows(rows: list[dict], layout: str, **where) -> list[dict]:
    return [r for r in rows if r["layout"] == layout and all(r[k] == v for k, v in where.items())]


@pytest.mark.slow
def test_per_rank_parameters_tp2_pp2(per_rank):
    from hcx.ops.plan import parameter_counts, stage_parameters

    for layout, tp, pp, tie in (("tp2_sp", 2, 1, False), ("tp2", 2, 1, False),
                                ("pp2", 1, 2, False), ("pp2_tied", 1, 2, True)):
        recipe = _tiny(f"model.tie_embeddings={str(tie).lower()}")
        counts = parameter_counts(recipe.model, 32768)
        for row in _rows(per_rank, layout, layers=4):
            assert row["params"] == stage_parameters(counts, tie, tp, pp, row["pp_rank"]), row


@pytest.mark.slow
def test_per_rank_activations_tp2(per_rank):
    """TP splits a layer's attention and MLP activations; the norms' only with sequence
    parallelism; the logits are split by the vocabulary."""
    from hcx.ops.plan import local_layer_activation_bytes, stage_activation_bytes

    for layout, sp in (("tp2_sp", True), ("tp2", False)):
        recipe = _tiny("parallel.tp=2", f"parallel.sequence_parallel={str(sp).lower()}")
        lo = _layout(recipe, precision="fp32", layer_impl="local")
        for rank in (0, 1):
            four = _rows(per_rank, layout, layers=4, rank=rank)[0]["activations"]
            two = _rows(per_rank, layout, layers=2, rank=rank)[0]["activations"]
            layer = (four - two) / 2
            est_layer = local_layer_activation_bytes(recipe.model, SEQ, MB, 2, sp, 4)
            est = stage_activation_bytes(recipe.model, 32768, lo, 0, recompute=False)
            print(f"\n{layout} rank {rank}: layer measured {layer:,.0f} B estimated "
                  f"{est_layer:,.0f} B; whole measured {four:,} B estimated {est:,.0f} B")
            assert est_layer == pytest.approx(layer, rel=TOLERANCE)
            assert est == pytest.approx(four, rel=TOLERANCE)


@pytest.mark.slow
def test_per_rank_optimizer_state_dp2(per_rank):
    """bf16: 2 (weights) + 4 (fp32 gradient buffer) + 12/2 (fp32 main weights and two
    moments, sharded) bytes per parameter; fp32: 4 + 4 + 8/2 (no main copy). Megatron
    pads its buffers for alignment, hence the 1%."""
    from hcx.ops.plan import state_bytes_per_parameter

    for precision in ("bf16", "fp32"):
        per = state_bytes_per_parameter(precision, True, 2)
        for row in _rows(per_rank, f"dp2_{precision}"):
            n = row["params"]
            assert n == 9127040
            print(f"\ndp2 {precision} rank {row['rank']}: " + ", ".join(
                f"{k} {row[k]:,} B (estimate {getattr(per, k) * n:,.0f})"
                for k in ("weights", "grads", "main_weights", "moments")))
            assert row["weights"] == per.weights * n
            assert row["grads"] == pytest.approx(per.grads * n, rel=TOLERANCE)
            assert row["main_weights"] == pytest.approx(per.main_weights * n, rel=TOLERANCE,
                                                        abs=0)
            assert row["moments"] == pytest.approx(per.moments * n, rel=TOLERANCE)


# --- FLOPs, time, the command line -----------------------------------------------


def test_flops_and_time_hand_computed():
    """bench-1b on 8 H100s: 6 x matmul weights + 12 L h s per token; time = FLOPs /
    (GPUs x peak x MFU)."""
    from hcx.ops.plan import gpu_spec, plan_recipe

    plan = plan_recipe(BENCH, gpus=8, gpu=gpu_spec("h100"), mfu=0.4)
    L, h, f, s, V = 16, 2048, 5632, 4096, 100352
    matmul = L * (h * (h + 2 * 512) + h * h + 3 * h * f) + V * h
    assert plan.flops_per_token == 6 * matmul + 12 * L * h * s
    assert plan.layout.dp == 8 and plan.tokens == 1000 * 16 * s
    assert plan.seconds == pytest.approx(plan.tokens * plan.flops_per_token / (8 * 989.4e12 * 0.4))
    assert plan.tokens_per_s_per_gpu == pytest.approx(989.4e12 * 0.4 / plan.flops_per_token)
    assert plan.verdict == "fits"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from hcx.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_fits_json(capsys):
    code, out, _ = _cli(capsys, "plan", str(BENCH), "--gpus", "8", "--tokens", "100B", "--json")
    d = json.loads(out)
    assert code == 0 and d["verdict"] == "fits" and d["layout"]["dp"] == 8
    assert d["tokens"] == 100 * 10**9 and d["parameters"]["total"] == 1132529664
    assert d["memory_per_gpu_gib"] < 0.9 * 80


def test_cli_does_not_fit_names_part_and_fixes(capsys):
    # 16 sequences of 4096 per micro-batch on one H100: activations far beyond 80 GiB
    code, out, _ = _cli(capsys, "plan", str(BENCH), "train.micro_batch_size=16", "--gpus", "1")
    assert code == 3, out
    assert "does not fit" in out and "largest part is activations" in out
    assert "train.recompute=full" in out  # the first change that fits


def test_cli_invalid_layout_and_bad_gpus(capsys):
    code, out, _ = _cli(capsys, "plan", str(BENCH), "parallel.pp=3", "--gpus", "3")
    assert code == 2 and "model.num_layers=16 is not divisible by parallel.pp=3" in out
    code, _, err = _cli(capsys, "plan", str(BENCH), "parallel.tp=4", "--gpus", "6")
    assert code == 1 and "not divisible by parallel.tp * parallel.pp" in err


if __name__ == "__main__":  # the torchrun worker of per_rank
    _worker(sys.argv[1])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("cluster-*.yaml")), ids=lambda p: p.stem)
def test_every_cluster_recipe_fits_at_its_own_size(path):
    """The shipped cluster recipes, planned on the GPUs their layout names (8 H100s a
    node), fit with room to spare (the figures in docs/recipes.md)."""
    from hcx.config import load_recipe
    from hcx.ops.plan import EXIT_FITS, gpu_spec, plan_recipe

    recipe = load_recipe(path)
    gpus = recipe.parallel.tp * recipe.parallel.pp * recipe.parallel.dp
    assert gpus % 8 == 0
    plan = plan_recipe(path, gpus=gpus, gpu=gpu_spec("h100"))
    assert plan.exit_code == EXIT_FITS, plan.verdict
