"""Preference data for alignment: prompts with a chosen and a rejected completion
(paired), or with one completion and a thumbs-up/down label (unpaired).

Record formats (JSONL/Parquet/hf://, TRL's conversational formats):

- paired: ``{"prompt": [messages], "chosen": [assistant message], "rejected": [...]}``
- unpaired: ``{"prompt": [messages], "completion": [assistant message], "label": true}``

A prompt may also be a plain string (one user turn) and a completion a plain string (one
assistant turn). Unpaired methods (KTO, BCO) read paired records as two unpaired ones,
chosen = desirable and rejected = undesirable (TRL's ``unpair_preference_dataset``).

Each example becomes one or two token rows of the same prompt followed by a completion,
rendered with the one chat layout (:mod:`hcx.tokenizer.chat`); the loss covers the completion's
tokens only (its content and ``<|endofturn|>``). Rows longer than a sequence are cut as
TRL cuts them: the prompt loses its oldest tokens first (``max_prompt_length`` or what
the longest completion leaves), and only a completion that cannot fit beside a short
prompt is cut at its end. Both are counted.
"""

from __future__ import annotations

from os import PathLike

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from hcx.tokenizer.chat import ChatError, render_chat
from hcx.errors import HcxError
from hcx.data.sources import BadRecord, iter_records, parse_object

PAIRED_METHODS = ("dpo", "ipo", "orpo", "reward")
UNPAIRED_METHODS = ("kto", "bco")
MIN_PROMPT_TOKENS = 16  # below this, cut completions rather than the prompt


class PreferenceDataError(HcxError, ValueError):
    pass


@dataclass
class PreferenceExample:
    """One training example: a prompt and its completions as token ids.

    ``completions``: paired [chosen, rejected]; unpaired [completion] (KTO adds the
    mismatched completion for its reference point as a second one)."""

    prompt: list[int]
    completions: list[list[int]]
    desirable: bool = True
    udm_weight: float = 1.0  # BCO underlying-distribution matching (undesirable rows)
    prompt_text: str = ""  # for the UDM classifier and for logs


@dataclass
class PreferenceStats:
    records: int = 0
    examples: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    bad: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        return (f"{self.records:,} records -> {self.examples:,} examples; cut to fit: "
                f"{self.truncated_prompts:,} prompts, {self.truncated_completions:,} completions"
                + (f"; {sum(self.bad.values()):,} bad ({dict(self.bad)})" if self.bad else ""))


