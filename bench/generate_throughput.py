"""Generation throughput: hcx's decoding loop with and without its KV cache, against
transformers' ``generate`` on the same weights, in one run.

    python bench/generate_throughput.py recipes/tiny.yaml [KEY=VALUE ...] \
        [--batch 8] [--prompt-len 64] [--new-tokens 128] [--repeats 3]

The megatron model is built at random initialisation (no checkpoint needed) and its
weights are converted in memory with the exporter's mapping into a
``LlamaForCausalLM``. Every side decodes greedily the same batch of random prompts
for exactly ``--new-tokens`` tokens (no stop tokens), so the token counts are equal;
the script also reports whether the outputs agree token for token. Tokens/s counts
generated tokens (batch × new tokens) over the whole call, prompt pass included.
Single process, one device; median of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import device_name, sync  # noqa: E402
from hcx.cli import quiet_known_warnings  # noqa: E402
from hcx.config import load_recipe  # noqa: E402


def timed(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def hf_model(engine, recipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hcx.interop.hf import hf_config, megatron_to_hf

    state = {k.removeprefix("module."): v for k, v in engine.model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    tensors = megatron_to_hf(state, recipe.model)
    config = LlamaConfig(**{k: v for k, v in hf_config(recipe, engine.vocab_size, tokenizer,
                                                        engine.dtype).items()
                            if k not in ("architectures", "model_type", "torch_dtype")})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(config).to(dev, engine.dtype)
    model.load_state_dict(tensors, strict=not recipe.model.tie_embeddings)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def main() -> int:
    quiet_known_warnings()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from hcx.engine.generate import Generator, SamplingParams
    from hcx.engine.parallel import shutdown
    from hcx.engine.model import model_vocab_size
    from hcx.tokenizer.loading import load_tokenizer
    from hcx.engine.loop import build_engine

    recipe = load_recipe(args.recipe, [*args.overrides, "parallel.tp=1", "parallel.pp=1",
                                       "parallel.dp=1", "parallel.sequence_parallel=false",
                                       "model.transformer_impl=local"])
    tok = load_tokenizer(recipe.data.tokenizer)
    engine = build_engine(recipe, model_vocab_size(recipe, tok.vocab_size), with_optimizer=False)
    g = torch.Generator().manual_seed(0)
    # ordinary tokens only (ids above the specials), equal lengths: no padding anywhere
    prompts = torch.randint(8, tok.vocab_size, (args.batch, args.prompt_len), generator=g)
    gen = Generator(engine, tok)
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, stop_ids=())
    rows = {}
    try:
        for name, p in (("hcx, KV cache", params),
                        ("hcx, no cache", SamplingParams(max_new_tokens=n, stop_ids=(),
                                                         use_cache=False))):
            rows[name] = timed(lambda p=p: [r.ids for r in gen.generate(prompts.tolist(), p)],
                               args.repeats)
        model = hf_model(engine, recipe, tok)
        dev = next(model.parameters()).device
        suppress = list(range(tok.vocab_size, engine.vocab_size)) or None
        for name, cache in (("transformers generate, KV cache", True),
                            ("transformers generate, no cache", False)):
            def run(cache=cache):
                with torch.no_grad():
                    out = model.generate(prompts.to(dev), attention_mask=torch.ones_like(prompts).to(dev),
                                         max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         use_cache=cache, suppress_tokens=suppress,
                                         pad_token_id=tok.pad)
                return out[:, args.prompt_len:].tolist()
            rows[name] = timed(run, args.repeats)
    finally:
        shutdown()

    reference = rows["hcx, KV cache"][1]
    result = {
        "date": date.today().isoformat(), "device": device_name(), "torch": torch.__version__,
        "recipe": args.recipe, "overrides": args.overrides,
        "dtype": str(engine.dtype).replace("torch.", ""), "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": n,
        "rows": [{"impl": name, "seconds": t, "tokens_per_s": args.batch * n / t,
                  "same_tokens_as_hcx_cache": out == reference}
                 for name, (t, out) in rows.items()],
    }
    print(f"{result['device']} | {args.recipe} {' '.join(args.overrides)} | {result['dtype']} | "
          f"batch {args.batch}, prompt {args.prompt_len}, new {n}")
    print(f"{'impl':34} {'tokens/s':>10} {'same tokens':>12}")
    for row in result["rows"]:
        print(f"{row['impl']:34} {row['tokens_per_s']:10,.1f} {str(row['same_tokens_as_hcx_cache']):>12}")
    base = {r["impl"]: r["tokens_per_s"] for r in result["rows"]}
    print(f"KV cache speedup (hcx): {base['hcx, KV cache'] / base['hcx, no cache']:.2f}x; "
          f"hcx / transformers (both cached): "
          f"{base['hcx, KV cache'] / base['transformers generate, KV cache']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
