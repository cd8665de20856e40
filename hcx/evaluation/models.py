"""The models evaluation runs on: hcx checkpoints (megatron-core, any saved TP/PP layout,
run at any tensor-parallel size) and Hugging Face directories (transformers).

Both answer the same two questions, the ones lm-evaluation-harness asks:

- ``loglikelihood``: for a context and its candidate continuations, the log-probability
  of each continuation and whether greedy decoding would produce it. The context is
  run once per question and its KV cache shared by every candidate (a 4-way multiple
  choice costs one context pass, not four).
- ``generate``: continuations of prompts, cut at stop strings: greedy by default, or
  sampled (temperature, top-p) from a seed.

Tokenization of a (context, continuation) pair follows lm-eval's ``_encode_pair``
exactly (trailing spaces of the context move to the continuation; the continuation is
what the tokenized whole adds after the tokenized context), so hcx's scores and lm-eval's
agree token for token on the same prompts.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from hcx.errors import HcxError


class ModelOpenError(HcxError, ValueError):
    pass


@dataclass
class ChoiceRequest:
    """One question: a context and the continuations to score after it (token ids)."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class GenerationRequest:
    """A prompt to continue: text, or a conversation (``[{"role", "content"}, ...]``,
    always rendered with the model's chat template and an open assistant turn; judges
    and multi-turn tasks such as MT-Bench ask this way)."""

    prompt: str | list[dict]
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    chat: bool = False
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # a sampled batch is drawn from the seed of its first request


@dataclass(frozen=True)
class Sampling:
    """How a batch is sampled (a greedy batch has none)."""

    temperature: float
    top_p: float
    seed: int


@dataclass
class Score:
    logprob: float
    greedy: bool  # every continuation token is the argmax at its position


@dataclass
class Budget:
    """How many questions go into one forward pass: ``batch_size`` questions at most,
    and at most ``max_tokens`` cached tokens: every choice holds a copy of its context's
    KV cache plus its own tokens, the memory that grows with contexts and choices."""

    batch_size: int = 16
    max_tokens: int = 32768


