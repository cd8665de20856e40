"""A Hugging Face ``tokenizer.json`` that encodes and decodes exactly like an hcx
SentencePiece model.

Built directly from the model's protobuf with the ``tokenizers`` API, so it does not
depend on transformers' converter internals, which change between releases:

- BPE: SentencePiece merges, at encode time, any adjacent pair whose concatenation is
  a piece, highest score first, over the whole text. ``tokenizers``' BPE merges pairs
  from an explicit list by rank; the list here is every split of every piece into two
  pieces, ranked by the merged piece's score (its id), which gives the same result.
- Unigram: the pieces with their scores; both libraries take the Viterbi path.
- Byte fallback, the newline piece (an added, non-special token, as SentencePiece
  matches user-defined symbols before the model), and pad/unk/bos/eos plus the chat and
  FIM markers as special tokens with the same ids.
- Normalization: hcx models use SentencePiece's ``identity`` rule with whitespace
  escaped to U+2581 and no extra-whitespace removal; that is a single ``Replace``.

:func:`hcx.data.tokenizer_train.parity_mismatches` checks the result on real text at
training time, and the tests check it on Korean, English, code, emoji, mixed scripts
and whitespace runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from hcx.tokenizer import special_tokens as st
from hcx.errors import HcxError

SPACE = "\u2581"
# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


class ExportError(HcxError, ValueError):
    pass


def read_model_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def bpe_merges(pieces: list[tuple[str, int]], vocab: dict[str, int],
               scores: list[float] | None = None) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, ordered by that piece's
    score, highest first (SentencePiece merges the best-scored pair first), then by its
    id and the parts' ids. hcx's models score pieces in id order; Llama 2 and Mistral
    give their whitespace-run pieces (``▁▁``...) the lowest score whatever their id."""
    merges = []
    for piece, kind in pieces:
        if kind != NORMAL or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                rank = -scores[vocab[piece]] if scores is not None else 0.0
                merges.append((rank, vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def build_tokenizer(model_path: Path):
    """The ``tokenizers.Tokenizer`` equivalent of an hcx SentencePiece model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = read_model_proto(model_path)
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise ExportError(
            f"{model_path}: normalization {norm.name!r} (remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) is not one hcx trains; only 'identity' with "
            "whitespace kept can be exported exactly")
    pieces = [(p.piece, p.type) for p in proto.pieces]
    unk = next(p for p, kind in pieces if kind == UNKNOWN)
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        scores = [p.score for p in proto.pieces]
        model = models.BPE(vocab=vocab, merges=bpe_merges(pieces, vocab, scores), unk_token=unk,
                           byte_fallback=byte_fallback, fuse_unk=True)
    elif proto.trainer_spec.model_type == UNIGRAM:
        unk_id = next(i for i, (_, kind) in enumerate(pieces) if kind == UNKNOWN)
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=unk_id,
                               byte_fallback=byte_fallback)
    else:
        raise ExportError(f"{model_path}: model type {proto.trainer_spec.model_type} is "
                          "neither BPE nor unigram")
    tok = Tokenizer(model)
    steps = [normalizers.Replace(" ", SPACE)]
    if norm.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, kind in pieces if kind in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(p, special=False, normalized=False)
                    for p, kind in pieces if kind == USER_DEFINED])
    for i, (piece, _) in enumerate(pieces):  # same ids as SentencePiece, or fail loudly
        if tok.token_to_id(piece) != i:
            raise ExportError(f"{model_path}: piece {piece!r} got id {tok.token_to_id(piece)} "
                              f"instead of {i}")
    return tok


def write_hf_tokenizer(model_path: Path, out_dir: Path, model_max_length: int = 32768) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` for
    ``transformers.AutoTokenizer`` (no remote code), with the hcx chat template."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(model_path)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = {"bos_token": st.BOS, "eos_token": st.EOS, "unk_token": st.UNK, "pad_token": st.PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": st.CONTROL_SYMBOLS,
        # hcx adds no BOS/EOS when encoding text, and decoding must give the text back
        # exactly (no clean-up of spaces before punctuation).
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": st.CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {**specials, "additional_special_tokens": st.CONTROL_SYMBOLS}, indent=2) + "\n")
