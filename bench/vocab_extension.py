"""Vocabulary extension for continued pretraining on Korean: how much shorter Korean
becomes, that English and code do not change, and where a model's loss starts.

    .venv/bin/python bench/vocab_extension.py [--bases llama-3 qwen3 mistral]
        [--sizes 8000 16000 32000] [--sample-chars 30000000] [--train-steps 0]
        [--eval-sentences 300] [--work DIR] [--json out.json]

Bases (``../shared/data/tokenizers``): Llama 3 (its tiktoken rank file, converted to the
byte-level ``tokenizer.json`` Llama 3's Hugging Face directories ship, with its 256
special tokens, by transformers' ``TikTokenConverter``; the conversion is checked to
encode like tiktoken on the held-out text), Qwen3 (``tokenizer.json``, byte-level BPE)
and Mistral 7B v0.1 (SentencePiece BPE ``tokenizer.model``). Each is extended by every
size with ``hcx.data.tokenizer_extend`` on the Korean pretraining sources
(``data://train/pretrain/ko_*``, the first ``--sample-chars`` characters): the pieces are
learned once, for the largest size, and each smaller extension is its prefix (what
``hcx tokenizer extend --add N`` gives, BPE being greedy), written and checked as the
command does.

Tokenization, on held-out text none of it was learned from: FLORES-200 ``dev`` (997
sentences, Korean and English) and Python source (the standard library's ``json``
package and ``argparse.py``, as docs/tokenizer.md): Korean tokens per eojeol and UTF-8
bytes per token before and after; English and code token ids compared with the base's,
sentence by sentence (they must be identical).

Starting loss: for each base, a small random Llama-architecture model with the base's
vocabulary (2 layers, hidden 64, 4 heads, seed 0; ``--train-steps N`` first trains it N
AdamW steps on the Korean corpus with the base tokenizer, to see the initialisations on a
model that has learned something); then, for each extension, the same model grown by
``hcx.interop.vocab.init_rows`` (what ``hcx import --tokenizer`` runs) with ``mean`` and
``random`` new rows. Bits per byte on the first ``--eval-sentences`` Korean FLORES
sentences: the summed next-token negative log-likelihood (each sentence after the
tokenizer's begin-of-text or end-of-text token, so every token is predicted) in bits,
over the sentences' UTF-8 bytes: comparable across tokenizers.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

from hcx.paths import data_root

KO_CORPUS = ["data://train/pretrain/ko_legalize_kr_laws/train.jsonl",
             "data://train/pretrain/ko_legalize_kr_precedents/train.jsonl",
             "data://train/pretrain/ko_nsmc_reviews/train.jsonl",
             "data://train/pretrain/ko_konlpy_kolaw_kobill/train.jsonl"]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The token each held-out sentence follows (every token of the sentence is predicted).
START = {"llama-3": "<|begin_of_text|>", "qwen3": "<|endoftext|>", "mistral": "<s>"}


def llama3_specials() -> list[str]:
    """Llama 3's 256 special tokens, ids 128000-128255 (llama-models' tokenizer.py)."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
             7: "<|end_header_id|>", 9: "<|eot_id|>"}
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def convert_llama3(work: Path) -> Path:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out = work / "llama-3"
    if (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = TikTokenConverter(vocab_file=str(data_root() / "tokenizers/llama-3/tokenizer.model"),
                            pattern=LLAMA3_PATTERN,
                            extra_special_tokens=llama3_specials()).converted()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
         "eos_token": "<|end_of_text|>"}, indent=1))
    return out


def bases(work: Path, names: list[str]) -> dict[str, Path]:
    paths = {"qwen3": data_root() / "tokenizers/qwen3",
             "mistral": data_root() / "tokenizers/mistral/tokenizer.model.v1"}
    return {n: (convert_llama3(work) if n == "llama-3" else paths[n]) for n in names}


def held_out() -> dict[str, list[str]]:
    rows = [json.loads(line) for line in
            (data_root() / "eval/flores200_kor_eng/dev.jsonl").read_text().splitlines()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join(f.read_text() for f in sorted((stdlib / "json").glob("*.py")))
    code += (stdlib / "argparse.py").read_text()
    return {"ko": [r["kor_Hang"] for r in rows], "en": [r["eng_Latn"] for r in rows],
            "code": [code]}


def tokenizer_figures(base, new, texts: dict[str, list[str]]) -> dict:
    from hcx.data.tokenizer_stats import measure

    ko = measure(new, "ko", texts["ko"])
    same = {lang: all(base.encode(t) == new.encode(t) for t in texts[lang])
            for lang in ("en", "code")}
    ids = [i for t in texts["ko"] for i in new.encode(t)]
    return {"ko_tokens_per_eojeol": ko.tokens_per_word, "ko_bytes_per_token": ko.bytes_per_token,
            "ko_tokens": ko.tokens, "ko_new_token_share": sum(i >= base.vocab_size for i in ids)
            / max(len(ids), 1), "en_identical": same["en"], "code_identical": same["code"]}


# --- starting loss --------------------------------------------------------------------------


def small_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
        tie_word_embeddings=False)).eval()


