"""train.trainable: training only the new rows of the embedding and output layer leaves
every other value bit-identical, at TP=1 and TP=2, with the distributed optimizer."""

from pathlib import Path

import pytest
import torch

from tests.conftest import SHIPPED_TOKENIZER, hcx, small_recipe

NEW_FROM = 30000  # pretend the shipped tokenizer's ids from here were added by extension


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint (global, whatever the layout that saved it)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    if not out.exists():
        dcp_to_torch_save(str(step_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)
            and not k.startswith("optimizer") and "_extra_state" not in k}


def latest(ckpt_dir: Path) -> Path:
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))[-1]


def train_new_rows(tmp_path: Path, start: Path, *overrides: str) -> Path:
    recipe = small_recipe(
        tmp_path / "stage1.yaml", tmp_path / "run", tmp_path / "unused",
        data={"tokenizer": {"kind": "sentencepiece", "path": SHIPPED_TOKENIZER},
              "seq_length": 96,
              "sources": [{"name": "ko", "path": "data://train/sft/ko_koalpaca_v1_head/train.jsonl"}]},
        train={"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0,
               "lr": 0.01, "trainable": ["new_embeddings"], "new_tokens_from": NEW_FROM},
        checkpoint={"save_every": 0, "init_from": str(start)})
    proc = hcx("sft", str(recipe), *overrides)
    assert "train.trainable ['new_embeddings']" in proc.stdout
    return latest(tmp_path / "run" / "checkpoints")


def check_only_new_rows_changed(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    embeddings = ("embedding.word_embeddings.weight", "output_layer.weight")
    for name, old in before.items():
        new = after[name]
        if name in embeddings:
            assert torch.equal(new[:NEW_FROM], old[:NEW_FROM]), name
        else:
            assert torch.equal(new, old), name
    # the output layer's new rows all receive gradient through the softmax
    changed = (after["output_layer.weight"][NEW_FROM:] != before["output_layer.weight"][NEW_FROM:])
    assert changed.any(dim=1).float().mean() > 0.9


def test_new_rows_only_leave_every_other_value_bit_identical(tmp_path, sft_checkpoint):
    start = latest(sft_checkpoint)
    after = train_new_rows(tmp_path, start)
    check_only_new_rows_changed(weights(start), weights(after))


@pytest.mark.slow
def test_new_rows_only_at_tp2(tmp_path, sft_checkpoint):
    start = latest(sft_checkpoint)
    after = train_new_rows(tmp_path, start, "parallel.tp=2")
    check_only_new_rows_changed(weights(start), weights(after))


def test_trainable_choices_are_checked_before_anything_runs(tmp_path):
    from hcx.config import RecipeError, load_recipe

    recipe = small_recipe(tmp_path / "r.yaml", tmp_path / "run", tmp_path / "unused",
                          train={"trainable": "new_embeddings"})
    with pytest.raises(RecipeError, match="train.new_tokens_from is not set"):
        load_recipe(recipe)
    assert load_recipe(recipe, ["train.new_tokens_from=200"]).train.trainable == ["new_embeddings"]
    with pytest.raises(RecipeError, match="parallel.pp=1"):
        load_recipe(recipe, ["train.new_tokens_from=200", "parallel.pp=2"])


def test_selection_of_names_globs_and_tied_embeddings(tmp_path):
    from hcx.config import RecipeError, load_recipe
    from hcx.engine.trainable import INPUT, OUTPUT, selection

    names = [INPUT, OUTPUT, "decoder.layers.0.mlp.linear_fc1.weight",
             "decoder.layers.1.mlp.linear_fc1.weight", "decoder.final_layernorm.weight"]
    path = small_recipe(tmp_path / "r.yaml", tmp_path / "run", tmp_path / "unused",
                        train={"new_tokens_from": 200})

    def pick(*trainable, tied=False):
        r = load_recipe(path, [f"train.trainable={list(trainable)}",
                               f"model.tie_embeddings={str(tied).lower()}"])
        whole, rows = selection(r, names if not tied else names[:1] + names[2:])
        return sorted(whole), sorted(rows)

    assert pick("all") == (sorted(names), [])
    assert pick("new_input_embeddings") == ([], [INPUT])
    assert pick("new_embeddings", "output_embeddings") == ([OUTPUT], [INPUT])
    assert pick("decoder.layers.*.mlp.*") == (sorted(names[2:4]), [])
    assert pick("new_output_embeddings", tied=True) == ([], [INPUT])  # one shared matrix
    with pytest.raises(RecipeError, match="matches no parameter"):
        pick("decoder.layer.*")
