"""Tokenizers the engine can read text with.

The engine needs four things from a tokenizer: ``encode``, ``vocab_size`` and the
``eod``/``pad`` ids (megatron's GPTDataset appends nothing itself; documents are
separated by ``eod`` when they are written). The bilingual SentencePiece tokenizer
is built by ``hcx tokenizer train``; ``bytes`` needs no file and is what the tiny
CPU recipe uses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hcx.config import TokenizerConfig
from hcx.paths import resolve


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eod: int
    pad: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str:
        """Changes whenever the id mapping could change (cache key)."""
        ...


@dataclass
class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; then pad, eod (= eos) and bos."""

    name: str = "bytes"
    vocab_size: int = 259
    pad: int = 256
    eod: int = 257
    bos: int = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes-v1"


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.name = path.name
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id()
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod
        if self.eod < 0:
            raise ValueError(f"{path}: the SentencePiece model has no eos piece (needed as eod)")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        return "spm-" + hashlib.sha1(self.path.read_bytes()).hexdigest()[:16]


class HFTokenizer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.path = path
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.name = path.name
        self.vocab_size = len(self.tok)
        if self.tok.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer has no eos token (needed as eod)")
        self.eod = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eod

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for f in sorted(self.path.glob("*.json")):
            h.update(f.read_bytes())
        return "hf-" + h.hexdigest()[:16]


def load_tokenizer(config: TokenizerConfig) -> Tokenizer:
    if config.kind == "bytes":
        return ByteTokenizer()
    path = resolve(config.path)
    if not path.exists():
        raise FileNotFoundError(f"data.tokenizer.path: {path} does not exist")
    if config.kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
