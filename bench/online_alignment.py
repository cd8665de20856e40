"""The on-policy alignment experiments of docs/alignment.md, at CPU scale.

1. **Same prompts, same sampling budget**: from one SFT checkpoint, on the task "answer
   English instructions in Korean" (reward: ``hcx.scorers:korean_share``, the share of
   Hangul letters, standing in for a reward model), train

   - GRPO (4 prompts x 4 samples per step),
   - offline DPO on AI-feedback pairs (``hcx data feedback``: 4 samples of each of the
     same number of prompts from the SFT model, best vs a random other, then ``hcx align``),
   - online self-judged DPO with the reward as judge (``align.self_judge.judge=reward``:
     8 pairs per step),
   - J-BOND (8 prompts: 1 policy + 2 anchor samples each per step),

   with the same number of completions sampled for training (GRPO, DPO's feedback data and
   self-judged DPO: ``budget``; J-BOND as close as its 3 samples per prompt allow). Each
   policy is then sampled on held-out prompts (4 samples each, temperature 1): the mean
   reward with its standard error, the win rate against the SFT model (prompts whose mean
   reward beats the SFT model's), KL(pi || SFT) estimated on the policy's own samples (mean
   of log pi - log pi_sft per completion), and diversity (distinct 2-grams of a prompt's
   samples over all their 2-grams, averaged over prompts).
2. **J-BOND against Best-of-N**: the J-BOND run's checkpoints (reward and KL as above)
   beside Best-of-N sampling from the SFT model at N = 2, 4, 8, 16 (the best of N samples
   by the reward; its KL to the SFT model is at most log N - (N - 1) / N, BOND's
   analytical value for distinct rewards).

Usage (a checkpoint from ``hcx sft``; minutes on 2 CPU cores for a tiny model):

    python bench/online_alignment.py --sft runs/tiny-sft/checkpoints --out runs/bench-online

Prints Markdown tables and writes them (with every number) to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = "data://train/sft/en_alpaca_seed_tasks/train.jsonl"
REWARD = "hcx.scorers:korean_share"


def hcx(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hcx.cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n"
                            for p in prompts))
    return path


def load_prompts(n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct user turns of the alpaca seed tasks: ``n_train`` to train on, ``n_eval``
    held out."""
    from hcx.paths import resolve

    seen: dict[str, None] = {}
    for line in Path(resolve(PROMPTS)).read_text().splitlines():
        user = [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
        if user and len(user[0]) < 200:
            seen[user[0]] = None
    texts = list(seen)
    random.Random(seed).shuffle(texts)
    return texts[:n_train], texts[n_train:n_train + n_eval]


def recipe(out: Path, sft: Path, method: str, prompts: Path, steps: int, lr: float,
           **align) -> Path:
    """A recipe for ``method`` on the SFT checkpoint (its own model and tokenizer)."""
    online = {"reward": REWARD, "prompts_field": "prompt", "max_new_tokens": 24,
              "temperature": 1.0, **align.pop("online", {})}
    train = {"steps": steps, "lr": lr, "min_lr": lr, "warmup_steps": 0,
             "decay_style": "constant", **align.pop("train", {})}
    data = {"base": str(ROOT / "recipes/tiny-sft.yaml"), "name": f"bench-{method}",
            "output_dir": str(out / method),
            "data": {"seq_length": 96, "eval_every": 0,
                     "sources": [{"name": "prompts", "path": str(prompts)}]},
            "align": {"method": method, "max_prompt_length": 48, "online": online, **align},
            "train": train, "checkpoint": {"init_from": str(sft), "save_every": 0},
            "logging": {"progress": False}}
    path = out / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def model_overrides(sft: Path) -> list[str]:
    """Model and tokenizer of the SFT checkpoint (recipes/tiny-sft.yaml's may differ)."""
    from hcx.engine.inference import checkpoint_recipe
    from hcx.engine.checkpoint import checkpoint_path

    saved = checkpoint_recipe(checkpoint_path(sft))
    model = saved.model.model_dump(mode="json", exclude_unset=True)
    tok = saved.data.tokenizer.model_dump(mode="json", exclude_unset=True)
    return [f"model={json.dumps(model)}", f"data.tokenizer={json.dumps(tok)}"]


# --- measuring a policy ------------------------------------------------------------------


class Measure:
    """Samples policies on held-out prompts and scores their samples under the SFT model:
    one engine in this process, weights swapped in with ``checkpoint.load``."""

    def __init__(self, sft: Path, prompts: list[str], samples: int, max_new_tokens: int,
                 seed: int):
        from hcx.engine.checkpoint import checkpoint_path
        from hcx.engine.generate import Generator, encode_prompt
        from hcx.engine.inference import open_checkpoint

        self.sft = checkpoint_path(sft)
        self.engine, self.tokenizer = open_checkpoint(self.sft, log=lambda *_: None)
        self.generator = Generator(self.engine, self.tokenizer)
        self.prompts = prompts
        self.ids = [encode_prompt(p, self.tokenizer, chat=True) for p in prompts]
        self.samples, self.max_new_tokens, self.seed = samples, max_new_tokens, seed

    def load(self, path: Path) -> None:
        from hcx.engine import checkpoint as ckpt

        ckpt.load(ckpt.checkpoint_path(path), self.engine.model, restore_rng=False,
                  log=lambda *_: None)

    def sample(self, n: int) -> list[list[tuple[list[int], str]]]:
        """``n`` samples of every prompt at temperature 1: (ids, text) per sample."""
        from hcx.engine.generate import SamplingParams, chat_stop_ids

        stops = chat_stop_ids(self.tokenizer)
        rows = [ids for ids in self.ids for _ in range(n)]
        out = []
        for b in range(0, len(rows), 32):
            params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=1.0,
                                    stop_ids=stops, seed=self.seed + b)
            out += [(g.ids, self.tokenizer.decode([t for t in g.ids if t not in stops]))
                    for g in self.generator.generate(rows[b:b + 32], params)]
        return [out[i * n:(i + 1) * n] for i in range(len(self.ids))]

    def logps(self, samples: list[list[tuple[list[int], str]]]) -> list[float]:
        """Summed log-probs of every sample's tokens under the loaded weights."""
        from hcx.engine.scoring import score
        from hcx.stages.preference import rows_to_batch

        rows = [(self.ids[i], ids) for i, group in enumerate(samples) for ids, _ in group]
        seq = max(len(p) + len(c) for p, c in rows)
        batches = [rows_to_batch(rows[k:k + 16], seq, self.tokenizer.pad)
                   for k in range(0, len(rows), 16)]
        return [float(x) for part in score(self.engine.ddp, batches, seq) for x in part]

    def rewards(self, samples) -> list[list[float]]:
        from hcx.scorers import korean_share

        return [korean_share([self.prompts[i]] * len(g), [t for _, t in g])
                for i, g in enumerate(samples)]

    def policy(self, path: Path | None) -> dict:
        """Reward, KL to the SFT model and diversity of the policy at ``path`` (None: the
        SFT model itself)."""
        self.load(path or self.sft)
        samples = self.sample(self.samples)
        policy_logps = self.logps(samples)
        self.load(self.sft)
        sft_logps = self.logps(samples)
        rewards = self.rewards(samples)
        per_prompt = [sum(g) / len(g) for g in rewards]
        mean = sum(per_prompt) / len(per_prompt)
        # samples of one prompt are correlated: the standard error is over prompt means
        sd = math.sqrt(sum((r - mean) ** 2 for r in per_prompt) / max(len(per_prompt) - 1, 1))
        kl = sum(p - q for p, q in zip(policy_logps, sft_logps)) / len(policy_logps)
        return {"reward": mean, "reward_se": sd / math.sqrt(len(per_prompt)), "kl": kl,
                "distinct2": distinct2(samples), "per_prompt": per_prompt}

    def best_of(self, ns: list[int]) -> dict[int, float]:
        """Best-of-N from the SFT model: the mean over prompts of the best of N samples'
        rewards, from one draw of max(ns) samples per prompt (BoN at N uses the first N)."""
        self.load(self.sft)
        rewards = self.rewards(self.sample(max(ns)))
        return {n: sum(max(g[:n]) for g in rewards) / len(rewards) for n in ns}


