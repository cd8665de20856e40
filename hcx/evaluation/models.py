"""The models evaluation runs on: hcx checkpoints (megatron-core, any saved TP/PP layout,
run at any tensor-parallel size) and Hugging Face directories (transformers), in this
process; :func:`open_model` also opens served models (:mod:`hcx.evaluation.endpoint`).

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

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hcx.errors import HcxError
# The base and its requests live in language_model (endpoint models share them without
# importing torch); they are named here too, where evaluation code has always found them.
from hcx.evaluation.language_model import (  # noqa: F401
    Budget,
    ChoiceRequest,
    GenerationRequest,
    LanguageModel,
    ModelOpenError,
    Replicas,
    Sampling,
    Score,
    cut_at_stop,
    encode_choices,
)

if TYPE_CHECKING:
    from hcx.evaluation.endpoint import EndpointOptions


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
                 device: str | None = None, max_length: int | None = None, dp: int = 1):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise ModelOpenError(f"{path}: not a Hugging Face model directory (no config.json); "
                                 "hcx checkpoints are directories with hcx.json or a 'latest' file")
        self.path = str(p.resolve())
        self.name = p.name
        self.budget = budget or Budget()
        self.dtype = dtype
        self.replicas = join_replicas(dp)
        self.rank0 = self.replicas.rank == 0
        local = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if dp > 1 else "cuda"
        self.device = torch.device(device or (local if torch.cuda.is_available() else "cpu"))
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

    def close(self) -> None:
        import torch.distributed as dist

        if self.replicas.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

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

    def __init__(self, checkpoint: str, tp: int = 1, budget: Budget | None = None, log=print,
                 dp: int = 1):
        from megatron.core import parallel_state

        from hcx.engine.inference import open_checkpoint

        self.engine, self.tokenizer = open_checkpoint(Path(checkpoint), tp=tp, log=log, dp=dp)
        if dp > 1:  # results are gathered as Python objects: over gloo, on GPUs too
            self.replicas = Replicas(self.engine.topo.dp_rank, dp,
                                     parallel_state.get_data_parallel_group_gloo())
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


def join_replicas(dp: int) -> Replicas:
    """The replicas of a model that runs whole in each of ``dp`` processes started by
    torchrun (a Hugging Face model under ``hcx eval --dp N``)."""
    if dp == 1:
        return Replicas()
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != dp:
        raise ModelOpenError(f"--dp {dp} needs {dp} processes, {world} were started")
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # only Python objects travel: gloo on GPUs too
    return Replicas(dist.get_rank(), dp, None)


def open_model(path: str, *, tp: int = 1, budget: Budget | None = None, dtype: str = "float32",
               log=print, endpoint: EndpointOptions | None = None, dp: int = 1) -> LanguageModel:
    """An OpenAI-compatible server (an ``http://`` or ``https://`` URL, talked to as
    ``endpoint`` says), an hcx checkpoint or a Hugging Face directory (told apart by
    what is in it); ``dp`` replicas of a local model when ``tp * dp`` processes run this
    (``hcx eval --dp``)."""
    from hcx.evaluation.endpoint_client import is_endpoint

    if is_endpoint(path):
        from hcx.evaluation.endpoint import EndpointModel

        if tp != 1 or dp != 1:
            raise ModelOpenError(f"{path}: --tp and --dp apply to checkpoints and model "
                                 "directories; a served model runs where the server runs it")
        return EndpointModel(path, endpoint, log=log)
    if endpoint is not None:
        raise ModelOpenError(f"{path}: endpoint options are for http:// or https:// URLs")
    p = Path(path)
    if not p.exists():
        raise ModelOpenError(f"{path}: no such checkpoint or model directory")
    if (p / "config.json").is_file():
        if tp != 1:
            raise ModelOpenError(f"{path}: --tp applies to hcx checkpoints; a Hugging Face "
                                 "directory runs in one process")
        return HFModel(path, dtype=dtype, budget=budget, dp=dp)
    return HcxModel(path, tp=tp, budget=budget, log=log, dp=dp)
