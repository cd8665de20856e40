"""Tokenizer efficiency ("fertility") across tokenizer formats, side by side.

For each tokenizer and each labelled text set (e.g. ``ko=...``, ``en=...``,
``code=...``): tokens per word (a whitespace-separated word; for Korean an
eojeol), tokens per character (non-whitespace characters) and UTF-8 bytes per token.
Lower tokens/word means cheaper text; HyperCLOVA X's report (Table 1) compares
tokenizers exactly this way on Korean and English.

Formats read, all from local files (nothing is downloaded):
- ``bytes``: hcx's UTF-8 byte tokenizer (one token per byte; a baseline);
- SentencePiece ``.model`` files;
- Hugging Face ``tokenizer.json`` (also ``.json.xz``), or a directory holding one;
- GPT-2 style byte-level BPE: a directory with ``vocab.json`` + ``merges.txt`` or
  ``encoder.json`` + ``vocab.bpe``;
- tiktoken rank files (``*.tiktoken``, or a ``tokenizer.model`` in that format as
  Llama 3/4 ship), split with tiktoken's own cl100k or o200k pattern (o200k for
  o200k-named files and vocabularies of 199,998+ ranks, cl100k otherwise).
"""

from __future__ import annotations

import base64
import json
import lzma
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from hcx.errors import HcxError


class TokenizerLoadError(HcxError, ValueError):
    pass


@dataclass
class LoadedTokenizer:
    name: str
    kind: str
    vocab_size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


# --- loaders -----------------------------------------------------------------------


def _is_tiktoken_ranks(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = f.readline().split()
        return len(first) == 2 and first[1].isdigit() and bool(base64.b64decode(first[0], validate=True))
    except (OSError, ValueError):
        return False


def _tiktoken(path: Path, name: str) -> LoadedTokenizer:
    import tiktoken
    import tiktoken.load
    import tiktoken_ext.openai_public as openai_public

    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    style = "o200k_base" if ("o200k" in path.name or len(ranks) >= 199_998) else "cl100k_base"
    # tiktoken's constructors hold the official split patterns; give them the local file.
    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda *args, **kwargs: ranks
    try:
        spec = getattr(openai_public, style)()
    finally:
        openai_public.load_tiktoken_bpe = original
    enc = tiktoken.Encoding(name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                            special_tokens={})
    return LoadedTokenizer(name, f"tiktoken ({style} split)", len(ranks),
                           lambda text: enc.encode_ordinary(text), enc.decode)


def _hf_json(text: str, name: str) -> LoadedTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(text)
    return LoadedTokenizer(name, "HF tokenizer.json", tok.get_vocab_size(with_added_tokens=True),
                           lambda t: tok.encode(t, add_special_tokens=False).ids,
                           lambda ids: tok.decode(ids, skip_special_tokens=False))


def _byte_level_bpe(vocab: Path, merges: Path, name: str) -> LoadedTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return LoadedTokenizer(name, "byte-level BPE (vocab + merges)", tok.get_vocab_size(),
                           lambda t: tok.encode(t, add_special_tokens=False).ids, tok.decode)


def _sentencepiece(path: Path, name: str) -> LoadedTokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return LoadedTokenizer(name, "SentencePiece", sp.get_piece_size(), lambda t: sp.encode(t),
                           lambda ids: sp.decode(ids))


def load(spec: str) -> LoadedTokenizer:
    """A tokenizer from a path (file or directory) or ``bytes``. ``NAME=PATH`` names it."""
    name, _, target = spec.rpartition("=") if "=" in spec else ("", "", spec)
    if target == "bytes":
        from hcx.tokenization import ByteTokenizer

        bt = ByteTokenizer()
        return LoadedTokenizer(name or "bytes", "UTF-8 bytes", bt.vocab_size, bt.encode, bt.decode)
    path = Path(target)
    generic = path.name.startswith(("tokenizer.", "spiece.")) or path.is_dir()
    name = name or (path.name if path.is_dir() else path.parent.name if generic
                    else path.name.split(".")[0])
    if not path.exists():
        raise TokenizerLoadError(f"tokenizer {spec!r}: {path} does not exist")
    if path.is_dir():
        for candidate in ("tokenizer.json", "tokenizer.json.xz"):
            if (path / candidate).exists():
                return load(f"{name}={path / candidate}")
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab).exists() and (path / merges).exists():
                return _byte_level_bpe(path / vocab, path / merges, name)
        for candidate in ("tokenizer.model", "spiece.model"):
            if (path / candidate).exists():
                return load(f"{name}={path / candidate}")
        models = sorted(path.glob("*.model")) + sorted(path.glob("*.tiktoken"))
        if models:
            return load(f"{name}={models[0]}")
        raise TokenizerLoadError(f"tokenizer {spec!r}: no tokenizer.json, vocab.json+merges.txt, "
                                 f"encoder.json+vocab.bpe, *.model or *.tiktoken in {path}")
    try:
        if path.name.endswith(".json.xz"):
            return _hf_json(lzma.decompress(path.read_bytes()).decode("utf-8"), name)
        if path.suffix == ".json":
            return _hf_json(path.read_text(encoding="utf-8"), name)
        if path.suffix == ".tiktoken" or _is_tiktoken_ranks(path):
            return _tiktoken(path, name)
        return _sentencepiece(path, name)
    except TokenizerLoadError:
        raise
    except Exception as e:  # a library's parse error: say which file and what it was read as
        raise TokenizerLoadError(f"tokenizer {spec!r}: could not read {path}: {e}") from None


