"""Tokenizers: one loader for the engine, ``hcx data prepare``, ``hcx tokenize`` and
``hcx tokenizer stats``.

Every tokenizer has ``encode``/``decode``, ``vocab_size``, ``eod``/``pad`` (the
end-of-document id that separates documents in indexed datasets, and the padding id;
``eod`` is None for formats that carry no end-of-text token, which the engine refuses),
``fingerprint()`` (changes whenever the id mapping could: a cache key) and
``special_id(token)``.

Formats, all read from local files (nothing is downloaded):
- ``bytes``: UTF-8 bytes plus pad/eod/bos (no file; the floor in comparisons);
- SentencePiece ``.model`` files (hcx's own, ``hcx tokenizer train``);
- Hugging Face ``tokenizer.json`` (also ``.json.xz``), or a directory holding one,
  whose ``tokenizer_config.json`` (or ``special_tokens_map.json``) names the eos and
  pad tokens;
- GPT-2 style byte-level BPE: ``vocab.json`` + ``merges.txt`` or ``encoder.json`` +
  ``vocab.bpe`` in a directory;
- tiktoken rank files (``*.tiktoken``, or a ``tokenizer.model`` in that format as
  Llama 3/4 ship), split with tiktoken's own cl100k or o200k pattern (o200k for
  o200k-named files and vocabularies of 199,998+ ranks, cl100k otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hcx.config import TokenizerConfig
from hcx.errors import HcxError
from hcx.paths import resolve


class TokenizerLoadError(HcxError, ValueError):
    pass


class Tokenizer(Protocol):
    name: str
    kind: str
    vocab_size: int
    eod: int | None
    pad: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str:
        """Changes whenever the id mapping could change (cache key)."""
        ...

    def special_id(self, token: str) -> int | None:
        """The id of a special token such as ``<|fim_prefix|>``, or None if absent."""
        ...


def _files_digest(prefix: str, files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return f"{prefix}-{h.hexdigest()[:16]}"


@dataclass
class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; then pad, eod (= eos) and bos."""

    name: str = "bytes"
    kind: str = "UTF-8 bytes"
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

    def special_id(self, token: str) -> int | None:
        return {"<pad>": self.pad, "</s>": self.eod, "<s>": self.bos}.get(token)


class SentencePieceTokenizer:
    kind = "SentencePiece"

    def __init__(self, path: Path, name: str | None = None):
        import sentencepiece as spm

        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.name = name or (self.path.parent.name if self.path.name == "tokenizer.model"
                             else self.path.name.split(".")[0])
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        return _files_digest("spm", [self.path])

    def special_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None


class TokenizersTokenizer:
    """Anything the Hugging Face ``tokenizers`` library runs: a ``tokenizer.json`` or a
    byte-level BPE built from vocab + merges."""

    def __init__(self, tok, name: str, kind: str, files: list[Path],
                 eos_token: str | None = None, pad_token: str | None = None):
        self.tok, self.name, self.kind, self.files = tok, name, kind, files
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eod = tok.token_to_id(eos_token) if eos_token else None
        self.pad = tok.token_to_id(pad_token) if pad_token else self.eod

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        return _files_digest("hf", self.files)

    def special_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class TiktokenTokenizer:
    def __init__(self, path: Path, name: str):
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
        self.enc = tiktoken.Encoding(name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                                     special_tokens={})
        self.path, self.name, self.kind = path, name, f"tiktoken ({style} split)"
        self.vocab_size = len(ranks)
        self.eod = self.pad = None  # rank files carry no special tokens

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def fingerprint(self) -> str:
        return _files_digest("tiktoken", [self.path])

    def special_id(self, token: str) -> int | None:
        return None


# --- loading ------------------------------------------------------------------------