def encode_choices(encode, context: str, continuations: list[str],
                   empty_context: int) -> tuple[list[int], list[list[int]]]:
    """lm-eval's ``_encode_pair`` for every continuation of one context: ``(context ids,
    [continuation ids])``. Trailing spaces of the context move to each continuation; a
    continuation is what the tokenized whole adds after the tokenized context. The
    context is tokenized once (its ids are the same for every continuation)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuations = [context[-n_spaces:] + c for c in continuations]
        context = context[:-n_spaces]
    if not context:
        return [empty_context], [encode(c) for c in continuations]
    ctx = encode(context)
    return ctx, [encode(context + c)[len(ctx):] for c in continuations]



class LanguageModel(ABC):
    """What every task kind needs from a model. Subclasses implement the three
    ``_``-prefixed primitives; batching, ordering and progress bars live here."""

    name: str
    path: str
    kind: str  # "hcx" | "hf"
    max_length: int
    budget: Budget
    rank0: bool = True  # prints progress bars (the other TP ranks stay quiet)

    # --- tokenizer -------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @property
    @abstractmethod
    def eot_id(self) -> int: ...

    def chat_prompt(self, prompt: str | list[dict]) -> list[int]:
        """Token ids of a user turn (``prompt`` text) or of a conversation (messages),
        rendered with the model's chat template, ending in an open assistant turn."""
        raise ModelOpenError(f"{self.name}: this model has no chat template")

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.chat or isinstance(request.prompt, list):
            return self.chat_prompt(request.prompt)
        return self.encode(request.prompt)

    # --- scoring ---------------------------------------------------------------------
    def loglikelihood(self, requests: list[ChoiceRequest], desc: str = "score") -> list[list[Score]]:
        """Scores of every continuation of every request, in the input order.

        Questions are run longest first (like lm-eval: an out-of-memory shows at
        once, and similar lengths share a batch with little padding)."""
        budget = self.budget
        cut = [self._fit(r) for r in requests]
        order = sorted(range(len(cut)), key=lambda i: -(len(cut[i].context)
                                                         + max(map(len, cut[i].continuations))))
        batches: list[list[int]] = []
        tokens = 0
        for i in order:
            r = cut[i]
            cost = len(r.continuations) * (len(r.context) + max(map(len, r.continuations)))
            if batches and len(batches[-1]) < budget.batch_size and tokens + cost <= budget.max_tokens:
                batches[-1].append(i)
                tokens += cost
            else:
                batches.append([i])
                tokens = cost
        results: list[list[Score] | None] = [None] * len(requests)
        with self._progress(len(requests), desc) as bar:
            for batch in batches:
                for i, scores in zip(batch, self._score([cut[i] for i in batch])):
                    results[i] = scores
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def _fit(self, r: ChoiceRequest) -> ChoiceRequest:
        """Keep the context's last tokens when context + continuation exceeds the
        window (lm-eval cuts the same end); a continuation is never cut."""
        if any(not c for c in r.continuations):
            raise HcxError("an empty continuation cannot be scored")
        longest = max(map(len, r.continuations))
        if longest > self.max_length:
            raise HcxError(f"a continuation of {longest} tokens does not fit the model's "
                           f"{self.max_length}-token window")
        room = self.max_length + 1 - longest
        if len(r.context) > room:
            return ChoiceRequest(r.context[-room:], r.continuations)
        return r

    @abstractmethod
    def _score(self, requests: list[ChoiceRequest]) -> list[list[Score]]:
        """One batch: prefill every context once, then score all continuations."""

    # --- generation ------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], desc: str = "generate") -> list[str]:
        """Continuations cut at the first stop string, in the input order: greedy, or for
        requests with a temperature > 0 sampled, each batch from the seed of its first
        request (so a run is reproduced with the same requests and batch size)."""
        ids = [self.prompt_ids(r) for r in requests]
        # A batch shares max_new_tokens, stop strings and sampling settings: group by
        # them, longest first.
        key = lambda i: (requests[i].max_new_tokens, requests[i].stop,  # noqa: E731
                         requests[i].temperature, requests[i].top_p)
        order = sorted(range(len(ids)), key=lambda i: (key(i), -len(ids[i])))
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.budget.batch_size and key(batches[-1][0]) == key(i):
                batches[-1].append(i)
            else:
                batches.append([i])
        out: list[str | None] = [None] * len(requests)
        with self._progress(len(requests), desc) as bar:
            for batch in batches:
                steps, stops, temperature, top_p = key(batch[0])
                prompts = [self._fit_prompt(ids[i], steps) for i in batch]
                if temperature > 0:
                    texts = self._generate(prompts, steps, stops, sampling=Sampling(
                        temperature, top_p, requests[batch[0]].seed))
                else:  # greedy: the call (and the result) of before sampling existed
                    texts = self._generate(prompts, steps, stops)
                for i, text in zip(batch, texts):
                    out[i] = cut_at_stop(text, stops)
                bar.update(len(batch))
        return out  # type: ignore[return-value]

    def _fit_prompt(self, ids: list[int], steps: int) -> list[int]:
        room = self.max_length - steps
        if room <= 0:
            raise HcxError(f"max_new_tokens {steps} does not fit the model's "
                           f"{self.max_length}-token window")
        return ids[-room:]

    @abstractmethod
    def _generate(self, prompts: list[list[int]], max_new_tokens: int,
                  stops: tuple[str, ...], sampling: Sampling | None = None) -> list[str]:
        """One batch: greedy, or sampled as ``sampling`` says."""

    @contextlib.contextmanager
    def _progress(self, total: int, desc: str):
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="q", dynamic_ncols=True, leave=False,
                   disable=not self.rank0 or total < 2)
        try:
            yield bar
        finally:
            bar.close()

    def close(self) -> None:
        pass


