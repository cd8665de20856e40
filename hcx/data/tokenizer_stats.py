"""Tokenizer efficiency ("fertility") across tokenizer formats, side by side.

For each tokenizer and each labelled text set (e.g. ``ko=...``, ``en=...``,
``code=...``): tokens per word (a whitespace-separated word; for Korean an
eojeol), tokens per character (non-whitespace characters) and UTF-8 bytes per token.
Lower tokens/word means cheaper text; HyperCLOVA X's report (Table 1) compares
tokenizers exactly this way on Korean and English.

Tokenizers of every format hcx reads are opened by
:func:`hcx.tokenizer.loading.open_tokenizer`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hcx.tokenizer.loading import Tokenizer, TokenizerLoadError


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


def measure(tok: Tokenizer, label: str, texts: list[str]) -> Fertility:
    words = sum(len(t.split()) for t in texts)
    chars = sum(sum(1 for c in t if not c.isspace()) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    tokens = sum(len(tok.encode(t)) for t in texts)
    return Fertility(tok.name, label, len(texts), words, chars, nbytes, tokens)


def read_labelled(spec: str, text_field: str = "text", limit: int | None = None) -> tuple[str, list[str]]:
    """``LABEL=PATH[#FIELD]``: JSONL (``FIELD``, default ``text_field``) or plain text (one
    document per blank-line block); ``limit`` caps the number of documents."""
    from hcx.data.indexed import read_texts

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