def _messages(value, role: str, where: str, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    raise BadRecord(where, "bad_field", f"field {name!r} must be a string or a non-empty "
                    "list of {role, content} messages")


def _completion(value, where: str, name: str) -> list[dict]:
    msgs = _messages(value, "assistant", where, name)
    if msgs[0].get("role") != "assistant":
        raise BadRecord(where, "bad_field", f"field {name!r} must start with an assistant "
                        f"message, not {msgs[0].get('role')!r}")
    return msgs


def parse_preference(obj: dict, where: str, unpaired: bool) -> list[tuple[list, list, bool]]:
    """``(prompt messages, completion messages, desirable)`` items of one record: a paired
    record gives one item with the completions [chosen, rejected] (or two unpaired items)."""
    if "prompt" not in obj:
        raise BadRecord(where, "missing_field", "no 'prompt' field")
    prompt = _messages(obj["prompt"], "user", where, "prompt")
    if "chosen" in obj or "rejected" in obj:
        if "chosen" not in obj or "rejected" not in obj:
            raise BadRecord(where, "missing_field", "a paired record needs both 'chosen' "
                            "and 'rejected'")
        chosen = _completion(obj["chosen"], where, "chosen")
        rejected = _completion(obj["rejected"], where, "rejected")
        if unpaired:
            return [(prompt, [chosen], True), (prompt, [rejected], False)]
        return [(prompt, [chosen, rejected], True)]
    if "completion" in obj:
        if not unpaired:
            raise BadRecord(where, "unpaired", "an unpaired record ('completion' + 'label') "
                            "cannot train a paired method (dpo, ipo, orpo, reward): use kto "
                            "or bco, or give 'chosen' and 'rejected'")
        label = obj.get("label")
        if not isinstance(label, bool):
            raise BadRecord(where, "bad_field", "field 'label' must be true or false")
        return [(prompt, [_completion(obj["completion"], where, "completion")], label)]
    raise BadRecord(where, "missing_field", "expected 'chosen' and 'rejected' (paired) or "
                    "'completion' and 'label' (unpaired)")


def encode(prompt: list[dict], completion: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Prompt ids (with the generation prompt ``<|assistant|>``) and completion ids: the
    rendering of prompt + completion, split where the completion's content starts."""
    head = render_chat(prompt, tokenizer, add_generation_prompt=True).ids
    full = render_chat(prompt + completion, tokenizer).ids
    if full[:len(head)] != head:  # the layout guarantees it; a changed layout must not pass
        raise ChatError("the rendered prompt is not a prefix of prompt + completion")
    return head, full[len(head):]


def fit(prompt: list[int], completions: list[list[int]], length: int,
        max_prompt_length: int | None, stats: PreferenceStats | None = None
        ) -> tuple[list[int], list[list[int]]]:
    """Cut a prompt (oldest tokens first) and, if still needed, the completions (at the
    end) so that prompt + each completion fits in ``length`` tokens. All completions
    share the prompt cut, so a pair compares answers to the same context."""
    keep = len(prompt) if max_prompt_length is None else min(len(prompt), max_prompt_length)
    room = length - max(len(c) for c in completions)
    if room < keep:
        keep = max(room, min(keep, MIN_PROMPT_TOKENS))
    if keep < len(prompt):
        prompt = prompt[len(prompt) - keep:]
        if stats is not None:
            stats.truncated_prompts += 1
    cut = [c[:length - len(prompt)] for c in completions]
    if stats is not None and any(len(a) != len(b) for a, b in zip(cut, completions)):
        stats.truncated_completions += 1
    return prompt, cut


def read_examples(records, tokenizer, method: str, length: int,
                  max_prompt_length: int | None = None, skip_bad: bool = False,
                  stats: PreferenceStats | None = None) -> list[PreferenceExample]:
    """Every example among ``records`` (one source's
    :func:`hcx.data.sources.source_records`, or a file path), tokenized and cut to
    ``length`` tokens per row."""
    if isinstance(records, (str, PathLike)):
        records = iter_records(str(records))
    stats = stats if stats is not None else PreferenceStats()
    unpaired = method in UNPAIRED_METHODS
    out = []
    for record in records:
        stats.records += 1
        try:
            items = parse_preference(parse_object(record), record.where, unpaired)
            encoded = []
            for prompt, completions, desirable in items:
                try:
                    pairs = [encode(prompt, c, tokenizer) for c in completions]
                except ChatError as e:
                    raise BadRecord(record.where, "bad_message", str(e)) from None
                encoded.append((pairs, desirable, prompt))
        except BadRecord as e:
            if not skip_bad:
                raise PreferenceDataError(f"{e} (use align.skip_bad to count and skip bad "
                                          "records)") from None
            stats.bad[e.reason] += 1
            continue
        for pairs, desirable, prompt in encoded:
            ids, completions = fit(pairs[0][0], [c for _, c in pairs], length,
                                   max_prompt_length, stats)
            text = "\n".join(str(m.get("content", "")) for m in prompt)
            out.append(PreferenceExample(ids, completions, desirable, prompt_text=text))
            stats.examples += 1
    return out


def add_kl_completions(examples: list[PreferenceExample], length: int, seed: int) -> None:
    """KTO's reference point uses each prompt with *another* example's completion. The
    partner is fixed once (a seeded derangement), so the reference model can score these
    rows ahead of training like any other (TRL pairs within each batch instead)."""
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[i - 1] for i in range(n)}  # a cycle: nobody is their own
    for i, ex in enumerate(examples):
        other = examples[partner[i]].completions[0] if n > 1 else ex.completions[0]
        other = other[:max(1, length - len(ex.prompt))]
        ex.completions.append(other)


def split_held_out(examples: list, held_out: int, seed: int) -> tuple[list, list]:
    """(train, held-out): ``held_out`` examples drawn with the seed, never trained on."""
    if held_out >= len(examples):
        raise PreferenceDataError(f"align.held_out={held_out} leaves no training examples "
                                  f"(there are {len(examples)})")
    order = list(range(len(examples)))
    random.Random(seed + 7).shuffle(order)
    keep = set(order[:held_out])
    return ([e for i, e in enumerate(examples) if i not in keep],
            [e for i, e in enumerate(examples) if i in keep])


def fingerprint(examples: list[PreferenceExample]) -> str:
    """A digest of every row's ids: stored reference log-probs are reused only for the
    very same rows."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.prompt, dtype=np.int64).tobytes() + b"|")
        for c in ex.completions:
            h.update(np.asarray(c, dtype=np.int64).tobytes() + b";")
    return h.hexdigest()


def rows_to_batch(rows: list[tuple[list[int], list[int]]], seq_length: int,
                  pad: int) -> dict[str, torch.Tensor]:
    """``tokens``, next-token ``labels`` and ``loss_mask`` (1 where the label is a
    completion token) ``[rows, seq_length]`` for (prompt, completion) rows."""
    n = len(rows)
    tokens = torch.full((n, seq_length + 1), pad, dtype=torch.long)
    mask = torch.zeros(n, seq_length + 1)
    for i, (prompt, completion) in enumerate(rows):
        ids = prompt + completion
        if len(ids) > seq_length + 1:
            raise PreferenceDataError(f"a row of {len(ids)} tokens does not fit "
                                      f"data.seq_length + 1 = {seq_length + 1}")
        tokens[i, :len(ids)] = torch.tensor(ids)
        mask[i, len(prompt):len(ids)] = 1.0
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].contiguous()}


def example_rows(examples: list[PreferenceExample]) -> list[tuple[list[int], list[int]]]:
    """Rows of a micro-batch, grouped by completion slot: every example's first
    completion, then every example's second (chosen rows, then rejected rows)."""
    slots = len(examples[0].completions)
    return [(ex.prompt, ex.completions[k]) for k in range(slots) for ex in examples]


# --- BCO underlying-distribution matching -------------------------------------------------


def _prompt_features(examples: list[PreferenceExample], dim: int) -> torch.Tensor:
    """Hashed bag of prompt token ids, L2-normalised: a classifier input that needs no
    embedding model (TRL uses a sentence-embedding model, which would mean a download)."""
    x = torch.zeros(len(examples), dim)
    for i, ex in enumerate(examples):
        ids = torch.tensor(ex.prompt, dtype=torch.long) % dim
        x[i].index_add_(0, ids, torch.ones(len(ids)))
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-6)