def cut_at_stop(text: str, stops) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def score_continuations(first_logits: torch.Tensor, cont_logits: torch.Tensor,
                        conts: list[list[int]]) -> list[Score]:
    """Scores from the last context position's logits ``first_logits`` [vocab] (they
    predict every continuation's first token) and each continuation's own logits
    ``cont_logits`` [n, L, vocab] (position j predicts token j+1)."""
    first = torch.log_softmax(first_logits.float(), dim=-1)
    scores = []
    for k, cont in enumerate(conts):
        lp = float(first[cont[0]])
        greedy = int(first.argmax()) == cont[0]
        if len(cont) > 1:
            rest = torch.log_softmax(cont_logits[k, : len(cont) - 1].float(), dim=-1)
            target = torch.tensor(cont[1:])
            lp += float(rest.gather(1, target[:, None]).sum())
            greedy = greedy and bool((rest.argmax(-1) == target).all())
        scores.append(Score(lp, greedy))
    return scores


def _expand(requests: list[ChoiceRequest]) -> tuple[torch.Tensor, list[list[int]]]:
    """Which question each continuation belongs to (an index into the batch) and the
    flat list of continuations."""
    owner = [q for q, r in enumerate(requests) for _ in r.continuations]
    flat = [c for r in requests for c in r.continuations]
    return torch.tensor(owner), flat