def distinct2(samples) -> float:
    """Distinct 2-grams over all 2-grams of a prompt's samples (token ids), averaged."""
    values = []
    for group in samples:
        grams = [tuple(ids[k:k + 2]) for ids, _ in group for k in range(len(ids) - 1)]
        if grams:
            values.append(len(set(grams)) / len(grams))
    return sum(values) / len(values) if values else 0.0


def win_rate(policy: list[float], base: list[float]) -> float:
    """Share of prompts where the policy's mean reward beats the base's (ties: half)."""
    return sum(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, base)) / len(base)


# --- the experiments ---------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", type=Path, required=True, help="the SFT checkpoints directory")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-online")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each method")
    ap.add_argument("--lr", type=float, default=5e-4, help="every method's (constant) rate")
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sft = args.sft.resolve()
    overrides = model_overrides(sft)

    budget = 16 * args.steps  # completions sampled for training by each method
    train_prompts, eval_prompts = load_prompts(budget // 4, args.eval_prompts, args.seed)
    prompts = write_prompts(out / "prompts.jsonl", train_prompts)

    runs = {
        "grpo": recipe(out, sft, "grpo", prompts, args.steps, args.lr,
                       online={"samples_per_prompt": 4, "beta": 0.04},
                       train={"global_batch_size": 16, "micro_batch_size": 8}),
        "self_judge": recipe(out, sft, "self_judge", prompts, args.steps, args.lr,
                             self_judge={"judge": "reward"}, beta=0.1,
                             train={"global_batch_size": 8, "micro_batch_size": 8}),
        "jbond": recipe(out, sft, "jbond", prompts, args.steps * 2, args.lr, jbond={"eta": 0.1},
                        train={"global_batch_size": 8, "micro_batch_size": 8}),
    }
    text = runs["jbond"].read_text().replace("save_every: 0",
                                             f"save_every: {args.steps // 2}\n  keep_last: 100")
    runs["jbond"].write_text(text)
    for method, path in runs.items():
        if not (out / method / "checkpoints" / "latest").exists():
            print(f"training {method} ...", flush=True)
            hcx("align", str(path), *overrides)

    # offline DPO: AI-feedback pairs from the SFT model's samples (the same budget)
    pairs = out / "feedback.jsonl"
    if not pairs.exists():
        print("sampling feedback pairs ...", flush=True)
        hcx("data", "feedback", "--prompts", str(prompts), "--model", str(sft), "--samples", "4",
            "--temperature", "1.0", "--max-new-tokens", "24", "--reward", REWARD,
            "--out", str(pairs))
    dpo = out / "dpo.yaml"
    dpo.write_text(yaml.safe_dump({
        "base": str(ROOT / "recipes/tiny-dpo.yaml"), "name": "bench-dpo",
        "output_dir": str(out / "dpo"),
        "data": {"seq_length": 96, "eval_every": 0,
                 "sources": [{"name": "feedback", "path": str(pairs)}]},
        "align": {"method": "dpo", "beta": 0.1, "reference_logps": "live", "held_out": 0},
        "train": {"steps": args.steps, "global_batch_size": 4, "micro_batch_size": 4,
                  "lr": args.lr, "min_lr": args.lr, "warmup_steps": 0,
                  "decay_style": "constant"},
        "checkpoint": {"init_from": str(sft), "save_every": 0}, "logging": {"progress": False}}))
    if not (out / "dpo" / "checkpoints" / "latest").exists():
        print("training dpo ...", flush=True)
        hcx("align", str(dpo), *overrides)

    measure = Measure(sft, eval_prompts, args.samples, 24, args.seed)
    results: dict = {"sft": measure.policy(None)}
    for method in ("grpo", "dpo", "self_judge", "jbond"):
        results[method] = measure.policy(out / method / "checkpoints")
    base = results["sft"]["per_prompt"]
    print(f"\n### Same prompts ({budget} training completions in {args.steps} steps each; "
          f"J-BOND: {args.steps * 2} steps of 8 prompts x 3 samples = {args.steps * 48})\n")
    print("| policy | reward (± s.e.) | win rate vs SFT | KL(pi ‖ SFT) | distinct-2 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
              f"{win_rate(r['per_prompt'], base):.2f} | {r['kl']:.2f} | {r['distinct2']:.3f} |")

    # J-BOND's checkpoints against Best-of-N from the SFT model
    curve = []
    for step_dir in sorted((out / "jbond" / "checkpoints").glob("step_*")):
        r = measure.policy(step_dir)
        curve.append({"step": int(step_dir.name.split("_")[1]), **r})
    bon = measure.best_of([1, 2, 4, 8, 16])
    results["jbond_curve"], results["best_of_n"] = curve, bon
    print("\n### J-BOND against Best-of-N sampling from the SFT model\n")
    print("| policy | reward | KL(pi ‖ SFT) |")
    print("|---|---|---|")
    for n, v in bon.items():
        print(f"| Best-of-{n} of SFT | {v:.3f} | ≤ {math.log(n) - (n - 1) / n:.2f} (analytical) |")
    for r in curve:
        print(f"| J-BOND step {r['step']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
              f"{r['kl']:.2f} |")
    # the training run's own per-step figures (its prompts), averaged over windows
    logged = [json.loads(line) for line in (out / "jbond/metrics.jsonl").read_text().splitlines()]
    window = max(len(logged) // 4, 1)
    print("\nJ-BOND during training (policy samples' reward, k1 KL to the SFT model), "
          f"means over {window} steps:\n")
    print("| steps | reward | KL(pi ‖ SFT) |")
    print("|---|---|---|")
    for k in range(0, len(logged), window):
        part = logged[k:k + window]
        print(f"| {part[0]['step']}-{part[-1]['step']} | "
              f"{sum(r['reward'] for r in part) / len(part):.3f} | "
              f"{sum(r['jbond/kl_ref'] for r in part) / len(part):.3f} |")
    results["jbond_logged"] = logged
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
