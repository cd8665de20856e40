"""Supervised fine-tuning data: chat conversations as training sequences.

A conversation (``messages``: system/user/assistant turns) is rendered with the one
chat layout (:func:`hcx.tokenizer.chat.render_chat`): role markers and end-of-turn markers are
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
from os import PathLike
from functools import partial

import numpy as np
import torch

from hcx.data.sources import (BadRecord, SourceError, iter_records, parse_object,
                              raw_source_errors, read_sources, source_records)
from hcx.engine.batches import EpochOrder
from hcx.engine.parallel import device
from hcx.engine.stage import Stage
from hcx.errors import HcxError
from hcx.stages.pretrain import lm_loss
from hcx.tokenizer.chat import ChatError, render_chat


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


def read_conversations(records, field_name: str = "messages", skip_bad: bool = False,
                       stats: SFTStats | None = None) -> list[list[dict]]:
    """Every conversation among ``records`` (:func:`hcx.data.sources.source_records`, or
    a file path)."""
    if isinstance(records, (str, PathLike)):
        records = iter_records(str(records))
    out = []
    for record in records:
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


# --- the stage: a dataset of rows and a task for the shared training loop -----------------


class SFTDataset:
    """Rows visited epoch after epoch, each epoch in its own seeded order. Index ``i``
    is the ``i``-th row the run sees (the training loop's data position)."""

    def __init__(self, rows: list[Sequence], seed: int, packing: bool, group: int):
        self.rows = rows
        lengths = None if packing else [int((r.segments >= 0).sum()) for r in rows]
        self.order = EpochOrder(len(rows), seed, lengths, 0 if packing else group)

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return to_sample(self.rows[self.order(i)])


class SFTTask:
    """Next-token loss on the assistant's tokens; packed rows attend within their
    conversation only (unpacked rows are right-padded, which causal attention already
    keeps out of every real token's view)."""

    def __init__(self, engine, dataset: SFTDataset, packing: bool):
        self.engine, self.dataset, self.packing = engine, dataset, packing
        self.rows_per_microbatch = engine.recipe.train.micro_batch_size

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for positions in self.engine.microbatch_positions(step):
            items = [self.dataset.sample(i) for i in positions]
            out.append({key: torch.stack([it[key] for it in items]) for key in items[0]})
        return out

    def forward_step(self, model, batch):
        dev = device()
        tokens = batch["tokens"].to(dev)
        s = tokens.shape[1]
        mask = attention_mask(batch["segments"]).to(dev) if self.packing else None
        position_ids = torch.arange(s, device=dev).unsqueeze(0).expand_as(tokens)
        output = model(tokens, position_ids, mask, labels=batch["labels"].to(dev))
        return output, partial(lm_loss, batch["loss_mask"].to(dev))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_rows(recipe, tokenizer, log) -> tuple[list[Sequence], SFTStats]:
    """Read, render and pack every source (sources repeat by their weight: 2.0 = twice
    per epoch, 0.5 = a seeded half)."""
    stats = SFTStats()
    cfg = recipe.sft

    def read(source) -> list[Example]:
        convs = read_conversations(source_records(source), cfg.messages_field, cfg.skip_bad,
                                   stats)
        return [tokenize(c, tokenizer, source.name) for c in convs]

    try:
        examples = read_sources(recipe.data.sources, read, recipe.train.seed,
                                "conversations", lambda m: log(f"sft: {m}"))
    except SourceError as e:
        raise SFTDataError(str(e)) from None
    rows = build_sequences(examples, recipe.data.seq_length, tokenizer.pad, cfg.packing, stats)
    if not rows:
        raise SFTDataError(f"no conversation fits data.seq_length={recipe.data.seq_length} "
                           f"({stats.summary()})")
    log(f"sft: {stats.summary()}")
    return rows, stats


class SFTStage(Stage):
    """``hcx sft``: fine-tune (usually from ``checkpoint.init_from``) on conversations."""

    name = "sft"
    section = "sft"

    def rules(self, recipe):
        problems = raw_source_errors(recipe.data.sources, "SFT conversations")
        if recipe.data.eval_every:
            problems.append(("data.eval_every", "hcx sft has no validation pass yet; set "
                             "data.eval_every=0"))
        return problems

    def read(self, recipe, tokenizer, log):
        return load_rows(recipe, tokenizer, log)[0]

    def tasks(self, engine, tokenizer, rows):
        r = engine.recipe
        dataset = SFTDataset(rows, r.train.seed, r.sft.packing, r.train.global_batch_size)
        return SFTTask(engine, dataset, r.sft.packing), None
