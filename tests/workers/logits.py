"""torchrun worker: load a checkpoint at the recipe's layout, write logits of fixed tokens.

    torchrun --nproc-per-node N tests/workers/logits.py RECIPE CKPT OUT.pt [overrides...]
"""

import sys
from pathlib import Path

import torch

from hcx.engine import checkpoint
from hcx.engine import inference
from hcx.engine import parallel
from hcx.config import load_recipe
from hcx.engine.model import model_vocab_size
from hcx.tokenizer.loading import load_tokenizer
from hcx.engine.loop import build_engine

if __name__ == "__main__":
    recipe_path, ckpt_path, out = sys.argv[1:4]
    recipe = load_recipe(recipe_path, sys.argv[4:])
    tok = load_tokenizer(recipe.data.tokenizer)
    engine = build_engine(recipe, model_vocab_size(recipe, tok.vocab_size), with_optimizer=False)
    checkpoint.load(Path(ckpt_path), engine.model, restore_rng=False)
    text = ["안녕하세요, 한국어와 English를 함께 배우는 모델입니다.", "The quick brown fox 여우"]
    ids = [tok.encode(t)[:32] for t in text]
    tokens = torch.tensor([i + [tok.pad] * (32 - len(i)) for i in ids])
    result = inference.logits(engine, tokens, tok.vocab_size)
    if engine.topo.rank == 0:
        torch.save(result, out)
    parallel.shutdown()
