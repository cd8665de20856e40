"""``hcx tokenizer extend BASE --corpus FILES --add N``: new Korean pieces for an existing
tokenizer, every old id kept.

Continued pretraining of an open model on Korean (EEVE, arXiv:2402.14714; Chinese-LLaMA)
starts by giving its tokenizer Korean pieces: fewer tokens per eojeol means more text per
context and per FLOP. The model's embeddings are indexed by id, so an extension may only
*append*: ids ``0 .. V-1`` keep their pieces, and text without Korean must encode exactly
as before.

How the new pieces are learned: BPE on top of the base tokenizer. The Korean corpus is
encoded with the base tokenizer; each run of Korean tokens inside a word (for byte-level
BPE, a pre-tokenized word that is Hangul after an optional leading space; for
SentencePiece, consecutive Hangul pieces of a ``▁`` word) becomes a sequence of *units*,
the base tokens. The most frequent adjacent pair of units is merged into a new piece,
repeatedly (the ``tokenizers`` BPE trainer does the counting: each distinct unit is
mapped to one private-use character). Every new piece is therefore the concatenation of
two pieces the extended tokenizer already has, and the merges are appended *after* the
base's own:

- byte-level BPE (``tokenizer.json``, as Qwen, Llama 3 and GPT-2 style models ship):
  merges apply lowest rank first, so a word is first merged exactly as by the base
  tokenizer and only then by new merges; the new tokens and merges go at the end of the
  vocabulary and of the merge list;
- SentencePiece BPE (``.model``, Llama 2, Mistral, hcx's own): pieces merge highest
  score first, so the new pieces get scores below every old one. Korean syllables the
  base model lacks (it spells them with byte-fallback pieces) are added first as
  single-character pieces, the most frequent first, until 99.95% of Hangul occurrences
  in the corpus are covered (SentencePiece's default ``character_coverage``).

Both keep the base encoding of any text in which no new piece can apply: every new piece
holds Korean bytes, so English and code tokenize exactly as before (checked on a
built-in English/code sample when writing). For SentencePiece the Hugging Face twin
(:mod:`hcx.tokenizer.hf`) is written too and checked to encode like the ``.model`` on
the corpus sample, as ``hcx tokenizer train`` checks its own.
"""

from __future__ import annotations

import json
import lzma
import re
import shutil
import tempfile
import time
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hcx.errors import HcxError

# Hangul syllables, jamo and compatibility jamo.
HANGUL = re.compile("^[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]+$")
SPACE = "\u2581"  # SentencePiece's whitespace
CHARACTER_COVERAGE = 0.9995
# What the written tokenizer must encode exactly as the base did (besides any text the
# caller checks): English prose, code with indentation, numbers and punctuation.
UNCHANGED_SAMPLES = (
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m. on 2024-05-17!",
    "def fibonacci(n: int) -> list[int]:\n    a, b = 0, 1\n    out = []\n"
    "    for _ in range(n):\n        out.append(a)\n        a, b = b, a + b\n    return out\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 2; }  // C\n\tif (x != NULL) return -1;",
    "  Indented text,   double  spaces, tabs\tand\nnewlines \u2014 \"quotes\" (parens) [1].",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
)
UNITS_PER_PLANE = 65534  # private-use planes 15 and 16 (U+F0000.., U+100000..)


class ExtensionError(HcxError, ValueError):
    pass


def is_korean(text: str) -> bool:
    return bool(HANGUL.match(text))


# --- corpus ---------------------------------------------------------------------------