def fit_udm_weights(examples: list[PreferenceExample], *, dim: int = 4096,
                    sample: int = 1024, seed: int = 0, l2: float = 1e-3) -> dict[str, float]:
    """BCO's UDM: fit P(desirable | prompt) by class-balanced logistic regression on up to
    ``sample`` prompts of each kind, then set each undesirable example's ``udm_weight``
    to the clamped density ratio (:func:`hcx.stages.losses.bco_udm_weights`). Returns a summary."""
    from hcx.stages.losses import bco_udm_weights

    good = [e for e in examples if e.desirable]
    bad = [e for e in examples if not e.desirable]
    if not good or not bad:
        raise PreferenceDataError("align.bco_udm needs both desirable and undesirable examples")
    rng = random.Random(seed)
    train = rng.sample(good, min(sample, len(good))) + rng.sample(bad, min(sample, len(bad)))
    x = _prompt_features(train, dim)
    y = torch.tensor([1.0 if e.desirable else 0.0 for e in train])
    pos = y.sum()
    weight = torch.where(y > 0, len(y) / (2 * pos), len(y) / (2 * (len(y) - pos)))
    w = torch.zeros(dim, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(
            x @ w + b, y, weight=weight) + l2 * w.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        p = torch.sigmoid(_prompt_features(examples, dim) @ w + b)
        desirable = torch.tensor([e.desirable for e in examples])
        weights = bco_udm_weights(p, desirable)
    for e, wt in zip(examples, weights.tolist()):
        e.udm_weight = wt
    und = weights[~desirable]
    return {"mean_weight_undesirable": float(und.mean()), "min": float(und.min()),
            "max": float(und.max())}
