"""Worker: generate with an hcx checkpoint under several settings, write JSON.

    python tests/workers/generate.py CKPT OUT.json PROMPTS.json

One process loads the model once and runs every case the tests compare (with and
without KV cache, seeded sampling, stop strings and ids, repetition penalty).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

from hcx.engine import parallel
from hcx.engine.generate import Generator, SamplingParams
from hcx.engine.inference import open_checkpoint

if __name__ == "__main__":
    ckpt, out, prompts_file = sys.argv[1:4]
    texts = json.loads(Path(prompts_file).read_text())
    engine, tok = open_checkpoint(Path(ckpt))
    gen = Generator(engine, tok)
    prompts = [tok.encode(t) for t in texts]
    greedy = SamplingParams(max_new_tokens=12)
    sample = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1)

    def ids(params, batch=prompts):
        return [g.ids for g in gen.generate(batch, params)]

    results = {
        "greedy": ids(greedy),
        "greedy_no_cache": ids(replace(greedy, use_cache=False)),
        "greedy_one_by_one": [ids(greedy, [p])[0] for p in prompts],
        "penalty": ids(replace(greedy, repetition_penalty=1.5)),
        "sample_seed1": ids(sample),
        "sample_seed1_again": ids(sample),
        "sample_seed2": ids(replace(sample, seed=2)),
        "sample_top_k1": ids(replace(sample, top_k=1)),
    }
    first = results["greedy"][0]
    stop_id = first[4]
    stopped = gen.generate(prompts[:1], replace(greedy, stop_ids=(stop_id,)))[0]
    results["stop_id"] = {"id": stop_id, "ids": stopped.ids, "reason": stopped.finish_reason}
    # a stop string that the greedy output contains from its 6th token on
    text = tok.decode(first)
    stop = tok.decode(first[5:7]).strip() or tok.decode(first[5:8])
    cut = gen.generate(prompts[:1], replace(greedy, stop_strings=(stop,)))[0]
    results["stop_string"] = {"stop": stop, "full": text, "text": cut.text,
                              "ids": cut.ids, "reason": cut.finish_reason}
    Path(out).write_text(json.dumps(results))
    parallel.shutdown()