def read_corpus(paths: list[str], text_field: str = "text", sample_chars: int = 20_000_000,
                log=print) -> list[str]:
    """Documents from files, directories or globs (JSONL ``text_field``, plain text, ...)
    until ``sample_chars`` characters, NFC-normalized as ``hcx data prepare`` does."""
    from hcx.data.corpus.clean import normalize
    from hcx.data.indexed import read_texts
    from hcx.data.sources import SourceError, expand

    docs, total = [], 0
    for spec in paths:
        try:
            files = expand(spec)
        except SourceError as e:
            raise ExtensionError(f"--corpus {spec}: {e}") from None
        for file in files:
            for text in read_texts(file, text_field):
                text = normalize(text)
                if text.strip():
                    docs.append(text)
                    total += len(text)
                if total >= sample_chars:
                    log(f"corpus: {len(docs):,} documents, {total:,} characters (the first "
                        f"{sample_chars:,})")
                    return docs
    if not docs:
        raise ExtensionError(f"--corpus {' '.join(paths)}: no text")
    log(f"corpus: {len(docs):,} documents, {total:,} characters")
    return docs


# --- learning merges over base tokens ----------------------------------------------------


def _unit_char(i: int) -> str:
    if i >= 2 * UNITS_PER_PLANE:
        raise ExtensionError("more than 131,068 distinct base tokens in Korean words")
    return chr((0xF0000 if i < UNITS_PER_PLANE else 0x100000) + i % UNITS_PER_PLANE)