def _continuation_inputs(flat: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What is fed after the cached context: each continuation but its last token,
    right-padded ``[n, L]``, and which positions are real (a one-token continuation
    feeds a masked pad: its score comes from the context's last logits alone)."""
    rows = [c[:-1] or [pad] for c in flat]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, c) in enumerate(zip(rows, flat)):
        tokens[i, : len(r)] = torch.tensor(r)
        real[i, : len(r)] = len(c) > 1
    return tokens, real


def _split_scores(requests: list[ChoiceRequest], first: torch.Tensor,
                  logits: torch.Tensor) -> list[list[Score]]:
    """Per request, the scores of its continuations, from the context's last logits
    ``first`` [questions, vocab] and the continuations' logits ``logits`` [n, L, vocab]
    (in the flat order of :func:`_expand`)."""
    results, k = [], 0
    for q, r in enumerate(requests):
        n = len(r.continuations)
        results.append(score_continuations(first[q], logits[k:k + n], r.continuations))
        k += n
    return results


# --- Hugging Face directories --------------------------------------------------------


class HFModel(LanguageModel):
    """A transformers causal LM from a local directory (nothing is downloaded)."""

    kind = "hf"

    def __init__(self, path: str, dtype: str = "float32", budget: Budget | None = None,
                 device: str | None = None, max_length: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise ModelOpenError(f"{path}: not a Hugging Face model directory (no config.json); "
                                 "hcx checkpoints are directories with hcx.json or a 'latest' file")
        self.path = str(p.resolve())
        self.name = p.name
        self.budget = budget or Budget()
        self.dtype = dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=getattr(torch, dtype)).to(self.device).eval()
        cfg = self.model.config
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", 2048)
        self._pad = self.tokenizer.pad_token_id
        if self._pad is None:
            self._pad = self.eot_id
        # Generation ends at any end-of-sequence id the model lists (chat models list the
        # end of a turn too), else at the tokenizer's.
        listed = getattr(self.model.generation_config, "eos_token_id", None)
        listed = listed if isinstance(listed, list) else [listed] if listed is not None else []
        self._stop_ids = list(dict.fromkeys([*listed, self.eot_id]))
        # A vocabulary padded for tensor parallelism has rows that are no token: they
        # are left out of the softmax and never generated (hcx does the same).
        self.vocab = min(cfg.vocab_size, len(self.tokenizer))
        self._padding = list(range(self.vocab, cfg.vocab_size)) or None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eot_id(self) -> int:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id

    def chat_prompt(self, prompt: str | list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            return super().chat_prompt(prompt)
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return list(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    @torch.no_grad()
    def _score(self, requests: list[ChoiceRequest]) -> list[list[Score]]:
        from hcx.engine.generate import left_pad

        ctx, ctx_real = left_pad([r.context for r in requests], self._pad)
        ctx_pos = (ctx_real.long().cumsum(1) - 1).clamp(min=0)
        # Only the last context position's logits are needed (they predict every
        # continuation's first token): skip the vocabulary projection of the others.
        out = self.model(input_ids=ctx.to(self.device), attention_mask=ctx_real.long().to(self.device),
                         position_ids=ctx_pos.to(self.device), use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1, : self.vocab].float().cpu()
        owner, flat = _expand(requests)
        if max(map(len, flat)) > 1:
            cache = out.past_key_values
            cache.batch_select_indices(owner.to(self.device))  # one copy per continuation
            inputs, real = _continuation_inputs(flat, self._pad)
            start = ctx_real.sum(1)[owner]
            pos = start[:, None] + torch.arange(inputs.shape[1])[None, :]
            mask = torch.cat([ctx_real[owner], real], dim=1)
            logits = self.model(input_ids=inputs.to(self.device), attention_mask=mask.long().to(self.device),
                                position_ids=pos.to(self.device), past_key_values=cache,
                                use_cache=True).logits[..., : self.vocab].float().cpu()
        else:
            logits = torch.empty(len(flat), 0, first.shape[-1])
        return _split_scores(requests, first, logits)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new_tokens: int,
                  stops: tuple[str, ...], sampling: Sampling | None = None) -> list[str]:
        from hcx.engine.generate import left_pad

        tokens, real = left_pad(prompts, self._pad)
        kwargs = {"stop_strings": list(stops), "tokenizer": self.tokenizer} if stops else {}
        if sampling is not None:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=0)
        else:
            kwargs.update(do_sample=False)
        # transformers samples from torch's global generator: seed it for this batch only
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=sampling is not None):
            if sampling is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(
                input_ids=tokens.to(self.device), attention_mask=real.long().to(self.device),
                max_new_tokens=max_new_tokens, pad_token_id=self._pad,
                eos_token_id=self._stop_ids, suppress_tokens=self._padding, **kwargs)
        texts = []
        for row in out[:, tokens.shape[1]:].tolist():
            ends = [row.index(i) for i in self._stop_ids if i in row]
            texts.append(self.decode(row[: min(ends)] if ends else row))
        return texts


# --- hcx checkpoints -----------------------------------------------------------------


