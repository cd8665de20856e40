"""``hcx export``, ``hcx import``, ``hcx generate``: checkpoints in and out, and text
from them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcx.commands.common import add_judge_prompt_args, log, needs_relaunch, relaunch_with_torchrun


def cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.interop.hf import export_hf

    out = export_hf(Path(args.checkpoint), Path(args.out), log=log,
                    max_shard_size=args.max_shard_size,
                    eval_run=Path(args.eval) if args.eval else None,
                    push_to_hub=args.push_to_hub)
    print(out)
    return 0


def cmd_import(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.interop.hf import import_hf

    stub = import_hf(Path(args.hf_dir), Path(args.out), tp=args.tp, pp=args.pp, log=log,
                     tokenizer=Path(args.tokenizer) if args.tokenizer else None,
                     new_rows=args.new_rows)
    print(stub)
    log(f"next: write a recipe with 'base: {stub}' and your data.sources (see the comments "
        "in it), then: hcx pretrain YOUR_RECIPE.yaml")
    return 0


def cmd_generate(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.engine import generate

    best_of = args.best_of > 1
    check_best_of_flags(args)
    temperature, top_p = args.temperature, args.top_p
    if best_of:  # self-rejection samples: the authors' T = 1.0, top-p 0.9 unless given
        from hcx.stages.self_judge import SAMPLING_TEMPERATURE, SAMPLING_TOP_P

        temperature = SAMPLING_TEMPERATURE if temperature is None else temperature
        top_p = SAMPLING_TOP_P if top_p is None else top_p
    params = generate.SamplingParams(  # validated before any process starts
        max_new_tokens=args.max_new_tokens, temperature=temperature or 0.0, top_k=args.top_k,
        top_p=1.0 if top_p is None else top_p, repetition_penalty=args.repetition_penalty,
        stop_strings=tuple(args.stop), seed=args.seed, use_cache=not args.no_cache)
    prompts = list(args.prompt) + (generate.read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise generate.GenerationError("no prompts: give --prompt TEXT or --prompts-file FILE")
    if best_of and params.greedy:
        raise generate.GenerationError("--best-of samples N responses: --temperature must be "
                                       "> 0 (it defaults to 1.0 with --best-of)")
    judge_prompt = None
    if best_of and args.reward:  # a malformed spec fails before any process starts
        from hcx.stages.rewards import parse_spec

        parse_spec(args.reward, "--reward")
    elif best_of:  # a missing or unusable prompt file fails before any process starts
        from hcx.stages.self_judge import load_pair_prompt

        judge_prompt = load_pair_prompt(args.judge_prompts, args.judge_prompt)
    if needs_relaunch(args.tp):
        return relaunch_with_torchrun(args.tp, argv)
    if best_of and args.reward:
        return generate_best_of_reward(args, prompts, params)
    if best_of:
        return generate_best_of(args, prompts, params, judge_prompt)
    import json

    from hcx.engine.inference import open_checkpoint
    from hcx.engine.parallel import shutdown

    try:
        engine, tok = open_checkpoint(Path(args.checkpoint), tp=args.tp, log=log)
        ids, params = encode_prompts(args, prompts, tok, params)
        results = generate.generate_all(generate.Generator(engine, tok), ids, params, args.batch_size,
                                 progress=engine.topo.rank == 0)
        if engine.topo.rank == 0:
            for prompt, r in zip(prompts, results):
                if args.json:
                    print(json.dumps({"prompt": prompt, "text": r.text, "ids": r.ids,
                                      "finish_reason": r.finish_reason}, ensure_ascii=False))
                else:
                    print(r.text if len(prompts) == 1 else f"### {prompt}\n{r.text}\n")
    finally:
        shutdown()
    return 0


def check_best_of_flags(args: argparse.Namespace) -> None:
    """The judge flags, or --reward, belong to --best-of N > 1; a reward and a judge
    exclude each other."""
    from hcx.engine.generate import GenerationError

    if args.best_of < 1:
        raise GenerationError(f"--best-of must be at least 1, got {args.best_of}")
    given = [flag for key, flag in (("judge", "--judge"), ("judge_prompts", "--judge-prompts"),
                                    ("judge_prompt", "--judge-prompt"),
                                    ("judge_max_new_tokens", "--judge-max-new-tokens"))
             if getattr(args, key) is not None]
    if args.reward is not None and given:
        raise GenerationError(f"--reward and {', '.join(given)} exclude each other: --best-of "
                              "N keeps the candidate a reward scores highest (--reward SPEC; "
                              "a judge's rating is --reward judge:MODEL) or the winner of a "
                              "pairwise judge's tournament (--judge), not both")
    if args.reward is not None and args.best_of == 1:
        raise GenerationError("--reward scores the candidates of --best-of N (N > 1)")
    if given and args.best_of == 1:
        raise GenerationError(f"{', '.join(given)} judge{'s' if len(given) == 1 else ''} the "
                              "candidates of --best-of N (N > 1)")


def encode_prompts(args: argparse.Namespace, prompts: list, tok, params):
    """Token ids of the prompts, and ``params`` with the stop ids of chat replies."""
    from dataclasses import replace

    from hcx.engine import generate

    chat = args.chat or any(isinstance(p, list) for p in prompts)
    ids = [generate.encode_prompt(p, tok, args.chat, args.system) for p in prompts]
    stop_ids = args.stop_id or (generate.chat_stop_ids(tok) if chat else None)
    if stop_ids is not None:
        params = replace(params, stop_ids=tuple(stop_ids))
    return ids, params


#: The judge's reply budget under --best-of when --judge-max-new-tokens is not given (a
#: JSFT judge answers [[A]] in a few tokens; a rationale first takes more); at most half
#: the judge's context window, so the judge prompt keeps the other half.
JUDGE_MAX_NEW_TOKENS = 512


def generate_best_of(args: argparse.Namespace, prompts: list, params, judge_prompt) -> int:
    """``hcx generate --best-of N``: SELF-JUDGE's self-rejection (hcx.stages.self_judge)."""
    import json

    from hcx.engine.generate import Generator
    from hcx.evaluation.models import HcxModel
    from hcx.stages import self_judge

    policy = HcxModel(args.checkpoint, tp=args.tp, log=log)
    judge_model = None
    try:
        judge_model = self_judge.open_judge_model(args.judge or "self", policy, tp=args.tp,
                                                  log=log)
        budget = args.judge_max_new_tokens or min(JUDGE_MAX_NEW_TOKENS,
                                                  judge_model.max_length // 2)
        judge = self_judge.pair_judge(judge_model, judge_prompt, budget)
        ids, params = encode_prompts(args, prompts, policy.tokenizer, params)
        questions = [self_judge.judge_question(p) for p in prompts]
        results = self_judge.best_of_n(Generator(policy.engine, policy.tokenizer), ids,
                                       questions, params, args.best_of, judge,
                                       batch_size=args.batch_size)
        if policy.rank0:
            for prompt, r in zip(prompts, results):
                counts = r.rejection.counts
                log(f"best of {args.best_of}: candidate {r.rejection.winner_index} won "
                    f"({counts['matches']} matches; ties {counts['ties']}, inconsistent "
                    f"{counts['inconsistent']}, unparseable replies {counts['unparseable']} "
                    f"of {counts['judge_calls']})")
                if args.json:
                    win = r.winner
                    print(json.dumps({
                        "prompt": prompt, "text": win.text, "ids": win.ids,
                        "finish_reason": win.finish_reason,
                        "best_of": {
                            "n": args.best_of, "judge": "self" if judge_model is policy
                            else judge_model.path, "judge_prompt": judge_prompt.name,
                            "candidates": [{"text": g.text, "ids": g.ids,
                                            "finish_reason": g.finish_reason}
                                           for g in r.candidates],
                            **r.rejection.to_dict()}}, ensure_ascii=False))
                else:
                    text = r.winner.text
                    print(text if len(prompts) == 1 else f"### {prompt}\n{text}\n")
    finally:
        if judge_model is not None and judge_model is not policy:
            judge_model.close()
        policy.close()
    return 0


def generate_best_of_reward(args: argparse.Namespace, prompts: list, params) -> int:
    """``hcx generate --best-of N --reward SPEC``: sample N candidates per prompt and keep
    the one the reward scores highest (ties: the lowest candidate number)."""
    import json

    from hcx.engine.generate import Generator
    from hcx.evaluation.models import HcxModel
    from hcx.stages import feedback, self_judge
    from hcx.stages.rewards import Sample

    policy = HcxModel(args.checkpoint, tp=args.tp, log=log)
    opened: list = []
    try:
        reward, opened = feedback.open_reward(args.reward, policy=policy, log=log)
        ids, params = encode_prompts(args, prompts, policy.tokenizer, params)
        sampled = self_judge.sample_candidates(Generator(policy.engine, policy.tokenizer), ids,
                                               params, args.best_of, args.batch_size)
        scores = reward([Sample(p, g.text) for p, cands in zip(prompts, sampled)
                         for g in cands])
        for k, (prompt, cands) in enumerate(zip(prompts, sampled)):
            mine = scores[k * args.best_of:(k + 1) * args.best_of]
            best = feedback.best_index(mine)
            if not policy.rank0:
                continue
            if best is None:
                log(f"best of {args.best_of}: the reward scored no candidate; keeping "
                    "candidate 0")
                best = 0
            else:
                log(f"best of {args.best_of}: candidate {best} scored highest "
                    f"({mine[best]:.4g}; unscored {sum(s is None for s in mine)})")
            win = cands[best]
            if args.json:
                print(json.dumps({
                    "prompt": prompt, "text": win.text, "ids": win.ids,
                    "finish_reason": win.finish_reason,
                    "best_of": {"n": args.best_of, "reward": args.reward, "winner_index": best,
                                "candidates": [{"text": g.text, "ids": g.ids,
                                                "finish_reason": g.finish_reason, "score": s}
                                               for g, s in zip(cands, mine)]}},
                    ensure_ascii=False))
            else:
                print(win.text if len(prompts) == 1 else f"### {prompt}\n{win.text}\n")
    finally:
        for model in opened:
            model.close()
        policy.close()
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export", help="an hcx checkpoint as a Hugging Face model directory",
        description="Convert a checkpoint of any TP/PP layout (a step directory, or a "
                    "checkpoints directory for its latest step) into a Hugging Face "
                    "directory of the family it was imported from (Llama, Mistral, Qwen2, "
                    "Qwen3, EXAONE; Llama for models trained here): config.json, safetensors "
                    "weights (sharded with model.safetensors.index.json above "
                    "--max-shard-size), generation_config.json, the tokenizer files with "
                    "the chat template and a model card (README.md), loadable with "
                    "AutoModelForCausalLM/AutoTokenizer without trust_remote_code. Runs in "
                    "one process and reads the checkpoint one layer at a time.")
    p.add_argument("checkpoint", help="e.g. runs/tiny/checkpoints")
    p.add_argument("out", help="output directory (replaced if it exists)")
    p.add_argument("--to", choices=["hf"], default="hf", help="target format")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file, as Hugging Face counts (5GB = 5*10^9 "
                        "bytes; default 5GB); one file when the weights fit")
    p.add_argument("--eval", metavar="RUN_DIR",
                   help="an 'hcx eval' run directory: its scores go into the model card "
                        "(model-index)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="then upload the directory to this Hub repository (OWNER/NAME; "
                        "HF_TOKEN or huggingface-cli login); refused before the export when "
                        "the Hub is not reachable (HF_HUB_OFFLINE, no connection)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="a Hugging Face Llama/Mistral/Qwen2/Qwen3/EXAONE directory as an hcx "
                       "checkpoint",
        description="Convert a local Hugging Face Llama (3.x RoPE scaling included), "
                    "Mistral, Qwen2/2.5, Qwen3 (dense) or EXAONE 3.x directory (config.json, "
                    "model.safetensors or sharded safetensors with their index, tokenizer "
                    "files) for continued pretraining. Writes OUT/checkpoint (the weights as "
                    "an hcx checkpoint, which loads at any TP/PP), OUT/tokenizer (the "
                    "model's tokenizer files) and OUT/recipe.yaml (a recipe stub at --tp/"
                    "--pp with checkpoint.init_from set). Next: write a recipe with "
                    "'base: OUT/recipe.yaml' that adds data.sources and run 'hcx pretrain' "
                    "on it. Refuses, naming the config key or tensor, what hcx's model "
                    "cannot represent (biases on every projection, other RoPE scalings, "
                    "sliding windows, ...). Runs in "
                    "one process.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="a Hugging Face model directory")
    p.add_argument("out", metavar="OUT",
                   help="output directory (new, or an earlier import, which is replaced)")
    p.add_argument("--tp", type=int, default=1, help="parallel.tp of the recipe stub (default: 1)")
    p.add_argument("--pp", type=int, default=1, help="parallel.pp of the recipe stub (default: 1)")
    p.add_argument("--tokenizer", metavar="EXTENDED",
                   help="import with this extension of the model's tokenizer ('hcx tokenizer "
                        "extend'): the embedding and output layer grow to it, and the stub "
                        "sets train.new_tokens_from to its first new id")
    p.add_argument("--new-rows", choices=["mean", "random"], default="mean",
                   help="with --tokenizer, each new token's rows start as the mean of the "
                        "rows of the pieces the model's tokenizer splits it into (default), "
                        "or random (normal, the old rows' standard deviation)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "generate", help="generate text from a checkpoint (greedy or sampled, KV cache)",
        description="Generate from an hcx checkpoint (any saved TP/PP layout; a step directory "
                    "or a checkpoints directory for its latest step). Greedy by default; "
                    "--temperature > 0 samples (with --top-k/--top-p, seeded). Prompts of "
                    "different lengths are batched with left padding. With --tp N it starts N "
                    "processes (tensor parallel) itself unless already under torchrun. Prints "
                    "each completion, or JSON lines with --json.")
    p.add_argument("checkpoint", help="e.g. runs/tiny/checkpoints")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="one prompt per line: plain text, or JSONL with 'prompt' or 'messages'")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the chat template and stop at "
                        "<|endofturn|>")
    p.add_argument("--system", help="a system message for chat prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    p.add_argument("--temperature", type=float,
                   help="0 (default) is greedy; > 0 samples from softmax(logits / T) "
                        "(default 1.0 with --best-of)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
    p.add_argument("--top-p", type=float,
                   help="sample from the smallest set with this much probability (default 1: "
                        "all; 0.9 with --best-of)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages repeating tokens of the prompt and output (CTRL)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when the output contains STRING (repeatable; not printed)")
    p.add_argument("--stop-id", action="append", type=int, metavar="ID",
                   help="stop at this token id (repeatable; default: end of document, and "
                        "end of turn with --chat)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence each step instead of using the KV cache")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes (default: 1)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: prompt, text, ids, finish_reason "
                        "(with --best-of also best_of: every candidate, every match with the "
                        "judge's replies, and the counts; with --reward every candidate's "
                        "score and the winner's index)")
    g = p.add_argument_group(
        "self-rejection", "SELF-JUDGE (Lee et al. 2024, arXiv:2402.11253; docs/alignment.md): "
                          "sample N responses per prompt and keep the one a pairwise judge "
                          "prefers in a single-elimination tournament, every match judged in "
                          "both orders (a tie or contradicting orders: the lower candidate "
                          "number goes through)")
    g.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="sample N responses (seeded, one batch after another) and keep the "
                        "judge's choice (default 1: no judging)")
    g.add_argument("--judge", metavar="JUDGE",
                   help="self (default: the checkpoint judges its own samples, as a JSFT model "
                        "does), another hcx checkpoint (opened beside it at --tp), a Hugging "
                        "Face directory, or an endpoint URL")
    add_judge_prompt_args(g, "pairwise", "pair-v2")
    g.add_argument("--judge-max-new-tokens", type=int, metavar="N",
                   help=f"tokens per judge reply, greedy (default {JUDGE_MAX_NEW_TOKENS}, at "
                        "most half the judge's context window)")
    g.add_argument("--reward", metavar="SPEC",
                   help="instead of a judge's tournament, keep the candidate this reward "
                        "scores highest (ties: the lowest candidate number): module:function "
                        "(e.g. hcx.scorers:korean_share), reward-model:PATH, math, code, or "
                        "judge:self|CHECKPOINT|HF_DIR|URL (a 1-10 rating); not with --judge")
    p.set_defaults(func=cmd_generate)

