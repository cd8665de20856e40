"""``hcx export``, ``hcx import``, ``hcx generate``: checkpoints in and out, and text
from them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcx.commands.common import log, needs_relaunch, relaunch_with_torchrun


def cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.interop.hf import export_hf

    out = export_hf(Path(args.checkpoint), Path(args.out),
                    log=log)
    print(out)
    return 0


def cmd_import(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.interop.hf import import_hf

    stub = import_hf(Path(args.hf_dir), Path(args.out), tp=args.tp, pp=args.pp, log=log)
    print(stub)
    log(f"next: write a recipe with 'base: {stub}' and your data.sources (see the comments "
        "in it), then: hcx pretrain YOUR_RECIPE.yaml")
    return 0


def cmd_generate(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.engine import generate

    params = generate.SamplingParams(  # validated before any process starts
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        stop_strings=tuple(args.stop), seed=args.seed, use_cache=not args.no_cache)
    prompts = list(args.prompt) + (generate.read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise generate.GenerationError("no prompts: give --prompt TEXT or --prompts-file FILE")
    if needs_relaunch(args.tp):
        return relaunch_with_torchrun(args.tp, argv)
    import json

    from hcx.engine.inference import open_checkpoint
    from hcx.engine.parallel import shutdown

    try:
        engine, tok = open_checkpoint(Path(args.checkpoint), tp=args.tp, log=log)
        chat = args.chat or any(isinstance(p, list) for p in prompts)
        ids = [generate.encode_prompt(p, tok, args.chat, args.system) for p in prompts]
        stop_ids = args.stop_id or (generate.chat_stop_ids(tok) if chat else None)
        if stop_ids is not None:
            params = generate.SamplingParams(**{**params.__dict__, "stop_ids": tuple(stop_ids)})
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


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export", help="an hcx checkpoint as a Hugging Face Llama directory",
        description="Convert a checkpoint of any TP/PP layout (a step directory, or a "
                    "checkpoints directory for its latest step) into a Hugging Face Llama "
                    "directory: config.json, model.safetensors and the tokenizer files with "
                    "the chat template, loadable with AutoModelForCausalLM/AutoTokenizer "
                    "without trust_remote_code. Runs in one process.")
    p.add_argument("checkpoint", help="e.g. runs/tiny/checkpoints")
    p.add_argument("out", help="output directory (replaced if it exists)")
    p.add_argument("--to", choices=["hf"], default="hf", help="target format")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="a Hugging Face Llama/Mistral directory as an hcx checkpoint",
        description="Convert a local Hugging Face Llama or Mistral directory (config.json, "
                    "model.safetensors or sharded safetensors with their index, tokenizer "
                    "files) for continued pretraining. Writes OUT/checkpoint (the weights as "
                    "an hcx checkpoint, which loads at any TP/PP), OUT/tokenizer (the "
                    "model's tokenizer files) and OUT/recipe.yaml (a recipe stub at --tp/"
                    "--pp with checkpoint.init_from set). Next: write a recipe with "
                    "'base: OUT/recipe.yaml' that adds data.sources and run 'hcx pretrain' "
                    "on it. Refuses, naming the config key or tensor, what hcx's model "
                    "cannot represent (biases, RoPE scaling, sliding windows, ...). Runs in "
                    "one process.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="a Hugging Face model directory")
    p.add_argument("out", metavar="OUT",
                   help="output directory (new, or an earlier import, which is replaced)")
    p.add_argument("--tp", type=int, default=1, help="parallel.tp of the recipe stub (default: 1)")
    p.add_argument("--pp", type=int, default=1, help="parallel.pp of the recipe stub (default: 1)")
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
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) is greedy; > 0 samples from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set with this much probability (1: all)")
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
                   help="print one JSON object per prompt: prompt, text, ids, finish_reason")
    p.set_defaults(func=cmd_generate)