def learn_merges(runs: Counter, count: int) -> list[tuple[str, str]]:
    """Up to ``count`` BPE merges over ``runs`` (a Counter of tuples of unit strings),
    most frequent pair first, as ``(left, right)`` strings (each a unit or an earlier
    merge's result). Pairs seen fewer than twice are never merged."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    units = sorted({u for run in runs for u in run})
    char_of = {u: _unit_char(i) for i, u in enumerate(units)}
    text_of = {c: u for u, c in char_of.items()}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=len(units) + count, min_frequency=2,
                                  show_progress=False, special_tokens=[])

    def lines() -> Iterator[str]:
        chunk: list[str] = []
        for run, n in runs.items():
            if len(run) < 2:
                continue
            word = "".join(char_of[u] for u in run)
            chunk.extend([word] * n)
            if len(chunk) >= 4096:
                yield " ".join(chunk)
                chunk = []
        if chunk:
            yield " ".join(chunk)

    tok.train_from_iterator(lines(), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    out = []
    for m in merges:
        left, right = m.split(" ") if isinstance(m, str) else m
        out.append(("".join(text_of[c] for c in left), "".join(text_of[c] for c in right)))
    return out


# --- the two kinds of base tokenizer ------------------------------------------------------


@dataclass
class Extension:
    """What :func:`extend` learned, before it is written."""

    base_vocab_size: int  # ids below this are the base's, unchanged
    pieces: list[str] = field(default_factory=list)  # new pieces in id order
    merges: list[tuple[str, str]] = field(default_factory=list)  # byte-level: appended merges
    characters: int = 0  # single-character pieces among ``pieces`` (SentencePiece)

    def first(self, n: int) -> "Extension":
        """The extension learning ``n`` pieces would give: BPE merges are learned greedily
        in order, so a shorter run is a prefix of a longer one."""
        merges, wanted = [], set(self.pieces[:n])
        for left, right in self.merges:
            if not wanted:
                break
            merges.append((left, right))
            wanted.discard(left + right)
        return Extension(self.base_vocab_size, self.pieces[:n], merges, min(self.characters, n))


class SentencePieceBase:
    """A SentencePiece BPE model file."""

    kind = "SentencePiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        from hcx.tokenizer.hf import BPE, BYTE, read_model_proto

        self.path = path
        self.proto = read_model_proto(path)
        if self.proto.trainer_spec.model_type != BPE:
            raise ExtensionError(f"{path}: a unigram SentencePiece model; only BPE models "
                                 "can be extended without changing how old text encodes")
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto.SerializeToString())
        self.pieces = [p.piece for p in self.proto.pieces]
        self.is_byte = [p.type == BYTE for p in self.proto.pieces]
        self.vocab = {p: i for i, p in enumerate(self.pieces)}
        self.vocab_size = len(self.pieces)

    def units(self, ids: list[int]) -> list[tuple[str, bool]]:
        """(text, known) per unit: a piece, or a character spelled with byte pieces."""
        out, pending = [], b""
        for i in ids:
            if self.is_byte[i]:
                pending += bytes([int(self.pieces[i][3:5], 16)])
                try:
                    out.append((pending.decode("utf-8"), False))
                    pending = b""
                except UnicodeDecodeError:
                    pending = b"" if len(pending) >= 4 else pending
                continue
            pending = b""
            out.append((self.pieces[i], True))
        return out

    def korean_runs(self, docs: list[str]) -> tuple[Counter, Counter, int]:
        """Runs of Korean units inside words (a Counter of tuples of ``(text, known)``),
        the byte-spelled Korean characters with their counts, and the number of Hangul
        characters in the runs. A unit is Korean when it is Hangul after its ``▁``; a
        bare ``▁`` may start a run; a unit starting with ``▁`` starts a new run."""
        runs, unknown, hangul = Counter(), Counter(), 0
        for ids in self.sp.encode(docs, num_threads=os.cpu_count() or 1):
            run: list[tuple[str, bool]] = []
            for text, known in self.units(ids) + [("\n", True)]:
                starts_word = text.startswith(SPACE)
                korean = text == SPACE or is_korean(text.lstrip(SPACE))
                if run and (starts_word or not korean):
                    runs[tuple(run)] += 1
                    run = []
                if korean:
                    run.append((text, known))
                    hangul += len(text.lstrip(SPACE))
                    if not known:
                        unknown[text] += 1
        return runs, unknown, hangul

    def learn(self, docs: list[str], count: int, log=print) -> Extension:
        runs, unknown, hangul = self.korean_runs(docs)
        hangul = max(hangul, 1)
        ext = Extension(self.vocab_size)
        # Characters first (as SentencePiece's trainer keeps its alphabet): the most
        # frequent unknown Hangul characters until the coverage is reached.
        missing = sum(unknown.values())
        for char, n in unknown.most_common():
            if (hangul - missing) / hangul >= CHARACTER_COVERAGE or len(ext.pieces) >= count:
                break
            ext.pieces.append(char)
            missing -= n
        ext.characters = len(ext.pieces)
        added = set(ext.pieces)
        log(f"learning: {ext.characters:,} Korean characters the base spells in bytes; "
            f"{missing:,} of {hangul:,} Hangul occurrences stay byte-spelled")
        # Runs are cut at characters that stay unknown: no piece can hold them.
        units: Counter = Counter()
        for run, n in runs.items():
            part: list[str] = []
            for text, known in run + ((None, False),):
                if text is not None and (known or text in added):
                    part.append(text)
                    continue
                if len(part) > 1:
                    units[tuple(part)] += n
                part = []
        for left, right in learn_merges(units, count - len(ext.pieces)):
            piece = left + right
            if piece not in self.vocab and piece not in added:
                ext.pieces.append(piece)
                added.add(piece)
        return ext

    def write(self, ext: Extension, out: Path) -> None:
        """``tokenizer.model`` with the pieces appended (scores below every old piece's),
        and its Hugging Face twin."""
        import numpy as np

        from hcx.tokenizer.hf import NORMAL

        proto = type(self.proto)()
        proto.CopyFrom(self.proto)
        score = np.float32(min(p.score for p in proto.pieces if p.type == NORMAL))
        for piece in ext.pieces:
            lower = np.float32(score - np.float32(1))
            score = lower if lower < score else np.nextafter(score, np.float32(-np.inf))
            new = proto.pieces.add()
            new.piece, new.score, new.type = piece, float(score), NORMAL
        proto.trainer_spec.vocab_size = len(proto.pieces)
        (out / "tokenizer.model").write_bytes(proto.SerializeToString())
        write_twin(out / "tokenizer.model", out, self.path.parent)


class ByteLevelBase:
    """A Hugging Face ``tokenizer.json`` (or ``.json.xz``) with a byte-level BPE model."""

    kind = "HF tokenizer.json"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        raw = lzma.decompress(path.read_bytes()).decode("utf-8") if path.name.endswith(".xz") \
            else path.read_text(encoding="utf-8")
        self.data = json.loads(raw)
        model = self.data.get("model", {})
        if model.get("type") != "BPE" or not _is_byte_level(self.data):
            raise ExtensionError(f"{path}: not a byte-level BPE tokenizer.json (model "
                                 f"{model.get('type')!r}); hcx extends byte-level BPE "
                                 "tokenizer.json files and SentencePiece BPE .model files")
        self.tok = Tokenizer.from_str(raw)
        self.vocab = model["vocab"]
        ids = list(self.vocab.values()) + [t["id"] for t in self.data.get("added_tokens", [])]
        self.vocab_size = max(ids) + 1

    def korean_runs(self, docs: list[str]) -> Counter:
        """The base tokens of each pre-tokenized word that is Hangul after an optional
        leading space (a Counter of tuples of token strings)."""
        runs: Counter = Counter()
        for start in range(0, len(docs), 256):
            batch = docs[start:start + 256]
            for text, enc in zip(batch, self.tok.encode_batch(batch, add_special_tokens=False)):
                words: dict[int, list] = {}
                for token, w, (a, b) in zip(enc.tokens, enc.word_ids, enc.offsets):
                    entry = words.setdefault(w, [[], a, b])
                    entry[0].append(token)
                    entry[2] = b
                for tokens, a, b in words.values():
                    span = text[a:b]
                    if len(tokens) > 1 and is_korean(span[1:] if span[:1] == " " else span):
                        runs[tuple(tokens)] += 1
        return runs

    def learn(self, docs: list[str], count: int, log=print) -> Extension:
        runs = self.korean_runs(docs)
        ext = Extension(self.vocab_size)
        # A learned pair may concatenate to a token the base already has (the base
        # reached it through another split): its merge is kept (that Korean word then
        # encodes in fewer tokens) but adds no id. Learn a little more to make up.
        want = count
        for _ in range(4):
            merges = learn_merges(runs, want)
            ext.pieces, ext.merges = [], []
            new: set[str] = set()
            for left, right in merges:
                piece = left + right
                if len(ext.pieces) == count:
                    break
                ext.merges.append((left, right))
                if piece not in self.vocab and piece not in new:
                    ext.pieces.append(piece)
                    new.add(piece)
            if len(ext.pieces) == count or len(merges) < want:
                break
            want = int(want * 1.2) + (count - len(ext.pieces)) * 2
        return ext

    def write(self, ext: Extension, out: Path) -> None:
        data = json.loads(json.dumps(self.data))
        model = data["model"]
        # tokenizers numbers added tokens from the size of the model's vocabulary when
        # loading; with new ids after them, they must be in that vocabulary too to keep
        # their ids (the model never produces them: no merge leads to them).
        for token in data.get("added_tokens", []):
            model["vocab"].setdefault(token["content"], token["id"])
        for i, piece in enumerate(ext.pieces):
            model["vocab"][piece] = self.vocab_size + i
        as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
        model["merges"] += [f"{a} {b}" if as_strings else [a, b] for a, b in ext.merges]
        (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False),
                                            encoding="utf-8")
        _copy_configs(self.path.parent, out, skip=("tokenizer.json", "tokenizer.json.xz",
                                                   "tokenizer.model", "vocab.json",
                                                   "merges.txt"))


def _is_byte_level(data: dict) -> bool:
    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(data.get("pre_tokenizer")) and has(data.get("decoder"))


# The tokenizer files beside a base that stay valid after appending (they name tokens
# by string or by their unchanged ids).
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "chat_template.jinja", "generation_config.json")


def _copy_configs(src: Path, out: Path, skip=()) -> list[str]:
    copied = []
    for name in CONFIG_FILES:
        if name not in skip and (src / name).is_file():
            shutil.copy(src / name, out / name)
            copied.append(name)
    return copied


def write_twin(model: Path, out: Path, src: Path) -> None:
    """The HF twin of an extended SentencePiece model, with the base's config files (or,
    for a bare ``.model``, a tokenizer_config.json naming its special pieces)."""
    from hcx.tokenizer.hf import build_tokenizer, read_model_proto

    build_tokenizer(model).save(str(out / "tokenizer.json"))
    if _copy_configs(src, out):
        return
    spec = read_model_proto(model).trainer_spec
    pieces = read_model_proto(model).pieces
    named = {key: pieces[i].piece for key, i in (("unk_token", spec.unk_id),
                                                  ("bos_token", spec.bos_id),
                                                  ("eos_token", spec.eos_id),
                                                  ("pad_token", spec.pad_id))
             if 0 <= i < len(pieces)}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **named, "add_bos_token": False,
         "add_eos_token": False, "clean_up_tokenization_spaces": False}, indent=2,
        ensure_ascii=False) + "\n")


# --- the command ----------------------------------------------------------------------------


def open_base(spec: str):
    """The base tokenizer: a SentencePiece ``.model``, a ``tokenizer.json(.xz)``, or a
    directory holding one."""
    from hcx.paths import resolve

    from hcx.tokenizer.loading import is_tiktoken_ranks

    path = resolve(spec)
    if path.is_dir():
        # SentencePiece first: a directory with both (Mistral's, hcx's own) is defined
        # by its .model, and its tokenizer.json is a conversion of it.
        names = [n for n in ("tokenizer.model", "spiece.model")
                 if (path / n).is_file() and not is_tiktoken_ranks(path / n)]
        names += [n for n in ("tokenizer.json", "tokenizer.json.xz") if (path / n).is_file()]
        if not names:
            raise ExtensionError(f"{spec}: no SentencePiece tokenizer.model or tokenizer.json "
                                 f"in {path}")
        path = path / names[0]
    if not path.is_file():
        raise ExtensionError(f"{spec}: {path} does not exist")
    if path.name.endswith((".json", ".json.xz")):
        return ByteLevelBase(path)
    if path.suffix == ".tiktoken" or is_tiktoken_ranks(path):
        raise ExtensionError(f"{path}: a tiktoken rank file; convert it to a tokenizer.json "
                             "first (transformers' TikTokenConverter, as Llama 3's Hugging "
                             "Face directories ship it), then extend that")
    return SentencePieceBase(path)


def token_string(tok, i: int) -> str | None:
    """The piece or token string of id ``i`` (SentencePiece or ``tokenizers``)."""
    return tok.sp.id_to_piece(i) if hasattr(tok, "sp") else tok.tok.id_to_token(i)


def check(base_path: Path, out: Path, base_vocab: int, docs: list[str]) -> dict:
    """Old ids keep their pieces, non-Korean text encodes as before, and (SentencePiece)
    the twin encodes like the model. Returns figures for ``extension.json``."""
    from hcx.data.tokenizer_train import parity_mismatches
    from hcx.tokenizer.loading import open_tokenizer

    written = out / ("tokenizer.model" if (out / "tokenizer.model").exists() else "tokenizer.json")
    base, new = open_tokenizer(str(base_path)), open_tokenizer(str(written))
    for i in range(base_vocab):
        if token_string(base, i) != token_string(new, i):
            raise ExtensionError(f"{written}: id {i} is {token_string(new, i)!r}, in the base "
                                 f"{token_string(base, i)!r}")
    for text in UNCHANGED_SAMPLES:
        if base.encode(text) != new.encode(text):
            raise ExtensionError(f"{written}: encodes {text[:40]!r} differently from the base")
    lines = [line for doc in docs[:400] for line in doc.splitlines() if line.strip()][:2000]
    report = {"checked_lines": len(lines)}
    if (out / "tokenizer.model").exists():
        mismatches = parity_mismatches(new, open_tokenizer(str(out / "tokenizer.json")), lines)
        report["parity_mismatches"] = len(mismatches)
        if mismatches:
            raise ExtensionError(f"{out / 'tokenizer.json'} differs from tokenizer.model on "
                                 f"{len(mismatches)} of {len(lines)} lines, e.g. "
                                 f"{mismatches[0][:80]!r}")
    before = sum(len(base.encode(t)) for t in lines)
    ids = [i for t in lines for i in new.encode(t)]
    report.update(sample_tokens_before=before, sample_tokens_after=len(ids),
                  sample_new_token_share=round(sum(i >= base_vocab for i in ids) / max(len(ids), 1), 4))
    for text in lines[:200]:
        if new.decode(new.encode(text)) != base.decode(base.encode(text)):
            raise ExtensionError(f"{written}: {text[:40]!r} does not decode back")
    return report


def extend(base_spec: str, corpus: list[str], add: int, out: Path | None = None,
           text_field: str = "text", sample_chars: int = 20_000_000, log=print) -> Path:
    """Learn ``add`` pieces on ``corpus`` and write the extended tokenizer to ``out``
    (default: ``<base folder>-ko<add>`` in the current directory), atomically."""
    if add <= 0:
        raise ExtensionError(f"--add must be positive, got {add}")
    t0 = time.time()
    base = open_base(base_spec)
    out = Path(out) if out else Path(f"{base.path.parent.name}-ko{add}")
    refuse_to_replace(out)
    docs = read_corpus(corpus, text_field, sample_chars, log)
    log(f"learning {add:,} pieces on top of {base.path} ({base.kind}, {base.vocab_size:,} ids)")
    ext = base.learn(docs, add, log)
    if len(ext.pieces) < add:
        log(f"warning: the corpus gave only {len(ext.pieces):,} new pieces (pairs seen twice "
            "or more ran out); use more Korean text for more")
    return write_extension(base, ext, out, docs, {"corpus": corpus}, time.time() - t0, log)


def refuse_to_replace(out: Path) -> None:
    if out.exists() and not (out / "extension.json").exists() and any(out.iterdir()):
        raise ExtensionError(f"{out} exists and is not an extended tokenizer (no "
                             "extension.json): choose a new directory")


def write_extension(base, ext: Extension, out: Path, docs: list[str], record: dict,
                    seconds: float, log=print) -> Path:
    """Write and check ``ext`` into ``out`` (replacing an earlier extension there); the
    directory appears complete or not at all."""
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        base.write(ext, tmp)
        report = check(base.path, tmp, base.vocab_size, docs)
        summary = {
            "base": str(base.path), "base_kind": base.kind,
            "base_vocab_size": base.vocab_size,
            "vocab_size": base.vocab_size + len(ext.pieces),
            "added": len(ext.pieces), "added_characters": ext.characters,
            "appended_merges": len(ext.merges) or None,
            **record, "corpus_characters": sum(map(len, docs)),
            "seconds": round(seconds + time.time() - t0, 1), **report,
        }
        (tmp / "extension.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        for p in tmp.iterdir():
            p.chmod(0o644)
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out}: {summary['vocab_size']:,} ids ({len(ext.pieces):,} new from id "
        f"{base.vocab_size:,}); sample tokens {report['sample_tokens_before']:,} -> "
        f"{report['sample_tokens_after']:,} in {summary['seconds']:.0f} s")
    return out


def read_extension(path: Path) -> dict | None:
    """``extension.json`` of an extended tokenizer directory (or of a file's directory)."""
    path = Path(path)
    meta = (path if path.is_dir() else path.parent) / "extension.json"
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None