# --- measuring ---------------------------------------------------------------------


@dataclass
class Fertility:
    tokenizer: str
    label: str
    documents: int
    words: int
    chars: int
    bytes: int
    tokens: int

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / max(self.words, 1)

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / max(self.chars, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_word": self.tokens_per_word,
                "tokens_per_char": self.tokens_per_char, "bytes_per_token": self.bytes_per_token}


def measure(tok: LoadedTokenizer, label: str, texts: list[str]) -> Fertility:
    words = sum(len(t.split()) for t in texts)
    chars = sum(sum(1 for c in t if not c.isspace()) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    tokens = sum(len(tok.encode(t)) for t in texts)
    return Fertility(tok.name, label, len(texts), words, chars, nbytes, tokens)


def read_labelled(spec: str, text_field: str = "text", limit: int | None = None) -> tuple[str, list[str]]:
    """``LABEL=PATH[#FIELD]``: JSONL (``FIELD``, default ``text_field``) or plain text (one
    document per blank-line block); ``limit`` caps the number of documents."""
    from hcx.data import read_texts

    if "=" not in spec:
        raise TokenizerLoadError(f"--text {spec!r}: expected LABEL=PATH[#FIELD], e.g. ko=korean.jsonl")
    label, path = spec.split("=", 1)
    if "#" in path:
        path, text_field = path.rsplit("#", 1)
    texts = []
    for text in read_texts(Path(path), text_field):
        texts.append(text)
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise TokenizerLoadError(f"--text {spec!r}: no documents in {path}")
    return label, texts


def markdown_table(rows: list[Fertility]) -> str:
    labels = list(dict.fromkeys(r.label for r in rows))
    names = list(dict.fromkeys(r.tokenizer for r in rows))
    by = {(r.tokenizer, r.label): r for r in rows}
    head = "| tokenizer | " + " | ".join(f"{l} tok/word | {l} tok/char | {l} bytes/tok" for l in labels) + " |"
    sep = "|---|" + "---:|" * (3 * len(labels))
    lines = [head, sep]
    for n in names:
        cells = []
        for l in labels:
            r = by[(n, l)]
            cells += [f"{r.tokens_per_word:.3f}", f"{r.tokens_per_char:.3f}", f"{r.bytes_per_token:.2f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
