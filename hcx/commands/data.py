"""``hcx data prepare``, ``hcx data jsft``, ``hcx data feedback``, ``hcx tokenize``, ``hcx tokenizer
stats|train|extend``: corpora, training data made from other data, and tokenizers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcx.commands.common import OVERRIDES_HELP, add_judge_prompt_args, log
from hcx.config import load_recipe


def cmd_data_prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.data import prepare

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"data.prepare.workers={args.workers}")
    if args.skip_bad:
        overrides.append("data.prepare.skip_bad=true")
    if args.executor is not None:
        overrides.append(f"data.prepare.executor.kind={args.executor}")
    if args.ray_address is not None:
        overrides.append(f"data.prepare.executor.address={args.ray_address}")
    recipe = load_recipe(args.recipe, overrides)
    if recipe.data.prepare.executor.kind == "slurm" and (args.force or not prepare.is_prepared(recipe)):
        submitted = prepare.run(recipe, log=log)
        if "submitted" in submitted:
            print(f"submitted: the last job, {submitted['submitted']}, writes the prepared data "
                  f"into {prepare.prepared_dir(recipe)}; then 'hcx pretrain {args.recipe}'")
            return 0
    prepare.ensure_prepared(recipe, force=args.force, progress=True, log=log)
    out = prepare.prepared_dir(recipe)
    print((out / "stats.md").read_text(), end="")
    log(f"report: {out / 'stats.md'} and stats.json; 'hcx pretrain {args.recipe}' trains on it")
    return 0


def cmd_data_jsft(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.stages import self_judge

    prompt = self_judge.load_pair_prompt(args.judge_prompts, args.judge_prompt)
    stats = self_judge.write_jsft(args.inputs, args.out, prompt, both_orders=args.both_orders,
                                  with_responses=args.with_responses, ties=args.ties,
                                  seed=args.seed, skip_bad=args.skip_bad,
                                  progress=sys.stderr.isatty())
    print(f"jsft: {stats.summary()}")
    print(args.out)
    log(f"judge prompt: {prompt.name} ({prompt.file}); next: 'hcx sft' on a recipe whose "
        f"data.sources has path: {args.out} (beside your SFT data, or with --with-responses)")
    return 0


def cmd_data_feedback(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.stages import feedback
    from hcx.stages.rewards import parse_spec

    parse_spec(args.reward, "--reward")  # a malformed spec fails before any model opens
    if not args.model and not args.completions:
        raise feedback.FeedbackError("no completions: give --model PATH_OR_URL (sampled) "
                                     "and/or --completions FILE")
    if args.model:
        feedback.check_sampling(args.samples, args.temperature)
    if not args.prompts and not args.completions:
        raise feedback.FeedbackError("no prompts: give --prompts FILE (or --completions FILE, "
                                     "whose prompts are then used)")
    from_files, given = feedback.read_completions(
        args.completions, args.prompt_field, args.completion_field)
    prompts = feedback.read_prompts(args.prompts, args.prompt_field) if args.prompts \
        else from_files
    if not prompts:
        raise feedback.FeedbackError(f"{', '.join(args.prompts or args.completions)}: no prompts")
    models, opened = [], []
    try:
        from hcx.evaluation.models import open_model

        for path in args.model:
            model = open_model(path, log=log)
            opened.append(model)
            models.append((path, model))
        hcx_models = [m for _, m in models if getattr(m, "kind", "") == "hcx"]
        reward, more = feedback.open_reward(
            args.reward, policy=hcx_models[0] if len(hcx_models) == 1 else None, log=log,
            judge_prompts=args.judge_prompts, judge_prompt=args.judge_prompt,
            judge_max_new_tokens=args.judge_max_new_tokens)
        opened += more
        samplers = [feedback.model_sampler(
            model, path, samples=args.samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            for path, model in models]
        stats = feedback.write_feedback(prompts, args.out, reward, given=given,
                                        samplers=samplers, seed=args.seed,
                                        batch_size=args.batch_size,
                                        progress=sys.stderr.isatty())
    finally:
        for model in opened:
            model.close()
    print(f"feedback: {stats.summary()}")
    if stats.per_source:
        print("scored completions by source: " + ", ".join(
            f"{k}: {v:,}" for k, v in sorted(stats.per_source.items())))
    print(args.out)
    log(f"dropped prompts: {feedback.dropped_path(Path(args.out))}; next: 'hcx align' with "
        f"align.method: dpo on a recipe whose data.sources has path: {args.out}")
    return 0


def cmd_tokenize(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.tokenizer.loading import TokenizerLoadError, open_tokenizer

    tok = open_tokenizer(args.tokenizer)
    stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with stream:
        for lineno, line in enumerate(stream, 1):
            line = line.rstrip("\n")
            if args.decode:
                try:
                    ids = [int(x) for x in line.replace(",", " ").replace("[", " ").replace("]", " ").split()]
                except ValueError:
                    raise TokenizerLoadError(f"{args.input}:{lineno}: expected token ids, got {line[:60]!r}") from None
                print(tok.decode(ids))
            else:
                ids = tok.encode(line)
                print(" ".join(map(str, ids)) if not args.count else len(ids))
    return 0


def cmd_tokenizer_stats(args: argparse.Namespace, argv: list[str]) -> int:
    import json

    from hcx.data import tokenizer_stats
    from hcx.tokenizer.loading import open_tokenizer

    texts = [tokenizer_stats.read_labelled(spec, args.text_field, args.limit) for spec in args.text]
    rows = []
    for spec in args.tokenizers:
        tok = open_tokenizer(spec)
        print(f"{tok.name}: {tok.kind}, vocabulary {tok.vocab_size:,}", file=sys.stderr)
        rows += [tokenizer_stats.measure(tok, label, docs) for label, docs in texts]
    print(tokenizer_stats.markdown_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)
    return 0


def cmd_tokenizer_extend(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.data import tokenizer_extend

    out = tokenizer_extend.extend(args.base, args.corpus, args.add,
                                  Path(args.out) if args.out else None,
                                  text_field=args.text_field, sample_chars=args.sample_chars,
                                  log=log)
    print(out)
    log(f"next: hcx import HF_DIR OUT --tokenizer {out} (new embedding rows start as the "
        "mean of their pieces' old rows)")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.data import tokenizer_train

    spec = tokenizer_train.load_spec(args.spec, args.overrides)
    out = tokenizer_train.train(spec, Path(args.spec),
                                log=log)
    print(out)
    return 0


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="corpus preparation",
                          description="Corpus preparation.").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    p = data.add_parser(
        "prepare", help="raw corpora -> cleaned, deduplicated, tokenized indexed datasets",
        description="Prepare the raw sources of a recipe (data.sources[*].path: JSONL, "
                    "Parquet, text, directories, globs, hf://Hub IDs) for pretraining: NFC "
                    "and control-character cleanup, length/repetition/language filters, exact "
                    "and MinHash near-duplicate removal across sources, PII masking, "
                    "decontamination against eval sets, fill-in-the-middle for code, "
                    "tokenization, as datatrove tasks on an executor: local worker processes "
                    "(default), SLURM job arrays, or a Ray cluster. Finished tasks are skipped "
                    "on a rerun. Writes <source>.bin/.idx, stats.json and stats.md into "
                    "data.prepare.output_dir (default <output_dir>/data_cache/prepared), where "
                    "'hcx pretrain' finds them. Settings: data.prepare.* in the recipe "
                    "(executor: data.prepare.executor.*; see docs/data.md).")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--workers", type=int, help="tasks run at once, local or on Ray "
                   "(data.prepare.workers)")
    p.add_argument("--executor", choices=("local", "slurm", "ray"),
                   help="where the tasks run (data.prepare.executor.kind; default local): slurm "
                        "submits job arrays with sbatch (partition, time, ... under "
                        "data.prepare.executor) and returns; ray uses --ray-address or starts a "
                        "local Ray cluster")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="an existing Ray cluster, e.g. ray://head:10001 "
                        "(data.prepare.executor.address)")
    p.add_argument("--skip-bad", action="store_true",
                   help="count malformed records in the report instead of stopping at the first")
    p.add_argument("--force", action="store_true", help="prepare even if up to date")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser(
        "jsft", help="preference pairs -> SELF-JUDGE judge-augmented SFT data (JSFT)",
        description="SELF-JUDGE's Judge-augmented SFT data (Lee et al. 2024, arXiv:2402.11253): "
                    "each preference pair (TRL format, as 'hcx align' reads it: prompt, chosen, "
                    "rejected) becomes SFT conversations in which the model judges the pair: "
                    "the judge prompt (FastChat pair-v2 by default) filled with the question "
                    "and both answers as the user turn, the verdict [[A]] or [[B]] as the "
                    "assistant turn, chosen shown first and then second (both orders: no "
                    "position bias). With --with-responses the plain SFT conversation (prompt "
                    "-> chosen) is written too, so one model learns to answer and to judge. "
                    "Ties (identical answers, or score_chosen == score_rejected) are dropped "
                    "and counted, or kept as [[C]] with --ties keep; per-answer evaluations in "
                    "chosen_rationale/rejected_rationale are written before the verdict. "
                    "Writes JSONL with 'messages' (what 'hcx sft' reads), shuffled with "
                    "--seed, atomically. See docs/alignment.md, SELF-JUDGE.")
    p.add_argument("inputs", nargs="+", metavar="PREFERENCE_FILE",
                   help="paired preference data: JSONL, Parquet, a directory, a glob, data:// "
                        "or hf://")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="the JSFT conversations")
    add_judge_prompt_args(p, "pairwise", "pair-v2")
    p.add_argument("--both-orders", action=argparse.BooleanOptionalAction, default=True,
                   help="write every pair in both orders (default); --no-both-orders writes "
                        "one order per pair, drawn with --seed")
    p.add_argument("--with-responses", action="store_true",
                   help="also write prompt -> chosen SFT conversations (JSFT's policy data)")
    p.add_argument("--ties", choices=["drop", "keep"], default="drop",
                   help="pairs scored equal: drop and count them (default), or keep them with "
                        "the verdict [[C]]")
    p.add_argument("--seed", type=int, default=0,
                   help="shuffles the output and draws single orders (default: 0)")
    p.add_argument("--skip-bad", action="store_true",
                   help="count malformed records instead of stopping at the first")
    p.set_defaults(func=cmd_data_jsft)

    p = data.add_parser(
        "feedback", help="prompts + scored completions -> preference pairs (Zephyr dDPO)",
        description="AI-feedback preference data as Zephyr's distilled DPO makes it (Tunstall "
                    "et al. 2023, arXiv:2310.16944): completions of every prompt, sampled "
                    "from one or more models (--model, --samples K each) and/or read from "
                    "files (--completions), are scored by one reward (--reward; a judge is "
                    "judge:MODEL); the best-scoring completion is chosen and a seeded random "
                    "other one rejected. Prompts whose best score is shared (ties) or with "
                    "fewer than 2 scored completions are dropped, counted and listed in "
                    "OUT's .dropped.jsonl. Writes TRL preference JSONL (prompt, chosen, "
                    "rejected, score_chosen, score_rejected, model_chosen, model_rejected) "
                    "that 'hcx align' (DPO, IPO, ORPO, KTO, ...) reads as is. Resumable: "
                    "lines go to OUT.partial as prompts finish; a rerun skips prompts done "
                    "and OUT appears (renamed) when all are. See docs/alignment.md, "
                    "AI-feedback preference data.")
    p.add_argument("--prompts", action="append", default=[], metavar="SOURCE",
                   help="prompts: JSONL, Parquet, a directory, a glob, data:// or hf:// "
                        "(repeatable; default: the prompts of --completions)")
    p.add_argument("--prompt-field", default="prompt", metavar="NAME",
                   help="the prompt's field: text, or chat messages (a trailing assistant turn "
                        "is dropped and becomes the record's answer); default: prompt")
    p.add_argument("--model", action="append", default=[], metavar="PATH_OR_URL",
                   help="sample completions from this model: an hcx checkpoint, a Hugging "
                        "Face directory or an OpenAI-compatible endpoint URL (repeatable)")
    p.add_argument("--samples", type=int, default=2, metavar="K",
                   help="completions sampled per prompt from each --model (default: 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="default: 1.0")
    p.add_argument("--top-p", type=float, default=1.0, help="default: 1.0")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default: 256")
    p.add_argument("--completions", action="append", default=[], metavar="FILE",
                   help="completions written earlier: records with the prompt field and "
                        "--completion-field (text, or messages ending with the assistant's), "
                        "optionally 'model' naming their source (repeatable)")
    p.add_argument("--completion-field", default="completion", metavar="NAME",
                   help="default: completion")
    p.add_argument("--reward", required=True, metavar="SPEC",
                   help="module:function (e.g. hcx.scorers:korean_share), "
                        "reward-model:PATH, math (the record's 'answer'), code (its 'test'), "
                        "or judge:self|CHECKPOINT|HF_DIR|URL (MT-Bench single-v1 rating 1-10; "
                        "self: the one hcx --model)")
    add_judge_prompt_args(p, "single-answer", "single-v1", prefix="judge: ")
    p.add_argument("--judge-max-new-tokens", type=int, metavar="N",
                   help="judge: tokens per rating reply, greedy (default: 256)")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="the preference pairs")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the rejected completions and seeds the sampling (default: 0)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts sampled and scored together (default: 8)")
    p.set_defaults(func=cmd_data_feedback)

    p = sub.add_parser("tokenize", help="encode or decode text line by line",
                       description="Encode each input line to token ids (space-separated), or "
                                   "with --decode turn lines of ids back into text. TOKENIZER "
                                   "is any format 'hcx tokenizer stats' reads.")
    p.add_argument("tokenizer", metavar="TOKENIZER")
    p.add_argument("--input", default="-", help="a text file, or - for standard input (default)")
    p.add_argument("--decode", action="store_true", help="input lines are token ids")
    p.add_argument("--count", action="store_true", help="print only the number of tokens per line")
    p.set_defaults(func=cmd_tokenize)

    tok = sub.add_parser("tokenizer", help="tokenizer tools",
                         description="Tokenizer tools.").add_subparsers(dest="tokenizer_command",
                                                                         required=True, metavar="COMMAND")
    p = tok.add_parser(
        "stats", help="tokens per word/char and bytes per token, side by side",
        description="Compare tokenizers on labelled text: tokens per word (eojeol for Korean), "
                    "tokens per non-whitespace character, UTF-8 bytes per token. Tokenizers: "
                    "'bytes', a SentencePiece .model, a HF tokenizer.json(.xz), a directory with "
                    "vocab.json+merges.txt or encoder.json+vocab.bpe, or a tiktoken rank file; "
                    "prefix NAME= to name one. Prints a Markdown table.")
    p.add_argument("tokenizers", nargs="+", metavar="TOKENIZER")
    p.add_argument("--text", action="append", required=True, metavar="LABEL=FILE[#FIELD]",
                   help="JSONL (field FIELD, else --text-field) or plain text; repeat per "
                        "language, e.g. --text ko=dev.jsonl#kor_Hang --text en=dev.jsonl#eng_Latn")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per file")
    p.add_argument("--json", help="also write the figures as JSON here")
    p.set_defaults(func=cmd_tokenizer_stats)

    p = tok.add_parser(
        "train", help="train a bilingual SentencePiece tokenizer from a spec",
        description="Train the SentencePiece model a spec describes (tokenizer/*.yaml): "
                    "text sampled per language (ko/en/code) to the spec's ratios, optional "
                    "Korean morpheme-aware merges (kiwipiepy), byte fallback, single digits, "
                    "whitespace kept for code, hcx special tokens. Writes tokenizer.model "
                    "and an identical Hugging Face tokenizer.json + tokenizer_config.json "
                    "into the spec's output_dir (default: tokenizer/<name> beside the spec), "
                    "checked to encode the same.")
    p.add_argument("spec", help="tokenizer spec YAML, e.g. tokenizer/hcx-ko-en-32k.yaml")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_tokenizer_train)

    p = tok.add_parser(
        "extend", help="add learned Korean pieces to an existing tokenizer, old ids kept",
        description="Learn N new Korean pieces on a corpus, as BPE merges on top of the base "
                    "tokenizer's own tokens, and append them: a SentencePiece BPE .model (new "
                    "pieces scored below every old one; Korean characters it spells in bytes "
                    "added first) or a byte-level BPE tokenizer.json (new tokens and merges "
                    "after the existing ones). Every old id keeps its piece and text without "
                    "Korean encodes as before (checked). Writes OUT/tokenizer.json (+ "
                    "tokenizer.model for SentencePiece, checked to encode the same), the "
                    "base's tokenizer_config.json and extension.json. Next: hcx import "
                    "HF_DIR OUT --tokenizer EXTENDED.")
    p.add_argument("base", metavar="BASE",
                   help="a SentencePiece .model, a tokenizer.json, or a directory with one "
                        "(e.g. a Hugging Face model directory)")
    p.add_argument("--corpus", action="append", required=True, metavar="FILES",
                   help="Korean text: JSONL (--text-field), plain text, a directory or a glob; "
                        "data:// paths work; repeatable")
    p.add_argument("--add", type=int, required=True, metavar="N", help="new pieces to learn")
    p.add_argument("-o", "--out", help="output directory (default: <base folder>-ko<N>)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--sample-chars", type=int, default=20_000_000,
                   help="read at most this many characters of the corpus (default 20M)")
    p.set_defaults(func=cmd_tokenizer_extend)

