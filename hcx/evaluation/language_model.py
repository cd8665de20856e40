"""What every evaluation model answers, whatever runs it (an hcx checkpoint, a Hugging
Face directory, an OpenAI-compatible server): the requests, the scores, and the
:class:`LanguageModel` base with its batching, truncation and progress bars. The models
themselves live in :mod:`hcx.evaluation.models` (in-process) and
:mod:`hcx.evaluation.endpoint` (over HTTP)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Replicas:
    """Data-parallel evaluation (``hcx eval --dp N``): this process is replica ``rank``
    of ``size``. Every replica plans the batches a single process would, runs every
    ``size``-th of them and the results are gathered: the same batches give the same
    numbers, so scores equal a single process's exactly (padding and batch composition
    change floating-point results; sharding examples would not be exact)."""

    rank: int = 0
    size: int = 1
    group: object = None  # the torch.distributed group of the replicas (None: the world)

    def share(self, batches: list[list[int]]) -> list[list[int]]:
        return batches[self.rank::self.size]

    def gather(self, results: dict) -> dict:
        """Every replica's ``{request index: result}`` merged, on every replica."""
        if self.size == 1:
            return results
        import torch.distributed as dist

        parts: list[dict | None] = [None] * self.size
        dist.all_gather_object(parts, results, group=self.group)
        return {i: r for part in parts for i, r in part.items()}


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
    kind: str  # "hcx" | "hf" | "endpoint"
    max_length: int
    budget: Budget
    rank0: bool = True  # prints progress bars and writes results (other ranks stay quiet)
    replicas: Replicas = Replicas()

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
        mine = self.replicas.share(batches)
        results: dict[int, list[Score]] = {}
        with self._progress(sum(map(len, mine)), desc) as bar:
            for batch in mine:
                for i, scores in zip(batch, self._score([cut[i] for i in batch])):
                    results[i] = scores
                bar.update(len(batch))
        results = self.replicas.gather(results)
        return [results[i] for i in range(len(requests))]

    def _fit(self, r: ChoiceRequest, window: int | None = None) -> ChoiceRequest:
        """Keep the context's last tokens when context + continuation exceeds the
        window (lm-eval cuts the same end); a continuation is never cut. The model reads
        context + continuation but its last token, at most ``window`` tokens
        (default: the model's ``max_length``)."""
        window = self.max_length if window is None else window
        if any(not c for c in r.continuations):
            raise HcxError("an empty continuation cannot be scored")
        longest = max(map(len, r.continuations))
        if longest > window:
            raise HcxError(f"a continuation of {longest} tokens does not fit the model's "
                           f"{window}-token window")
        room = window + 1 - longest
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
        mine = self.replicas.share(batches)
        out: dict[int, str] = {}
        with self._progress(sum(map(len, mine)), desc) as bar:
            for batch in mine:
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
        out = self.replicas.gather(out)
        return [out[i] for i in range(len(requests))]

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
