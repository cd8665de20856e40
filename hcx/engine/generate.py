"""Text generation on the megatron model: a small, clear decoding loop.

The loop runs the model itself (so TP works exactly as in training: megatron's
column/row-parallel layers, logits gathered over TP) and keeps keys and values in
megatron-core's ``StaticInferenceContext``, the KV cache its own inference engines
use. megatron's engines and controllers are not used: they add request scheduling
and CUDA-only pieces that a batch of prompts does not need.

One call handles a batch of prompts of different lengths:

1. Prompts are left-padded to the longest, so every sequence's next token sits in
   the same column. An attention mask hides the padding (a padded position sees only
   itself, which keeps its row finite). RoPE is relative, so a sequence shifted right
   by its padding attends exactly as it would unpadded.
2. The prompt pass fills the cache; each decoding step feeds one token per sequence.
   Without the cache (``use_cache=False``) each step recomputes the whole sequence,
   the reference the cache is checked against.
3. Logits are processed as Hugging Face's ``generate`` does, in the same order:
   repetition penalty, then temperature, top-k, top-p; ``temperature == 0`` is greedy.
4. A sequence finishes at a stop token id (the tokenizer's end of document and, for
   chat, the end-of-turn marker by default) or a stop string, or after
   ``max_new_tokens``. Finished sequences are carried along until all are done.

Sampling draws from one seeded generator, identical on every TP rank, and the
chosen tokens are broadcast from TP rank 0, so ranks can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hcx.errors import HcxError


class GenerationError(HcxError, ValueError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults are greedy decoding of up to 128 tokens."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / T)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches p (1: all)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence
    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's end of document
    seed: int = 0
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop_strings):
            raise GenerationError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One prompt's result. ``ids`` are the new tokens, ending with the stop token id
    when one ended it (as ``transformers`` returns them); ``text`` is their decoded
    text, cut before a stop string."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (a stop id or string) or "length"


# --- logits processing (each mirrors the transformers processor of the same name) ---


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) as ``RepetitionPenaltyLogitsProcessor``:
    a seen token's positive logit is divided by ``penalty``, a negative one multiplied,
    so either way it becomes less likely. ``seen`` is a [batch, vocab] boolean mask."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (ties with the k-th are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): drop the least likely tokens whose
    total probability is at most ``1 - p``; the most likely token always stays."""
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` [batch, vocab] (float32)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / params.temperature, params.top_k), params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# --- the decoding loop ---------------------------------------------------------------


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` [batch, longest] left-padded with ``pad`` and ``real`` (True where a
    prompt token is)."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad, dtype=torch.long)
    real = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, longest - len(p):] = torch.tensor(p)
            real[i, longest - len(p):] = True
    return tokens, real


def padding_mask(real: torch.Tensor, queries: int) -> torch.Tensor | None:
    """megatron's boolean attention mask (True = masked) [batch, 1, queries, keys] for
    the last ``queries`` positions of sequences whose real tokens are ``real``
    [batch, keys]: causal, padding hidden; a padded position sees itself only (a
    fully masked row would turn into NaNs). None when nothing is padded and megatron's
    own masking is right: a whole-sequence pass (causal) or one new token (sees all).
    A chunk of several new tokens after a cache (evaluation's continuations) always
    needs the explicit mask: megatron's causal mask assumes queries == keys."""
    if bool(real.all()) and queries in (1, real.shape[1]):
        return None
    keys = real.shape[1]
    q_pos = torch.arange(keys - queries, keys).unsqueeze(1)
    k_pos = torch.arange(keys).unsqueeze(0)
    allowed = (k_pos <= q_pos) & (real.unsqueeze(1) | (k_pos == q_pos))
    return ~allowed.unsqueeze(1)


