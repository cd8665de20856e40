"""Bradley-Terry reward models: where the reward is read, the head, the CLI stage on
TP=1 / TP=2 (+ sequence parallelism), and the scoring API against training's numbers.

This file is also the scoring worker of the slow tests (``python tests/stages/test_reward.py
score ...``, under torchrun for TP=2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hcx.stages import preference as P
from hcx.stages.reward import RewardError, RewardHead, reward_positions, values_at

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model")


# --- fast ------------------------------------------------------------------------------


def test_reward_is_read_at_the_final_token_of_each_row():
    seq = 8
    rows = [([5, 6, 7], [8, 9]),                 # 5 tokens: the final one (9) is input 4
            ([5, 6], [7, 8, 9, 10, 11, 12]),     # fills the sequence: final token at 7
            ([1], [2])]                          # shortest: prompt + one completion token
    batch = P.rows_to_batch(rows, seq, pad=0)
    pos = reward_positions(batch["loss_mask"])
    assert pos.tolist() == [4, 7, 1]
    for (prompt, completion), p, tokens in zip(rows, pos, batch["tokens"]):
        assert int(tokens[p]) == completion[-1]  # the last completion token is the input there
        assert p == len(prompt) + len(completion) - 1  # = lengths - 1, as scoring reads
    # the value read is the one at that position
    output = torch.arange(3 * seq, dtype=torch.float).reshape(3, seq, 1)
    assert values_at(output, pos).tolist() == [4.0, seq + 7.0, 2 * seq + 1.0]


def test_a_row_whose_final_token_is_only_a_label_is_refused():
    batch = P.rows_to_batch([([5, 6], [7, 8, 9, 10, 11, 12, 13])], 8, pad=0)  # seq + 1 tokens
    with pytest.raises(RewardError, match="must fit data.seq_length"):
        reward_positions(batch["loss_mask"])
    with pytest.raises(RewardError, match="no completion tokens"):
        reward_positions(torch.zeros(1, 8))


def test_head_is_a_scalar_output_layer():
    head = RewardHead(16, std=0.1, seed=3)
    h = torch.randn(5, 2, 16)  # [s, b, hidden], as megatron calls its output layer
    out, bias = head(h, weight=torch.randn(100, 16), runtime_gather_output=None)
    assert out.shape == (5, 2, 1) and bias is None  # the tied embedding is ignored
    assert torch.allclose(out[..., 0], h @ head.weight[0] + head.bias[0])
    assert float(head.bias) == 0.0
    # seeded: the same init on every rank and layout
    assert torch.equal(head.weight, RewardHead(16, std=0.1, seed=3).weight)
    assert not torch.equal(head.weight, RewardHead(16, std=0.1, seed=4).weight)


def test_tied_embeddings_with_pipeline_stages_are_refused_naming_the_keys():
    from hcx.config import RecipeError, load_recipe
    from hcx.stages.reward import check_layout

    from hcx.stages import stage_for

    # the stage's recipe rules refuse it before any process starts (hcx align --check)
    with pytest.raises(RecipeError, match=r"parallel.pp.*model.tie_embeddings=true"):
        recipe = load_recipe(ROOT / "recipes" / "tiny-reward.yaml",
                             ["model.tie_embeddings=true", "parallel.pp=2"])
        stage_for("align", recipe).resolve(recipe)
    recipe = load_recipe(ROOT / "recipes" / "tiny-reward.yaml", ["model.tie_embeddings=true"])
    recipe.parallel.pp = 2  # and the stage itself, for a recipe built in Python
    with pytest.raises(RewardError, match=r"model.tie_embeddings=true.*parallel.pp=2"):
        check_layout(recipe)
    check_layout(load_recipe(ROOT / "recipes" / "tiny-reward.yaml", ["model.tie_embeddings=true"]))


def test_scoring_refuses_a_language_model_checkpoint(tmp_path):
    from hcx.stages.reward import load_reward_model

    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    from hcx.config import load_recipe

    saved = load_recipe(ROOT / "recipes" / "tiny-sft.yaml").to_dict()
    (ckpt / "hcx.json").write_text(json.dumps({"step": 1, "recipe": saved}))
    with pytest.raises(RewardError, match="not a reward model checkpoint.*no align section"):
        load_reward_model(ckpt)
    # checkpoints of earlier versions record every section, align.method=dpo by default
    saved["align"] = {"method": "dpo"}
    (ckpt / "hcx.json").write_text(json.dumps({"step": 1, "recipe": saved}))
    with pytest.raises(RewardError, match="not a reward model checkpoint.*align.method=dpo"):
        load_reward_model(ckpt)


# --- on the engine ---------------------------------------------------------------------

from tests.conftest import hcx, small_recipe  # noqa: E402


def metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def reward_recipe(tmp_path: Path, init_from: Path) -> Path:
    """4 steps of 4 pairs; the validation pass covers exactly the 4 held-out pairs."""
    path = small_recipe(
        tmp_path / "reward.yaml", tmp_path / "run", tmp_path / "unused",
        data={"tokenizer": {"kind": "sentencepiece", "path": TOKENIZER}, "seq_length": 64,
              "eval_every": 2, "eval_batches": 1, "split": "98,2,0",
              "sources": [{"name": "ko_hh", "weight": 0.1,
                           "path": "data://train/preference/ko_hh_rlhf_harmless_base/test.jsonl"}]},
        train={"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1,
               "lr": 1e-3, "min_lr": 1e-4},
        checkpoint={"save_every": 2, "init_from": str(init_from)},
        align={"method": "reward", "held_out": 4, "max_prompt_length": 32})
    return path


def score(recipe: Path, ckpt: Path, out: Path, tp: int) -> dict:
    cmd = [sys.executable, "tests/stages/test_reward.py", "score", str(recipe), str(ckpt), str(out)]
    if tp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={tp}", *cmd[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


@pytest.mark.slow
def test_reward_cli_trains_tp2_matches_and_scoring_agrees(tmp_path, sft_checkpoint):
    recipe = reward_recipe(tmp_path, sft_checkpoint)
    proc = hcx("align", str(recipe))
    assert f"initialized the backbone from {sft_checkpoint / 'step_00000002'}" in proc.stdout
    assert "reward head new" in proc.stdout
    single = metrics(tmp_path / "run")
    assert sorted(single) == [1, 2, 3, 4]
    first = single[1]
    # a small head: rewards near 0, loss near log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=0.02)
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
             "rewards/margins"]
    for step, rec in single.items():
        for k in names + ([f"valid/{k}" for k in names] if step % 2 == 0 else []):
            assert math.isfinite(rec[k]), (step, k)
        assert rec["rewards/margins"] == pytest.approx(
            rec["rewards/chosen"] - rec["rewards/rejected"], abs=1e-6)
    assert "valid/rewards/accuracies" in single[2] and "valid/loss" in single[4]

    # the checkpoint holds the head under its own keys, not a vocabulary projection
    from megatron.core.dist_checkpointing import load_tensors_metadata

    final = tmp_path / "run" / "checkpoints" / "step_00000004"
    keys = load_tensors_metadata(str(final))
    assert tuple(keys["output_layer.reward_head.weight"].global_shape) == (1, 64)
    assert "output_layer.weight" not in keys

    # TP=2 with sequence parallelism: the same run
    hcx("align", str(recipe), "parallel.tp=2", "parallel.sequence_parallel=true",
        f"output_dir={tmp_path / 'tp2'}")
    tp2 = metrics(tmp_path / "tp2")
    for step in single:
        # grad_norm too: Adam and clipping would hide gradients scaled by the TP size
        for k in ("loss", "rewards/chosen", "rewards/margins", "valid/loss", "grad_norm"):
            if k in single[step]:
                assert tp2[step][k] == pytest.approx(single[step][k], abs=1e-5), (step, k)

    # PP=2: the head on the last stage
    hcx("align", str(recipe), "parallel.pp=2", f"output_dir={tmp_path / 'pp2'}")
    pp2 = metrics(tmp_path / "pp2")
    for step in single:
        for k in ("loss", "valid/loss", "grad_norm"):
            if k in single[step]:
                assert pp2[step][k] == pytest.approx(single[step][k], abs=1e-5), (step, k)

    # scoring API, TP=1 and (the TP=1 checkpoint loaded at) TP=2: the held-out rewards
    # of the last validation pass (run after the last optimizer step, before the save)
    one = score(recipe, final, tmp_path / "tp1.pt", tp=1)
    two = score(recipe, final, tmp_path / "tp2.pt", tp=2)
    assert torch.allclose(one["chosen"], two["chosen"], atol=1e-5)
    assert torch.allclose(one["rejected"], two["rejected"], atol=1e-5)
    assert one["chosen"].shape == (4,)
    last = single[4]
    assert float(one["chosen"].mean()) == pytest.approx(last["valid/rewards/chosen"], abs=1e-5)
    assert float(one["rejected"].mean()) == pytest.approx(last["valid/rewards/rejected"], abs=1e-5)
    acc = float((one["chosen"] > one["rejected"]).float().mean())
    assert acc == pytest.approx(last["valid/rewards/accuracies"], abs=1e-6)
    bt = float(torch.nn.functional.softplus(one["rejected"] - one["chosen"]).mean())
    assert bt == pytest.approx(last["valid/loss"], abs=1e-5)
    # the training forward (TP=2: with sequence parallelism) reads the same rewards, and
    # the head's gradient is the same on every TP rank (checked in the worker) and as at TP=1
    for r in (one, two):
        assert torch.allclose(r["train"], torch.cat([one["chosen"], one["rejected"]]), atol=1e-5)
    assert torch.allclose(one["head_grad"], two["head_grad"], atol=1e-5)
    assert float(one["head_grad"].abs().sum()) > 0
    # the text API: chat layout, then the same reading position
    assert one["text"] == pytest.approx(one["text_rows"], abs=1e-6)
    assert two["text"] == pytest.approx(one["text"], abs=1e-5)

    # extending the run resumes its own checkpoint (head included), not init_from
    proc = hcx("align", str(recipe), "train.steps=5")
    assert "resumed from" in proc.stdout and "initialized the backbone" not in proc.stdout
    assert sorted(metrics(tmp_path / "run")) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_init_from_of_another_shape_names_the_missing_tensor(tmp_path, sft_checkpoint):
    recipe = reward_recipe(tmp_path, sft_checkpoint)
    proc = hcx("align", str(recipe), "model.num_layers=3", check=False)
    assert proc.returncode != 0
    assert "tensor decoder.layers" in proc.stdout + proc.stderr  # (layers are stacked: a shape)
    assert str(sft_checkpoint / "step_00000002") in proc.stdout + proc.stderr


# --- the scoring worker ----------------------------------------------------------------


def _score_worker(recipe_path: str, ckpt: str, out: str) -> None:
    import torch.distributed as dist

    from hcx.stages.align import load_examples
    from hcx.config import load_recipe
    from hcx.engine.parallel import initialize, shutdown
    from hcx.stages.reward import load_reward_model, rows_recipe

    recipe = load_recipe(recipe_path)
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = recipe.model_copy(update={"parallel": recipe.parallel.model_copy(
        update={"tp": world, "sequence_parallel": False})})
    initialize(layout.parallel, 0)
    try:
        rm = load_reward_model(ckpt, layout, log=lambda *_: None)
        _, valid = load_examples(rows_recipe(recipe), rm.tokenizer, lambda *_: None)
        rows = P.example_rows(valid)  # chosen rows, then rejected rows
        lengths = [len(p) + len(c) for p, c in rows]
        tokens = torch.full((len(rows), max(lengths) + 3), rm.tokenizer.pad, dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            tokens[i, :lengths[i]] = torch.tensor(p + c)
        r = rm.rewards(tokens, lengths)
        n = len(valid)
        # the text API on a made-up pair (a string prompt = one user turn)
        prompts, completions = ["안녕하세요?", "What is 2+2?"], ["반가워요.", "4"]
        text = rm.score(prompts, completions)
        ids = [P.encode([{"role": "user", "content": p}], [{"role": "assistant", "content": c}],
                        rm.tokenizer) for p, c in zip(prompts, completions)]
        ids = [h + t for h, t in ids]
        batch = torch.full((2, 40), rm.tokenizer.pad, dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, :len(x)] = torch.tensor(x)
        text_rows = rm.rewards(batch, [len(x) for x in ids]).tolist()
        train_r, grad = _training_forward(recipe, world, ckpt, valid, rm.tokenizer.pad)
        for x in (r, train_r, grad):  # every TP rank holds the same values
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            assert all(torch.equal(parts[0], p) for p in parts), parts
        if dist.get_rank() == 0:
            torch.save({"chosen": r[:n], "rejected": r[n:], "text": text,
                        "text_rows": text_rows, "train": train_r, "head_grad": grad}, out)
    finally:
        shutdown()


def _training_forward(recipe, tp: int, ckpt: str, examples, pad: int):
    """The training stage's rewards of ``examples`` (rows in scoring order) and the head's
    local gradient of their loss (before any reduction), on a TP (+ sequence-parallel
    when tp > 1) engine loaded with the reward checkpoint."""
    from functools import partial

    from hcx.engine.model import model_vocab_size
    from hcx.stages.reward import RewardTask, attach_head, load_backbone
    from hcx.tokenizer.loading import load_tokenizer
    from hcx.engine.loop import build_engine

    layout = recipe.model_copy(update={"parallel": recipe.parallel.model_copy(
        update={"tp": tp, "sequence_parallel": tp > 1})})
    vocab = model_vocab_size(layout, load_tokenizer(layout.data.tokenizer).vocab_size)
    engine = build_engine(layout, vocab, per_token_loss=True,
                          modify_model=partial(attach_head, recipe=layout))
    assert load_backbone(Path(ckpt), engine.model, log=lambda *_: None)  # head included
    engine.optimizer.reload_model_params()
    task = RewardTask(engine, examples, pad, held_out=True)
    batch = P.rows_to_batch(P.example_rows(examples), layout.data.seq_length, pad)
    engine.ddp.zero_grad_buffer()
    output, loss_func = task.forward_step(engine.ddp, batch)
    rewards = values_at(output, reward_positions(batch["loss_mask"])).detach()
    loss_func(output)[0].backward()
    head = engine.model.output_layer
    grad = torch.cat([head.weight.main_grad.flatten(), head.bias.main_grad.flatten()])
    return rewards.cpu(), grad.detach().cpu().clone()


if __name__ == "__main__":
    if sys.argv[1] == "score":
        _score_worker(*sys.argv[2:5])
