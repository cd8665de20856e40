"""``hcx tokenizer train SPEC``: a bilingual SentencePiece tokenizer, plus its HF twin.

Steps, each small:
1. sample training text per language (Korean / English / code) to the spec's ratios;
2. optionally mark Korean morpheme boundaries (kiwipiepy) so that no learned piece
   crosses one — the analyzer shapes *training* only; encoding is plain SentencePiece;
3. train SentencePiece (BPE or unigram) with byte fallback, single-digit pieces,
   whitespace kept as is (indentation and runs of spaces matter in code), a newline
   piece, and the hcx special tokens;
4. write ``tokenizer.model`` and an equivalent Hugging Face ``tokenizer.json`` +
   ``tokenizer_config.json`` (see :mod:`hcx.tokenizer.hf`), verify they encode
   identically on the training sample, and record the spec and sample statistics.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from hcx.tokenizer import special_tokens as st
from hcx.config import Strict, load_config
from hcx.errors import HcxError
from hcx.paths import resolve
from hcx.data.sources import (BadRecord, detect_format, expand, is_hub, iter_records,
                              jsonl_pieces, parse_record, raw_records)

LANGUAGES = ("ko", "en", "code")
# SentencePiece splits training text at this character and never merges across it; it
# is removed before training text is sampled, so it cannot occur otherwise.
MORPHEME_DELIMITER = "\u2063"  # INVISIBLE SEPARATOR
OVERSAMPLE = 4  # documents read per language, as a multiple of its share of the sample


class TokenizerTrainError(HcxError, ValueError):
    pass


class CorpusSource(Strict):
    """Training text: a file, directory or glob (``data://`` and ``python://stdlib`` work)."""

    name: str
    path: str
    language: Literal["ko", "en", "code"]
    text_field: str = "text"
    include: str = Field(default="*", description="file-name glob inside a directory")
    exclude: list[str] = Field(default_factory=list,
                               description="globs relative to the directory, left out")


class TokenizerSpec(Strict):
    name: str
    output_dir: str | None = Field(default=None, description="None = tokenizer/<name> beside the spec")
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(default=32768, ge=300)
    sources: list[CorpusSource] = Field(min_length=1)
    language_ratios: dict[str, float] = Field(
        default_factory=lambda: {"ko": 0.4, "en": 0.35, "code": 0.25},
        description="share of training characters per language")
    sample_chars: int = Field(default=20_000_000, gt=0, description="training sample size")
    sentence_chars: int = Field(default=4000, gt=0, description="documents are cut into "
                                "training sentences of at most this many characters, at lines")
    morpheme_aware: bool = True
    byte_fallback: bool = True
    split_digits: bool = True
    character_coverage: float = Field(default=0.9995, gt=0, le=1)
    max_piece_length: int = Field(default=16, gt=0)
    seed: int = 1234
    threads: int = Field(default=0, ge=0, description="0 = all cores")

    @model_validator(mode="after")
    def _ratios_cover_sources(self):
        for key, value in self.language_ratios.items():
            if key not in LANGUAGES:
                raise ValueError(f"language_ratios: unknown language {key!r} (use {LANGUAGES})")
            if value < 0:
                raise ValueError(f"language_ratios.{key} must be >= 0")
        for s in self.sources:
            if self.language_ratios.get(s.language, 0) <= 0:
                raise ValueError(f"source {s.name!r} is {s.language!r} but language_ratios "
                                 f"gives that language no share")
        return self


def load_spec(path: str | Path, overrides: list[str] = ()) -> TokenizerSpec:
    """A tokenizer spec; its relative source paths resolve as a recipe's inputs do (from the
    spec's folder; docs/recipes.md, "Paths"), never from wherever the command runs."""
    spec, _ = load_config(path, TokenizerSpec, overrides, what="tokenizer spec",
                          inputs=("sources.*.path",))
    return spec


# --- 1. sampling ------------------------------------------------------------------------


def _documents(source: CorpusSource, records) -> Iterator[str]:
    from hcx.data.corpus.clean import normalize

    for record in records:
        try:
            text = parse_record(record, source.text_field)
        except BadRecord as e:
            raise TokenizerTrainError(f"source {source.name!r}: {e}") from None
        if text.strip():
            yield normalize(text).replace(MORPHEME_DELIMITER, "")


def iter_documents(source: CorpusSource) -> Iterator[str]:
    yield from _documents(source, iter_records(source.path, source.include, source.exclude,
                                               language=source.language))


def corpus_pieces(sources: list[CorpusSource], pieces: int) -> list[tuple]:
    """``(source, file, format, start, end, first_line, bytes)`` pieces covering every
    file of ``sources``: JSONL files cut at line boundaries into about ``pieces`` pieces
    over all of them (as ``hcx data prepare`` cuts its tasks), other files whole."""
    files = [(s, f, detect_format(f, s.language)) for s in sources
             for f in expand(s.path, s.include, s.exclude)]
    total = sum(f.stat().st_size for _, f, _ in files)
    size = max(total // max(pieces, 1), 1 << 16)
    out = []
    for source, f, fmt in files:
        if fmt == "jsonl":
            out += [(source, f, fmt, a, b, line, b - a) for a, b, line in jsonl_pieces(f, size)]
        else:
            out.append((source, f, fmt, 0, None, 1, f.stat().st_size))
    return out


SAMPLE_PIECES = 256  # places a large corpus is sampled at, spread over all its files
SPREAD_ABOVE = 64    # corpus bytes per wanted character above which the sample is spread


def language_documents(sources: list[CorpusSource], want_chars: int) -> list[str]:
    """About ``want_chars`` of whole documents of one language. A corpus of up to
    ``SPREAD_ABOVE`` times that (every shipped spec's) is read in order, as before; a
    larger one is cut into ``SAMPLE_PIECES`` pieces across all
    its files (JSONL at line boundaries), and every piece gives its share of documents
    from its start: the sample covers the whole corpus, not its first files, and memory
    holds only the sample, however large the corpus."""
    local = [s for s in sources if not is_hub(s.path)]
    corpus_bytes = sum(f.stat().st_size for s in local
                       for f in expand(s.path, s.include, s.exclude))
    if len(local) < len(sources) or corpus_bytes <= SPREAD_ABOVE * want_chars:
        docs, read = [], 0
        for source in sources:
            for doc in iter_documents(source):
                docs.append(doc)
                read += len(doc)
                if read >= want_chars:
                    return docs
        return docs
    pieces = corpus_pieces(sources, SAMPLE_PIECES)
    quota = want_chars / len(pieces)
    docs = []
    for source, f, fmt, start, end, line, _ in pieces:
        got = 0
        for doc in _documents(source, raw_records(f, fmt, start, end, line)):
            docs.append(doc)
            got += len(doc)
            if got >= quota:
                break
    return docs


def split_sentences(text: str, max_chars: int) -> Iterator[str]:
    """Cut a document at line ends into pieces of at most ``max_chars`` (a longer line
    is cut hard). Newlines stay inside: the tokenizer learns line structure."""
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                yield current
                current = ""
            yield line[:max_chars]
            line = line[max_chars:]
        if len(current) + len(line) > max_chars and current:
            yield current
            current = ""
        current += line
    if current.strip():
        yield current


def sample_sentences(spec: TokenizerSpec, log=print) -> dict[str, list[str]]:
    """Training sentences per language, each language to its share of ``sample_chars``.

    ``OVERSAMPLE`` times a language's share is drawn from its corpus
    (:func:`language_documents`: in order when the corpus is small, else from pieces
    spread over all its files, so a corpus that does not fit in memory works); those
    documents are shuffled with the spec's seed (reproducible) and cut into sentences
    until the share is met. A language with less text than its share contributes all it
    has (reported).
    """
    rng = random.Random(spec.seed)
    total_ratio = sum(spec.language_ratios.get(lang, 0) for lang in {s.language for s in spec.sources})
    out: dict[str, list[str]] = {}
    for lang in LANGUAGES:
        sources = [s for s in spec.sources if s.language == lang]
        if not sources:
            continue
        budget = int(spec.sample_chars * spec.language_ratios[lang] / total_ratio)
        docs = language_documents(sources, OVERSAMPLE * budget)
        rng.shuffle(docs)
        chosen, used = [], 0
        for doc in docs:
            for sentence in split_sentences(doc, spec.sentence_chars):
                if used >= budget:
                    break
                chosen.append(sentence)
                used += len(sentence)
            if used >= budget:
                break
        out[lang] = chosen
        log(f"  {lang}: {used:,} characters from {len(docs):,} documents "
            f"({', '.join(s.name for s in sources)}; budget {budget:,})")
    return out


# --- 2. morpheme boundaries ---------------------------------------------------------------


def morpheme_boundaries(text: str, tokens) -> list[int]:
    """Character offsets inside eojeols where a new morpheme starts.

    Kiwi's tokens can overlap when a morpheme is contracted into the previous syllable
    (입니다 -> 이 at (0,1) + ᆸ니다 at (0,3)): a boundary is a token start that lies
    beyond every earlier token's span and is not at the start of an eojeol.
    """
    cuts, covered = [], 0
    for tok in tokens:
        start, end = tok.start, tok.start + tok.len
        if start >= covered and start > 0 and not text[start - 1].isspace():
            cuts.append(start)
        covered = max(covered, end)
    return cuts


def mark_morphemes(sentences: list[str], threads: int) -> list[str]:
    """Insert :data:`MORPHEME_DELIMITER` at Korean morpheme boundaries."""
    from kiwipiepy import Kiwi

    kiwi = Kiwi(num_workers=threads)
    out = []
    for text, tokens in zip(sentences, kiwi.tokenize(sentences)):
        cuts = morpheme_boundaries(text, tokens)
        pieces, last = [], 0
        for cut in cuts:
            pieces.append(text[last:cut])
            last = cut
        pieces.append(text[last:])
        out.append(MORPHEME_DELIMITER.join(pieces))
    return out


# --- 3. training --------------------------------------------------------------------------


def trainer_options(spec: TokenizerSpec, model_prefix: str, threads: int) -> dict:
    options = dict(
        model_prefix=model_prefix,
        model_type=spec.model_type,
        vocab_size=spec.vocab_size,
        byte_fallback=spec.byte_fallback,
        split_digits=spec.split_digits,
        character_coverage=spec.character_coverage,
        max_sentencepiece_length=spec.max_piece_length,
        # Text goes in as it is (hcx normalizes to NFC before it tokenizes): no NFKC
        # rewriting, whitespace runs kept and allowed as pieces (code indentation), and
        # no dummy leading space, so that pieces of one text (FIM parts, chat turns)
        # encode the same apart as together.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=st.PAD, unk_piece=st.UNK, bos_piece=st.BOS, eos_piece=st.EOS,
        control_symbols=st.CONTROL_SYMBOLS,
        user_defined_symbols=st.USER_SYMBOLS,
        max_sentence_length=spec.sentence_chars * 4 + 16,  # bytes; UTF-8 <= 4 per char
        shuffle_input_sentence=True,
        input_sentence_size=0,
        num_threads=threads,
        minloglevel=2,
    )
    if spec.morpheme_aware:
        options["pretokenization_delimiter"] = MORPHEME_DELIMITER
    return options


def train(spec: TokenizerSpec, spec_path: Path | None = None, log=print) -> Path:
    """Train, export and verify; returns the output directory. Written atomically: the
    directory appears complete or not at all."""
    import sentencepiece as spm

    from hcx.tokenizer.hf import write_hf_tokenizer
    from hcx.tokenizer.loading import open_tokenizer

    # output_dir, like every path in the spec, is relative to the working directory;
    # without one the tokenizer goes beside its spec: tokenizer/<name>/.
    base = spec_path.parent if spec_path else Path.cwd()
    out = resolve(spec.output_dir) if spec.output_dir else base / spec.name
    if out.exists() and not (out / "tokenizer.model").exists():
        raise TokenizerTrainError(f"output_dir {out} exists and is not a tokenizer directory "
                                  "(no tokenizer.model): refusing to replace it")
    threads = spec.threads or os.cpu_count() or 1
    t0 = time.time()
    log(f"sampling training text ({spec.sample_chars:,} characters)")
    sample = sample_sentences(spec, log)
    if spec.morpheme_aware and sample.get("ko"):
        log(f"marking Korean morpheme boundaries with kiwipiepy ({len(sample['ko']):,} sentences)")
        sample["ko"] = mark_morphemes(sample["ko"], threads)
    sentences = [s for lang in sample for s in sample[lang]]
    random.Random(spec.seed).shuffle(sentences)
    if not sentences:
        raise TokenizerTrainError("the sources gave no text")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a shared artifact
    try:
        log(f"training SentencePiece {spec.model_type}, vocabulary {spec.vocab_size:,}, "
            f"{len(sentences):,} sentences, {threads} threads")
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences),
                                           **trainer_options(spec, str(tmp / "tokenizer"), threads))
        except RuntimeError as e:
            raise TokenizerTrainError(f"SentencePiece training failed: {e}") from None
        (tmp / "tokenizer.vocab").unlink(missing_ok=True)
        write_hf_tokenizer(tmp / "tokenizer.model", tmp)
        log("checking that tokenizer.json encodes and decodes like tokenizer.model")
        plain = [s.replace(MORPHEME_DELIMITER, "") for s in sentences[:2000]]
        mismatches = parity_mismatches(open_tokenizer(str(tmp / "tokenizer.model")),
                                       open_tokenizer(str(tmp / "tokenizer.json")), plain)
        if mismatches:
            message = (f"tokenizer.json differs from tokenizer.model on {len(mismatches)} of "
                       f"{len(plain)} sentences, e.g. {mismatches[0][:80]!r}")
            if spec.model_type == "bpe":
                raise TokenizerTrainError(message)
            # Unigram: when two segmentations score exactly the same (e.g. '....'+'.' and
            # '.'+'....'), SentencePiece and tokenizers break the tie differently.
            log(f"warning: {message} (unigram ties; BPE models match exactly)")
        summary = {
            "spec": spec.model_dump(),
            "sample_characters": {lang: sum(map(len, s)) for lang, s in sample.items()},
            "sample_sentences": {lang: len(s) for lang, s in sample.items()},
            "seconds": round(time.time() - t0, 1),
            "parity_checked_sentences": len(plain),
            "parity_mismatches": len(mismatches),
        }
        (tmp / "training.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        (tmp / "spec.yaml").write_text(  # the spec as trained, overrides included
            f"# hcx tokenizer train {spec_path or ''}\n"
            + yaml.safe_dump(spec.model_dump(), sort_keys=False, allow_unicode=True))
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        if out.exists():
            os.replace(out, old)  # swapped, not deleted first: a crash here loses nothing
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} in {time.time() - t0:.0f} s")
    return out


def parity_mismatches(a, b, texts: list[str]) -> list[str]:
    """Texts that two tokenizers encode differently, or whose ids do not decode back.

    Texts holding a special-token string literally are left out: SentencePiece encodes
    them as text, while Hugging Face tokenizers match them as specials by design (its
    chat templates depend on that). A literal U+2581 decodes as a space in both.
    """
    bad = []
    for text in texts:
        if any(tok in text for tok in st.CONTROL_SYMBOLS + [st.PAD, st.UNK, st.BOS, st.EOS]):
            continue
        ids = a.encode(text)
        expected = text.replace("\u2581", " ")
        if b.encode(text) != ids or a.decode(ids) != expected or b.decode(ids) != expected:
            bad.append(text)
    return bad
