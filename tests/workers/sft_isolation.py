"""Worker: per-token losses of two conversations packed in one row vs. each alone.

    python tests/workers/sft_isolation.py RECIPE OUT.pt
"""

import sys

import torch

from hcx.engine import parallel
from hcx.stages import sft
from hcx.config import load_recipe
from hcx.tokenizer.loading import load_tokenizer
from hcx.engine.loop import build_engine

if __name__ == "__main__":
    recipe = load_recipe(sys.argv[1])
    tok = load_tokenizer(recipe.data.tokenizer)
    engine = build_engine(recipe, tok.vocab_size, with_optimizer=False)
    a = sft.tokenize([{"role": "user", "content": "안녕하세요?"},
                      {"role": "assistant", "content": "네, 반갑습니다."}], tok)
    b = sft.tokenize([{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "Four."}], tok)
    s = recipe.data.seq_length
    stats = sft.SFTStats()
    [packed] = sft.build_sequences([a, b], s, tok.pad, packing=True, stats=stats)
    alone = sft.build_sequences([a, b], s, tok.pad, packing=False, stats=sft.SFTStats())

    def losses(row, packing):
        x = sft.to_sample(row)
        tokens = x["tokens"].unsqueeze(0)
        mask = sft.attention_mask(x["segments"].unsqueeze(0)) if packing else None
        with torch.no_grad():
            engine.model.eval()
            return engine.model(tokens, torch.arange(s).unsqueeze(0), mask,
                                labels=x["labels"].unsqueeze(0))[0]

    torch.save({"packed": losses(packed, True), "a": losses(alone[0], False),
                "b": losses(alone[1], False), "len_a": len(a.ids), "len_b": len(b.ids)},
               sys.argv[2])
    parallel.shutdown()
