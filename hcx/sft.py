"""Supervised fine-tuning data: chat conversations as training sequences.

A conversation (``messages``: system/user/assistant turns) is rendered with the one
chat layout (:func:`hcx.chat.render_chat`): role markers and end-of-turn markers are
inserted as ids, content is encoded as text, so a literal ``<|user|>`` typed by a user
stays text. The loss is on the assistant's tokens only (its content and its
``<|endofturn|>``, so the model learns to end its turn).

Sequences of ``seq_length + 1`` tokens are built in one of two ways:

- packed (default): conversations are placed one after another into each sequence
  (first fit, in order), and each carries a segment number; attention is
  block-diagonal (a token attends to earlier tokens of its own conversation only),
  and because RoPE is relative, each conversation sees the same positions as alone;
- unpacked: one conversation per sequence, right-padded, in batches of similar
  lengths (less padding).

A conversation longer than a sequence is dropped and counted (cutting it would train
on replies without their question or without an end of turn).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from hcx.chat import ChatError, render_chat
from hcx.errors import HcxError
from hcx.sources import BadRecord, iter_records, parse_object


class SFTDataError(HcxError, ValueError):
    pass


@dataclass
class Example:
    ids: list[int]
    assistant: list[bool]


@dataclass
class Sequence:
    """One training row of ``seq_length + 1`` tokens."""

    tokens: np.ndarray  # int64 [S + 1]
    assistant: np.ndarray  # bool [S + 1]: the token was written by an assistant
    segments: np.ndarray  # int32 [S + 1]: conversation number in the row, -1 = padding


@dataclass
class SFTStats:
    conversations: int = 0
    too_long: int = 0
    bad: Counter = field(default_factory=Counter)
    sequences: int = 0
    tokens: int = 0  # real (non-padding) tokens
    assistant_tokens: int = 0

    def summary(self) -> str:
        fill = self.tokens / max(1, self.sequences)
        return (f"{self.conversations:,} conversations -> {self.sequences:,} sequences "
                f"({fill:.0f} tokens each on average, {self.assistant_tokens:,} assistant "
                f"tokens trained on); dropped {self.too_long:,} longer than a sequence"
                + (f", {sum(self.bad.values()):,} bad ({dict(self.bad)})" if self.bad else ""))


def read_conversations(path: str, field_name: str = "messages", skip_bad: bool = False,
                       stats: SFTStats | None = None, **source) -> list[list[dict]]:
    """Every conversation of a source (JSONL/Parquet files or a Hub dataset)."""
    out = []
    for record in iter_records(path, **source):
        try:
            obj = parse_object(record)
            messages = obj.get(field_name)
            if not isinstance(messages, list) or not messages:
                raise BadRecord(record.where, "missing_field",
                                f"field {field_name!r} must be a non-empty list of messages")
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
                raise BadRecord(record.where, "no_assistant", "no assistant message to learn from")
        except BadRecord as e:
            if not skip_bad:
                raise SFTDataError(f"{e} (use skip_bad to count and skip bad records)") from None
            if stats is not None:
                stats.bad[e.reason] += 1
            continue
        out.append(messages)
    return out


def tokenize(messages: list[dict], tokenizer, where: str = "") -> Example:
    try:
        rendered = render_chat(messages, tokenizer)
    except ChatError as e:
        raise SFTDataError(f"{where}: {e}" if where else str(e)) from None
    return Example(rendered.ids, rendered.assistant)


def _row(parts: list[Example], length: int, pad: int) -> Sequence:
    tokens = np.full(length, pad, dtype=np.int64)
    assistant = np.zeros(length, dtype=bool)
    segments = np.full(length, -1, dtype=np.int32)
    at = 0
    for n, ex in enumerate(parts):
        tokens[at:at + len(ex.ids)] = ex.ids
        assistant[at:at + len(ex.ids)] = ex.assistant
        segments[at:at + len(ex.ids)] = n
        at += len(ex.ids)
    return Sequence(tokens, assistant, segments)


def build_sequences(examples: list[Example], seq_length: int, pad: int, packing: bool,
                    stats: SFTStats) -> list[Sequence]:
    """Training rows from tokenized conversations (see the module docstring)."""
    length = seq_length + 1
    kept = []
    for ex in examples:
        stats.conversations += 1
        if len(ex.ids) > length:
            stats.too_long += 1
        else:
            kept.append(ex)
    if packing:
        # First fit, in order: each conversation goes into the first row with room.
        rows: list[list[Example]] = []
        room: list[int] = []
        for ex in kept:
            for i, free in enumerate(room):
                if len(ex.ids) <= free:
                    rows[i].append(ex)
                    room[i] -= len(ex.ids)
                    break
            else:
                rows.append([ex])
                room.append(length - len(ex.ids))
    else:
        rows = [[ex] for ex in kept]
    out = [_row(parts, length, pad) for parts in rows]
    stats.sequences = len(out)
    stats.tokens = sum(int((s.segments >= 0).sum()) for s in out)
    stats.assistant_tokens = sum(int(s.assistant.sum()) for s in out)
    return out


def attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """megatron's boolean mask (True = masked) [batch, 1, S, S] for rows of
    ``segments`` [batch, S]: causal within a conversation, nothing across. A padding
    position sees only itself (a fully masked row would give NaNs)."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = segments.unsqueeze(2) == segments.unsqueeze(1)
    own = torch.eye(s, dtype=torch.bool)
    allowed = causal & ((same & (segments.unsqueeze(2) >= 0)) | own)
    return ~allowed.unsqueeze(1)


def to_sample(seq: Sequence) -> dict[str, torch.Tensor]:
    """Inputs, next-token labels and the loss mask (assistant tokens only, never across
    a conversation boundary or into padding) of one row."""
    tokens = torch.from_numpy(seq.tokens)
    segments = torch.from_numpy(seq.segments)
    assistant = torch.from_numpy(seq.assistant)
    same = (segments[1:] == segments[:-1]) & (segments[1:] >= 0)
    return {"tokens": tokens[:-1], "labels": tokens[1:],
            "loss_mask": (assistant[1:] & same).float(),
            "segments": segments[:-1]}


def epoch_order(n: int, epoch: int, seed: int, lengths: list[int] | None = None,
                group: int = 0) -> list[int]:
    """The order rows are visited in an epoch: shuffled with (seed, epoch). With
    ``lengths`` and ``group``, rows are first sorted into groups of ``group`` similar
    lengths and whole groups are shuffled (length-grouped batches)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    if lengths is None or group <= 1:
        rng.shuffle(order)
        return order
    rng.shuffle(order)  # break ties between equal lengths differently per epoch
    order.sort(key=lambda i: lengths[i])
    groups = [order[i:i + group] for i in range(0, n, group)]
    rng.shuffle(groups)
    return [i for g in groups for i in g]