def is_tiktoken_ranks(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = f.readline().split()
        return len(first) == 2 and first[1].isdigit() and bool(base64.b64decode(first[0], validate=True))
    except (OSError, ValueError):
        return False


# Where transformers records the special tokens beside a tokenizer.json, in its order of
# precedence (older directories name them in special_tokens_map.json only).
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Every file open_tokenizer may read in a tokenizer directory (what a checkpoint copies:
# hcx.engine.checkpoint.tokenizer_bundle), and the extra ones transformers reads.
TOKENIZER_DIR_FILES = ("tokenizer.json", "tokenizer.json.xz", "vocab.json", "merges.txt",
                       "encoder.json", "vocab.bpe", "tokenizer.model", "spiece.model",
                       *SPECIAL_TOKEN_FILES, "added_tokens.json", "chat_template.jinja")


def tokenizer_files(config: TokenizerConfig) -> tuple[list[Path], str]:
    """The files that make up the recipe's tokenizer, and what ``data.tokenizer.path``
    names among them (a file's name; "" for a directory); none for ``bytes``."""
    if config.kind == "bytes" or not config.path:
        return [], ""
    path = resolve(config.path)
    if not path.exists():
        raise TokenizerLoadError(f"data.tokenizer: {config.path} does not exist")
    if path.is_dir():
        return [path / n for n in TOKENIZER_DIR_FILES if (path / n).is_file()], ""
    beside = [path.parent / n for n in SPECIAL_TOKEN_FILES
              if n != path.name and (path.parent / n).is_file()]
    return [path, *beside], path.name


def _special_names(directory: Path) -> tuple[str | None, str | None]:
    """eos and pad token strings from the files beside the tokenizer (the first that
    names each wins)."""
    eos = pad = None

    def text(value):
        return value.get("content") if isinstance(value, dict) else value

    for name in SPECIAL_TOKEN_FILES:
        if (directory / name).exists():
            data = json.loads((directory / name).read_text(encoding="utf-8"))
            eos = eos or text(data.get("eos_token"))
            pad = pad or text(data.get("pad_token"))
    return eos, pad


def _hf_json(path: Path, name: str) -> TokenizersTokenizer:
    from tokenizers import Tokenizer as HF

    raw = lzma.decompress(path.read_bytes()).decode("utf-8") if path.name.endswith(".xz") \
        else path.read_text(encoding="utf-8")
    eos, pad = _special_names(path.parent)
    files = [path] + [path.parent / f for f in SPECIAL_TOKEN_FILES if (path.parent / f).exists()]
    return TokenizersTokenizer(HF.from_str(raw), name, "HF tokenizer.json", files, eos, pad)


def _byte_level_bpe(vocab: Path, merges: Path, name: str) -> TokenizersTokenizer:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    tok = HF(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None
    return TokenizersTokenizer(tok, name, "byte-level BPE (vocab + merges)", [vocab, merges], eos)


def open_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a path (file or directory) or ``bytes``. ``NAME=PATH`` names it."""
    name, _, target = spec.rpartition("=") if "=" in spec else ("", "", spec)
    if target == "bytes":
        return ByteTokenizer(name=name or "bytes")
    path = resolve(target)
    generic = path.name.startswith(("tokenizer.", "spiece.")) or path.is_dir()
    name = name or (path.name if path.is_dir() else path.parent.name if generic
                    else path.name.split(".")[0])
    if not path.exists():
        raise TokenizerLoadError(f"tokenizer {spec!r}: {path} does not exist")
    if path.is_dir():
        for candidate in ("tokenizer.json", "tokenizer.json.xz"):
            if (path / candidate).exists():
                return open_tokenizer(f"{name}={path / candidate}")
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab).exists() and (path / merges).exists():
                return _byte_level_bpe(path / vocab, path / merges, name)
        for candidate in ("tokenizer.model", "spiece.model"):
            if (path / candidate).exists():
                return open_tokenizer(f"{name}={path / candidate}")
        models = sorted(path.glob("*.model")) + sorted(path.glob("*.tiktoken"))
        if models:
            return open_tokenizer(f"{name}={models[0]}")
        raise TokenizerLoadError(f"tokenizer {spec!r}: no tokenizer.json, vocab.json+merges.txt, "
                                 f"encoder.json+vocab.bpe, *.model or *.tiktoken in {path}")
    try:
        if path.name.endswith((".json", ".json.xz")):
            return _hf_json(path, name)
        if path.suffix == ".tiktoken" or is_tiktoken_ranks(path):
            return TiktokenTokenizer(path, name)
        return SentencePieceTokenizer(path, name)
    except TokenizerLoadError:
        raise
    except Exception as e:  # a library's parse error: say which file and what it was read as
        raise TokenizerLoadError(f"tokenizer {spec!r}: could not read {path}: {e}") from None


def load_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """The recipe's tokenizer; the engine needs an end-of-document id."""
    if config.kind == "bytes":
        return ByteTokenizer()
    tok = open_tokenizer(config.path)
    expected = {"sentencepiece": ("SentencePiece",), "hf": ("HF", "byte-level")}[config.kind]
    if not tok.kind.startswith(expected):
        raise TokenizerLoadError(f"data.tokenizer: {config.path} is a {tok.kind} tokenizer, "
                                 f"not kind {config.kind!r}")
    if tok.eod is None:
        raise TokenizerLoadError(f"data.tokenizer: {config.path} has no end-of-text token "
                                 "(eos), which separates documents in the datasets")
    return tok