def train_small(model, tok, docs: list[str], start: int, steps: int, log) -> None:
    """``steps`` AdamW steps of 8 sequences of 128 tokens from ``docs`` (base tokenizer)."""
    stream = []
    for d in docs:
        stream += [start] + tok.encode(d)
        if len(stream) > steps * 8 * 129 + 1:
            break
    data = torch.tensor(stream[:steps * 8 * 129]).view(steps, 8, 129)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss = model(data[step], labels=data[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 50 == 0:
            log(f"    train step {step + 1}: loss {loss.item():.3f}")
    model.eval()


@torch.no_grad()
def bits_per_byte(model, tok, texts: list[str], start: int, vocab: int) -> float:
    nll, nbytes = 0.0, 0
    for text in texts:
        ids = torch.tensor([[start] + tok.encode(text)])
        logits = model(ids).logits[0, :-1, :vocab].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        nbytes += len(text.encode("utf-8"))
    return nll / math.log(2) / nbytes


def grown(model, plan, pieces, method: str):
    """A copy of ``model`` with embedding and output rows for the extension."""
    import copy

    from hcx.interop.vocab import init_rows

    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    emb = init_rows(model.model.embed_tokens.weight.data, plan, pieces, method, gen)
    out = init_rows(model.lm_head.weight.data, plan, pieces, method, gen)
    new.resize_token_embeddings(plan.vocab_size, mean_resizing=False)
    new.model.embed_tokens.weight.data.copy_(emb)
    new.lm_head.weight.data.copy_(out)
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", nargs="+", default=["llama-3", "qwen3", "mistral"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[8000, 16000, 32000])
    ap.add_argument("--sample-chars", type=int, default=30_000_000)
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--eval-sentences", type=int, default=300)
    ap.add_argument("--work", default="runs/bench-vocab-extension")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # more threads than free cores spin: far slower

    from hcx.data.tokenizer_extend import open_base, read_corpus, write_extension
    from hcx.interop.vocab import VocabExtension, base_pieces, tokenizer_file
    from hcx.tokenizer.loading import open_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    texts = held_out()
    results: dict = {"args": vars(args), "bases": {}}
    for name, path in bases(work, args.bases).items():
        base = open_tokenizer(str(path))
        entry = results["bases"][name] = {"vocab_size": base.vocab_size, "extensions": {}}
        log(f"== {name}: {base.kind}, {base.vocab_size:,} ids")
        if name == "llama-3":  # the conversion encodes like the rank file
            ranks = open_tokenizer(str(data_root() / "tokenizers/llama-3/tokenizer.model"))
            entry["conversion_identical"] = all(
                ranks.encode(t) == base.encode(t) for lang in texts for t in texts[lang])
            log(f"   tokenizer.json encodes like the rank file: {entry['conversion_identical']}")
        entry["base"] = tokenizer_figures(base, base, texts)
        start = base.special_id(START[name])
        model = small_model(base.vocab_size)
        if args.train_steps:
            docs = read_corpus(KO_CORPUS, sample_chars=4_000_000, log=log)
            t0 = time.time()
            train_small(model, base, docs, start, args.train_steps, log)
            entry["train_seconds"] = round(time.time() - t0, 1)
        evaluation = texts["ko"][:args.eval_sentences]
        entry["base"]["bits_per_byte"] = bits_per_byte(model, base, evaluation, start,
                                                       base.vocab_size)
        log(f"   base: {entry['base']}")
        todo = [s for s in args.sizes if not (work / f"{name}-ko{s}" / "extension.json").is_file()]
        if todo:
            corpus = read_corpus(KO_CORPUS, sample_chars=args.sample_chars, log=log)
            learner = open_base(str(path))
            t0 = time.time()
            learned = learner.learn(corpus, max(todo), log)
            seconds = time.time() - t0
            log(f"   learned {len(learned.pieces):,} pieces in {seconds:.0f} s")
            entry["learn_seconds"] = round(seconds, 1)
            for size in todo:
                write_extension(learner, learned.first(size), work / f"{name}-ko{size}",
                                corpus, {"corpus": KO_CORPUS, "learned_as_prefix_of": max(todo)},
                                seconds, log)
        for size in args.sizes:
            out = work / f"{name}-ko{size}"
            meta = json.loads((out / "extension.json").read_text())
            new = open_tokenizer(str(tokenizer_file(out)))
            figures = {"added": meta["added"], "seconds_with_writing": meta["seconds"],
                       **tokenizer_figures(base, new, texts)}
            base_file = tokenizer_file(path) if Path(path).is_dir() else Path(path)
            plan = VocabExtension(base_file, tokenizer_file(out), out, base.vocab_size,
                                  new.vocab_size, new.vocab_size)
            pieces = base_pieces(plan)
            for method in ("mean", "random"):
                figures[f"bits_per_byte_{method}"] = bits_per_byte(
                    grown(model, plan, pieces, method), new, evaluation, start, new.vocab_size)
            entry["extensions"][size] = figures
            log(f"   +{size}: {figures}")
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
