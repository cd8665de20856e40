"""Training throughput: the hcx engine vs a plain Hugging Face loop, in one run.

    python bench/train_throughput.py recipes/tiny.yaml [KEY=VALUE ...] [--steps N] [--warmup N]

Both sides train the same decoder shape (hcx's megatron-core GPTModel and
transformers' LlamaForCausalLM with the same layers, widths, GQA, vocabulary,
RoPE base, tying), on the same random token batches of the recipe's global batch
and sequence length, with AdamW and the same precision (fp32 on CPU; bf16 on GPU:
megatron's bf16 params with fp32 main weights vs. torch autocast for HF). Reports
tokens/s, TFLOP/s per device and MFU (model FLOPs, hcx.engine.metrics) and the ratio.
Single process: run it on one device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcx.engine import metrics as M  # noqa: E402
from hcx.cli import quiet_known_warnings  # noqa: E402
from hcx.config import load_recipe  # noqa: E402
from hcx.engine.model import padded_vocab_size  # noqa: E402


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_batches(recipe, vocab: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (recipe.train.global_batch_size, recipe.data.seq_length + 1)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


class SyntheticTask:
    """A pretraining task over fixed random token batches (no data files)."""

    def __init__(self, engine, batches):
        self.engine, self.batches = engine, batches
        self.rows_per_microbatch = engine.recipe.train.micro_batch_size

    def microbatches(self, step):
        r = self.engine.recipe
        mb = r.train.micro_batch_size
        tokens = self.batches[step % len(self.batches)]
        s = r.data.seq_length
        return [{"tokens": tokens[i:i + mb, :-1], "labels": tokens[i:i + mb, 1:],
                 "loss_mask": torch.ones(mb, s), "position_ids": torch.arange(s).expand(mb, s)}
                for i in range(0, tokens.shape[0], mb)]

    def forward_step(self, model, batch):
        from hcx.stages.pretrain import PretrainTask

        return PretrainTask.forward_step(self, model, batch)


def bench_hcx(recipe, vocab, batches, steps, warmup) -> list[float]:
    from hcx.engine.parallel import shutdown
    from hcx.engine.loop import build_engine, run_step

    engine = build_engine(recipe, vocab)
    task = SyntheticTask(engine, batches)
    times = []
    try:
        for step in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            run_step(engine, task, step)
            engine.optimizer.step()
            engine.scheduler.step(increment=recipe.train.global_batch_size)
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        del engine
        shutdown()
    return times


def bench_hf(recipe, vocab, batches, steps, warmup, dtype) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = recipe.model
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon, rope_theta=m.rope_base, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False, use_cache=False,
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dev)
    model.config._attn_implementation = "sdpa"
    t = recipe.train
    if recipe.train.recompute:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                            eps=t.adam_eps, weight_decay=t.weight_decay, fused=dev == "cuda")
    mb = t.micro_batch_size
    n_micro = t.global_batch_size // mb
    times = []
    for step in range(warmup + steps):
        tokens = batches[step % len(batches)].to(dev)
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for i in range(0, tokens.shape[0], mb):
            chunk = tokens[i:i + mb]
            with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1].clone())
            (out.loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        opt.step()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def summarize(name, times, tokens_per_step, flops_per_token, peak) -> dict:
    dt = statistics.median(times)
    tflops = flops_per_token * tokens_per_step / dt / 1e12
    row = {"impl": name, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
           "tflops_per_device": tflops, "mfu": (tflops / peak) if peak else None}
    return row


def main() -> int:
    quiet_known_warnings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe, [*args.overrides, "parallel.tp=1", "parallel.pp=1",
                                       "parallel.dp=1", "logging.progress=false"])
    from hcx.engine.model import compute_dtype
    from hcx.engine.model import model_vocab_size
    from hcx.tokenizer.loading import load_tokenizer

    vocab = model_vocab_size(recipe, load_tokenizer(recipe.data.tokenizer).vocab_size)
    padded = padded_vocab_size(vocab, 1)
    dtype = compute_dtype(recipe.train.precision)
    tokens_per_step = recipe.train.global_batch_size * recipe.data.seq_length
    flops = M.training_flops_per_token(recipe.model, padded, recipe.data.seq_length)
    peak = M.peak_tflops(recipe.logging.peak_tflops, dtype)
    batches = random_batches(recipe, vocab, 4)

    rows = [summarize("hcx (megatron-core)", bench_hcx(recipe, vocab, batches, args.steps, args.warmup),
                      tokens_per_step, flops, peak)]
    if not args.skip_hf:
        rows.append(summarize("HF LlamaForCausalLM loop",
                              bench_hf(recipe, padded, batches, args.steps, args.warmup, dtype),
                              tokens_per_step, flops, peak))
    result = {
        "date": date.today().isoformat(), "device": device_name(), "torch": torch.__version__,
        "recipe": args.recipe, "overrides": args.overrides, "dtype": str(dtype).replace("torch.", ""),
        "global_batch": recipe.train.global_batch_size, "micro_batch": recipe.train.micro_batch_size,
        "seq_length": recipe.data.seq_length, "peak_tflops": peak, "rows": rows,
    }
    if len(rows) == 2:
        result["speedup_vs_hf"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"{result['device']} | {args.recipe} {' '.join(args.overrides)} | {result['dtype']} | "
          f"batch {result['global_batch']}x{result['seq_length']}")
    print(f"{'impl':28} {'tokens/s':>12} {'TFLOP/s/dev':>12} {'MFU':>8}")
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        print(f"{row['impl']:28} {row['tokens_per_s']:12,.0f} {row['tflops_per_device']:12.4g} {mfu:>8}")
    if "speedup_vs_hf" in result:
        print(f"hcx / HF tokens/s: {result['speedup_vs_hf']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
