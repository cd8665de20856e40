"""``hcx import HF_DIR OUT --tokenizer EXTENDED``: a model's embedding and output layer
grown to an extended tokenizer (``hcx tokenizer extend``).

The extended tokenizer must keep every id of the model's own tokenizer (checked: each
old id's token string, else the import stops naming the file and the first id that
differs). The vocabulary becomes the larger of ``config.json``'s ``vocab_size`` and the
extended tokenizer's size (a model whose matrix already has spare rows, as Qwen's, reuses
them for new ids), and each new row is initialised by ``--new-rows``:

- ``mean`` (default): the mean of the base rows of the pieces the *base* tokenizer splits
  the new token into, in the input embedding and in the output layer alike (a new
  ``"▁안녕하세요"`` starts as the average of ``"▁안녕"`` and ``"하세요"``). The model's first
  reading of a new token is then close to its reading of the old pieces, and the new
  token's logit starts near theirs, rather than at an arbitrary value that the softmax
  punishes or favours (Hewitt 2021, "Initializing new word embeddings for pretrained
  language models"; EEVE's "subword initialization", arXiv:2402.14714, also starts new
  rows from their pieces);
- ``random``: normal with mean 0 and the standard deviation of the matrix's old rows
  (what training from scratch would give them), seeded.

The base segmentation of a new token is exact for both kinds hcx extends: for a byte-level
BPE ``tokenizer.json`` the base BPE model runs on the token's bytes; for SentencePiece the
base model encodes the piece's text without a dummy prefix (a Korean character the base
spells in bytes becomes its byte pieces).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hcx.errors import HcxError

NEW_ROWS = ("mean", "random")


class VocabError(HcxError, ValueError):
    pass


def tokenizer_file(directory: Path) -> Path:
    """The file that defines a tokenizer directory's ids: ``tokenizer.model`` when present
    (SentencePiece, what hcx encodes with), else ``tokenizer.json``."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (directory / name).is_file():
            return directory / name
    raise VocabError(f"{directory}: no tokenizer.model or tokenizer.json")


def is_sentencepiece(path: Path) -> bool:
    """A SentencePiece model file (``tokenizer.model``, ``*.model.v1``, ...), not JSON."""
    return not path.name.endswith((".json", ".json.xz"))


def _strings(path: Path) -> list[str | None]:
    """Token string per id of a SentencePiece model or a tokenizer.json."""
    if is_sentencepiece(path):
        from hcx.tokenizer.hf import read_model_proto

        return [p.piece for p in read_model_proto(path).pieces]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    size = tok.get_vocab_size(with_added_tokens=True)
    return [tok.id_to_token(i) for i in range(size)]


@dataclass
class VocabExtension:
    """An extended tokenizer checked against a model's own."""

    base: Path  # the model's tokenizer file
    extended: Path  # the extended tokenizer's file
    directory: Path  # the extended tokenizer's directory (copied into the import)
    base_vocab_size: int  # ids below are the model's own
    tokenizer_vocab_size: int  # the extended tokenizer's
    vocab_size: int  # the imported model's (max of config.json's and the tokenizer's)

    def new_ids(self) -> range:
        return range(self.base_vocab_size, self.tokenizer_vocab_size)


