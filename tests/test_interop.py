"""hcx export: checkpoints of any layout become HF Llama directories with the same logits."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, hcx, small_recipe

pytestmark = pytest.mark.slow

TOKENIZER = ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model"
TEXT = ["안녕하세요, 한국어와 English를 함께 배우는 모델입니다.", "The quick brown fox 여우"]


def train(tmp, prepared_prefix, *overrides, **model):
    recipe = small_recipe(tmp / "recipe.yaml", tmp / "run", prepared_prefix,
                          model={"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176,
                                 "num_attention_heads": 4, "num_query_groups": 2, **model},
                          data={"tokenizer": {"kind": "sentencepiece", "path": str(TOKENIZER)}},
                          train={"steps": 3}, checkpoint={"save_every": 0})
    hcx("pretrain", str(recipe), *overrides)
    return recipe, tmp / "run" / "checkpoints"


def megatron_logits(recipe, ckpt, out):
    """Logits of the checkpoint loaded at TP1/PP1 by the engine (a worker process)."""
    subprocess.run([sys.executable, "tests/workers/logits.py", str(recipe), str(ckpt / "step_00000003"),
                    str(out), "parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false"],
                   cwd=ROOT, check=True, capture_output=True)
    return torch.load(out)


def hf_logits(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    ids = [tok.encode(t)[:32] for t in TEXT]
    tokens = torch.tensor([i + [tok.pad_token_id] * (32 - len(i)) for i in ids])
    with torch.no_grad():
        return model(tokens).logits[..., :len(tok)], tok


@pytest.mark.parametrize("layout, model", [
    ([], {}),
    ([], {"tie_embeddings": True}),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], {}),
    (["parallel.pp=2"], {}),
], ids=["tp1", "tp1-tied", "tp2", "pp2"])
def test_export_gives_the_same_logits_in_transformers(tmp_path, prepared_prefix, layout, model):
    recipe, ckpt = train(tmp_path, prepared_prefix, *layout, **model)
    hcx("export", str(ckpt), str(tmp_path / "hf"), "--to", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] == bool(model)
    got, tok = hf_logits(tmp_path / "hf")
    want = megatron_logits(recipe, ckpt, tmp_path / "logits.pt")
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    # the tokenizer travels with the model, chat template included
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|user|>hi<|endofturn|><|assistant|>"


def test_export_of_a_non_checkpoint_names_it(tmp_path):
    proc = hcx("export", str(tmp_path), str(tmp_path / "out"), check=False)
    assert proc.returncode == 1 and f"{tmp_path}: not an hcx checkpoint" in proc.stderr