def forward_logits(engine, tokens: torch.Tensor, mask, context, vocab_size: int,
                   all_positions: bool = False) -> torch.Tensor:
    """One forward pass of an inference engine with a KV cache ``context``: float32 logits
    ``[batch, positions, vocab_size]`` (the vocabulary padding cut), for every position of
    ``tokens`` or, in megatron's inference mode, for the last one only."""
    from hcx.engine.parallel import device

    dev = device()
    context.materialize_only_last_token_logits = not all_positions
    position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0)
    out = engine.ddp(tokens.to(dev), position_ids, None if mask is None else mask.to(dev),
                     inference_context=context, runtime_gather_output=True)
    return out[..., :vocab_size].float()


class Generator:
    """Generates with an engine built for inference (see ``inference.open_checkpoint``)."""

    def __init__(self, engine, tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_positions = engine.recipe.model.max_position_embeddings

    def _forward(self, tokens: torch.Tensor, mask, context) -> torch.Tensor:
        """Float32 logits of the last position [batch, vocab]."""
        return forward_logits(self.engine, tokens, mask, context, self.tokenizer.vocab_size)[:, -1]

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_ids) if params.stop_ids is not None else {self.tokenizer.eod}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Generate for a batch of tokenized prompts (all at once: split large lists)."""
        from megatron.core.inference.contexts import StaticInferenceContext

        if not prompts:
            return []
        if any(not p for p in prompts):
            raise GenerationError("a prompt is empty: give at least one token")
        tokens, real = left_pad(prompts, self.tokenizer.pad)
        batch, prompt_len = tokens.shape
        total = prompt_len + params.max_new_tokens
        if total > self.max_positions:
            raise GenerationError(
                f"the longest prompt ({prompt_len} tokens) plus max_new_tokens "
                f"({params.max_new_tokens}) exceeds the model's max_position_embeddings "
                f"({self.max_positions})")
        vocab = self.tokenizer.vocab_size
        # Which tokens each sequence holds (for the repetition penalty); padding is not one.
        seen = torch.zeros(batch, vocab, dtype=torch.long).scatter_add_(
            1, tokens.clamp(max=vocab - 1), real.long()) > 0
        stop_ids = torch.tensor(sorted(self._stop_ids(params)), dtype=torch.long)
        generator = torch.Generator().manual_seed(params.seed)
        results = [Generation(prompt_ids=list(p)) for p in prompts]
        done = torch.zeros(batch, dtype=torch.bool)
        # Enough trailing tokens to hold any stop string (see _has_stop_string).
        stop_window = max((len(s.encode()) for s in params.stop_strings), default=0) + 8

        was_training = self.engine.ddp.training
        self.engine.ddp.eval()
        # Without the cache every step is a prompt pass over the whole sequence, in a
        # fresh context (it still spares computing logits for all but the last token).
        context = StaticInferenceContext(batch, total if params.use_cache else prompt_len)
        try:
            logits = self._forward(tokens, padding_mask(real, prompt_len), context)
            for step in range(params.max_new_tokens):
                chosen = self._agree(next_tokens(logits.cpu(), seen, params, generator))
                chosen = torch.where(done, self.tokenizer.pad, chosen)
                active = torch.nonzero(~done).flatten()
                for i in active.tolist():
                    results[i].ids.append(int(chosen[i]))
                seen[active, chosen[active]] = True
                finished = ~done & torch.isin(chosen, stop_ids)
                for i in torch.nonzero(~done & ~finished).flatten().tolist():
                    if params.stop_strings and self._has_stop_string(
                            results[i].ids[-stop_window:], params.stop_strings):
                        finished[i] = True
                for i in torch.nonzero(finished).flatten().tolist():
                    results[i].finish_reason = "stop"
                done |= finished
                if bool(done.all()) or step == params.max_new_tokens - 1:
                    break
                tokens = torch.cat([tokens, chosen.unsqueeze(1)], dim=1)
                real = torch.cat([real, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
                if not params.use_cache:  # recompute everything (the reference path)
                    logits = self._forward(tokens, padding_mask(real, tokens.shape[1]),
                                           StaticInferenceContext(batch, tokens.shape[1]))
                else:
                    context.sequence_len_offset = tokens.shape[1] - 1
                    context.enable_decode_mode()
                    logits = self._forward(tokens[:, -1:], padding_mask(real, 1), context)
        finally:
            self.engine.ddp.train(was_training)
        for r in results:
            r.text = self._text(r.ids, params)
        return results

    def _agree(self, chosen: torch.Tensor) -> torch.Tensor:
        """TP ranks compute identical logits; broadcast rank 0's choice all the same, so
        a floating-point difference can never make ranks decode different sequences."""
        from megatron.core import parallel_state as ps

        from hcx.engine.parallel import device

        if ps.get_tensor_model_parallel_world_size() > 1:
            on_device = chosen.to(device())
            dist.broadcast(on_device, src=ps.get_tensor_model_parallel_src_rank(),
                           group=ps.get_tensor_model_parallel_group())
            chosen = on_device.cpu()
        return chosen

    def _has_stop_string(self, tail: list[int], stops: tuple[str, ...]) -> bool:
        # A token decodes to at least one byte (control tokens aside, hence the slack
        # in stop_window), so a stop string that just completed lies in the last few.
        text = self.tokenizer.decode(tail)
        return any(s in text for s in stops)

    def _text(self, ids: list[int], params: SamplingParams) -> str:
        stop_ids = self._stop_ids(params)
        text = self.tokenizer.decode([i for i in ids if i not in stop_ids])
        cuts = [text.find(s) for s in params.stop_strings if s in text]
        return text[: min(cuts)] if cuts else text


# --- prompts, batches and the command line ----------------------------------------------


def encode_prompt(prompt: str | list[dict], tokenizer, chat: bool,
                  system: str | None = None) -> list[int]:
    """Token ids of a prompt: plain text, or (``chat``) a user turn, or a list of chat
    messages, rendered with the one chat layout SFT trains on and an open assistant turn."""
    from hcx.tokenizer.chat import render_chat

    if isinstance(prompt, list):
        messages = prompt
    elif chat:
        messages = [{"role": "user", "content": prompt}]
    else:
        return tokenizer.encode(prompt)
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return render_chat(messages, tokenizer, add_generation_prompt=True).ids


def chat_stop_ids(tokenizer) -> tuple[int, ...]:
    """A chat reply ends at the end-of-turn marker (or the end of document); under a
    Hugging Face chat template (an imported model's tokenizer), at the template's."""
    from hcx.tokenizer.chat import ChatError, marker_ids, template_stop_ids, template_tokenizer
    from hcx.tokenizer.special_tokens import END_OF_TURN

    try:
        return tuple(sorted({tokenizer.eod, marker_ids(tokenizer)[END_OF_TURN]}))
    except ChatError:
        template = template_tokenizer(tokenizer)
        if template is None:
            raise
        return tuple(sorted({i for i in (tokenizer.eod, *template_stop_ids(template))
                             if i is not None}))


def generate_all(generator: Generator, prompts: list[list[int]], params: SamplingParams,
                 batch_size: int, progress: bool = False) -> list[Generation]:
    """Generate for any number of prompts, ``batch_size`` at a time. Prompts are
    grouped by length (less padding) and results returned in the input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress and len(batches) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", dynamic_ncols=True)
    results: list[Generation | None] = [None] * len(prompts)
    for batch in batches:
        for i, r in zip(batch, generator.generate([prompts[i] for i in batch], params)):
            results[i] = r
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def read_prompts(path: str) -> list[str | list[dict]]:
    """Prompts from a file: JSONL lines with ``prompt`` (text) or ``messages`` (chat),
    or plain text, one prompt per line."""
    import json

    prompts: list[str | list[dict]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if not line.lstrip().startswith("{"):
                prompts.append(line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerationError(f"{path}:{lineno}: not valid JSON: {e}") from None
            value = record.get("messages", record.get("prompt"))
            if not isinstance(value, (str, list)):
                raise GenerationError(
                    f"{path}:{lineno}: expected a 'prompt' string or a 'messages' list")
            prompts.append(value)
    return prompts