def plan_extension(hf_dir: Path, config_vocab: int, extended: Path) -> VocabExtension:
    """Check that ``extended`` (a directory or a file in one) appends to the tokenizer of
    ``hf_dir`` and return the sizes. Errors name the file at fault."""
    extended = Path(extended).resolve()
    directory = extended if extended.is_dir() else extended.parent
    if not directory.exists():
        raise VocabError(f"--tokenizer {extended}: does not exist")
    ext_file = tokenizer_file(directory)
    base_file = hf_dir / ext_file.name
    if not base_file.is_file():
        base_file = tokenizer_file(hf_dir)
    if is_sentencepiece(base_file) != is_sentencepiece(ext_file):
        raise VocabError(f"--tokenizer {ext_file}: a {ext_file.name} but {hf_dir} has "
                         f"{base_file.name}; extend the model's own tokenizer "
                         f"('hcx tokenizer extend {hf_dir} ...')")
    old, new = _strings(base_file), _strings(ext_file)
    if len(new) <= len(old):
        raise VocabError(f"--tokenizer {ext_file}: {len(new):,} tokens, not more than the "
                         f"model's tokenizer {base_file} ({len(old):,}): not an extension of it")
    if len(old) > config_vocab:
        raise VocabError(f"{base_file}: {len(old):,} tokens but {hf_dir / 'config.json'} "
                         f"vocab_size is {config_vocab:,}")
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            raise VocabError(f"--tokenizer {ext_file}: id {i} is {b!r} but {a!r} in the "
                             f"model's tokenizer {base_file}: not an extension of it (make "
                             f"one with 'hcx tokenizer extend {hf_dir} --corpus ... --add N')")
    return VocabExtension(base_file, ext_file, directory, len(old), len(new),
                          max(config_vocab, len(new)))


def base_pieces(plan: VocabExtension) -> list[list[int]]:
    """For each new id, the base ids its token splits into with the base tokenizer."""
    strings = _strings(plan.extended)[plan.base_vocab_size:plan.tokenizer_vocab_size]
    if is_sentencepiece(plan.base):
        import sentencepiece as spm

        from hcx.tokenizer.hf import read_model_proto

        proto = read_model_proto(plan.base)
        proto.normalizer_spec.add_dummy_prefix = False  # the piece's own text, as it is
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return [sp.encode(s.replace("\u2581", " ")) for s in strings]
    from tokenizers import Tokenizer

    model = Tokenizer.from_file(str(plan.base)).model
    return [[t.id for t in model.tokenize(s)] for s in strings]


def init_rows(weight: torch.Tensor, plan: VocabExtension, pieces: list[list[int]],
              method: str, generator: torch.Generator) -> torch.Tensor:
    """``weight`` ([rows, hidden], the model's) grown to ``plan.vocab_size`` rows, the new
    ids' rows initialised by ``method``; other added rows (spare rows beyond the
    tokenizer) are zeros, as hcx's vocabulary padding."""
    if method not in NEW_ROWS:
        raise VocabError(f"--new-rows {method!r}: choose one of {', '.join(NEW_ROWS)}")
    out = weight.new_zeros(plan.vocab_size, weight.shape[1])
    out[:weight.shape[0]] = weight
    old = weight[:plan.base_vocab_size].float()
    new = plan.new_ids()
    if method == "mean":
        rows = torch.stack([old[ids].mean(0) if ids else old.mean(0) for ids in pieces])
    else:
        rows = torch.randn(len(new), weight.shape[1], generator=generator) * old.std()
    out[new.start:new.stop] = rows.to(weight.dtype)
    return out


def resize_hf_tensors(tensors: dict[str, torch.Tensor], plan: VocabExtension, method: str,
                      seed: int = 0, log=print) -> dict[str, torch.Tensor]:
    """HF Llama tensors with ``model.embed_tokens`` (and an untied ``lm_head``) grown to
    the extended vocabulary."""
    pieces = base_pieces(plan)
    generator = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in out:
            out[name] = init_rows(out[name], plan, pieces, method, generator)
    counts = [len(p) for p in pieces]
    log(f"import: {len(pieces):,} new token rows (ids {plan.base_vocab_size:,}.."
        f"{plan.tokenizer_vocab_size - 1:,}) initialised by {method}"
        + (f" of {sum(counts) / max(len(counts), 1):.2f} base pieces on average"
           if method == "mean" else "") + f"; vocabulary {plan.vocab_size:,}")
    return out


def extension_record(plan: VocabExtension, method: str) -> dict:
    """What the imported checkpoint records about the extension."""
    meta = plan.directory / "extension.json"
    return {"tokenizer": str(plan.directory), "base_vocab_size": plan.base_vocab_size,
            "vocab_size": plan.tokenizer_vocab_size, "new_rows": method,
            **({"extension": json.loads(meta.read_text(encoding="utf-8"))}
               if meta.is_file() else {})}