class HcxModel(LanguageModel):
    """An hcx checkpoint opened for inference at tensor-parallel size ``tp`` (every TP
    rank runs this code on the same requests; rank 0 writes the results)."""

    kind = "hcx"

    def __init__(self, checkpoint: str, tp: int = 1, budget: Budget | None = None, log=print):
        from hcx.engine.inference import open_checkpoint

        self.engine, self.tokenizer = open_checkpoint(Path(checkpoint), tp=tp, log=log)
        self.path = str(Path(checkpoint).resolve())
        self.name = checkpoint_name(Path(checkpoint))
        self.budget = budget or Budget()
        self.max_length = self.engine.recipe.model.max_position_embeddings
        self.rank0 = self.engine.topo.rank == 0
        self.vocab = self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eod

    def chat_prompt(self, prompt: str | list[dict]) -> list[int]:
        from hcx.engine.generate import encode_prompt

        return encode_prompt(prompt, self.tokenizer, chat=True)

    def _forward(self, tokens: torch.Tensor, mask, context, all_positions: bool) -> torch.Tensor:
        """Float32 logits [batch, positions, vocab] on the CPU."""
        from hcx.engine.generate import forward_logits

        return forward_logits(self.engine, tokens, mask, context, self.vocab, all_positions).cpu()

    @torch.no_grad()
    def _score(self, requests: list[ChoiceRequest]) -> list[list[Score]]:
        from megatron.core.inference.contexts import StaticInferenceContext

        from hcx.engine.generate import left_pad, padding_mask

        pad = self.tokenizer.pad
        ctx, ctx_real = left_pad([r.context for r in requests], pad)
        owner, flat = _expand(requests)
        longest = max(map(len, flat))
        context = StaticInferenceContext(len(requests), ctx.shape[1] + longest)
        self.engine.ddp.eval()
        try:
            first = self._forward(ctx, padding_mask(ctx_real, ctx.shape[1]), context, False)[:, -1]
            if longest > 1:
                # One cache row per continuation, copied from its question's context
                # (megatron's static cache is [sequence, batch, heads, dim]).
                index = owner.to(next(iter(context.key_value_memory_dict.values()))[0].device)
                for layer, (k, v) in list(context.key_value_memory_dict.items()):
                    context.key_value_memory_dict[layer] = (k[:, index], v[:, index])
                context.max_batch_size = len(flat)
                context.sequence_len_offset = ctx.shape[1]
                inputs, real = _continuation_inputs(flat, pad)
                full = torch.cat([ctx_real[owner], real], dim=1)
                logits = self._forward(inputs, padding_mask(full, inputs.shape[1]), context, True)
            else:
                logits = torch.empty(len(flat), 0, self.vocab)
        finally:
            self.engine.ddp.train()
        return _split_scores(requests, first, logits)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int,
                  stops: tuple[str, ...], sampling: Sampling | None = None) -> list[str]:
        return [g.text for g in self.generations(prompts, max_new_tokens, stops, sampling)]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The token ids that end a generation: the end of document and, where the
        tokenizer has chat markers, the end of a turn."""
        from hcx.engine.generate import chat_stop_ids

        try:
            return chat_stop_ids(self.tokenizer)
        except HcxError:  # a tokenizer without chat markers: end of document only
            return (self.tokenizer.eod,)

    def generations(self, prompts: list[list[int]], max_new_tokens: int,
                    stops: tuple[str, ...], sampling: Sampling | None = None):
        """One batch as :meth:`generate` runs it, with everything the engine returns
        (``hcx.engine.generate.Generation``: the new token ids and why generation
        ended, besides the text): what ``hcx serve`` answers from."""
        from hcx.engine.generate import Generator, SamplingParams

        extra = {} if sampling is None else {"temperature": sampling.temperature,
                                             "top_p": sampling.top_p, "seed": sampling.seed}
        params = SamplingParams(max_new_tokens=max_new_tokens, stop_strings=stops,
                                stop_ids=self.stop_ids, **extra)
        return Generator(self.engine, self.tokenizer).generate(prompts, params)

    def close(self) -> None:
        from hcx.engine.parallel import shutdown

        shutdown()


def checkpoint_name(path: Path) -> str:
    """``runs/tiny-sft/checkpoints`` -> ``tiny-sft``."""
    parts = [p for p in path.resolve().parts
             if p not in ("checkpoints", "latest") and not p.startswith("step_")]
    return parts[-1] if parts else str(path)


def open_model(path: str, *, tp: int = 1, budget: Budget | None = None, dtype: str = "float32",
               log=print) -> LanguageModel:
    """An hcx checkpoint or a Hugging Face directory, told apart by what is in it."""
    p = Path(path)
    if not p.exists():
        raise ModelOpenError(f"{path}: no such checkpoint or model directory")
    if (p / "config.json").is_file():
        if tp != 1:
            raise ModelOpenError(f"{path}: --tp applies to hcx checkpoints; a Hugging Face "
                                 "directory runs in one process")
        return HFModel(path, dtype=dtype, budget=budget)
    return HcxModel(path, tp=tp, budget=budget, log=log)
