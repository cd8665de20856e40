"""hcx models inside lm-evaluation-harness: ``lm_eval --model hcx``.

    lm_eval --model hcx --model_args checkpoint=runs/tiny-sft/checkpoints --batch_size 16 \\
        --tasks kobest_copa

``checkpoint`` is an hcx checkpoint or a Hugging Face directory (anything
:func:`hcx.evaluation.models.open_model` opens); ``pretrained`` is accepted as its alias.
Other model_args: ``tp`` (tensor-parallel size, hcx checkpoints), ``max_tokens``
(continuation tokens per forward pass), ``dtype`` (Hugging Face directories). The batch
size (questions per forward pass) is lm-eval's ``--batch_size`` (its default is 1;
``auto`` means hcx's default, 16); lm-eval's command line always passes it, so it cannot
also be given in ``--model_args``. The registration that makes ``--model hcx`` known to
lm-eval's own command line is :mod:`hcx.evaluation.lm_eval.plugin`.

What it does differently from lm-eval's ``hf`` model: requests that share a context
(the choices of one multiple-choice question) become one
:class:`~hcx.evaluation.models.ChoiceRequest`, so the context is run once and its KV cache
shared by every choice. Tokenization is lm-eval's own (``TemplateLM._encode_pair`` and
its empty-context rule), so both score the same tokens.

Tensor parallelism: every TP rank must run the same requests. ``lm_eval --model hcx``
runs at tp=1 in one process; for tp=N start lm-eval under torchrun,

    torchrun --nproc-per-node N -m lm_eval --model hcx --model_args checkpoint=...,tp=N ...

Every rank then reports rank 0 of a world of 1 to lm-eval (so none shards the
requests: they all see all of them), and lm-eval writes results only where
``LOCAL_RANK`` is 0. Data parallelism across processes is not offered.

Generation is greedy only: a request asking for sampling is refused.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import lm_eval.models  # noqa: F401  (fills lm-eval's model table before "hcx" joins it)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from hcx.errors import HcxError
from hcx.evaluation.models import Budget, ChoiceRequest, GenerationRequest, LanguageModel, open_model

log = logging.getLogger(__name__)


class SamplingRefused(HcxError, ValueError):
    pass


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HcxError(f"lm_eval --model hcx: {name}={value!r} is not an integer") from None


@register_model("hcx")
class HcxLM(TemplateLM):
    """An hcx checkpoint or Hugging Face directory as an lm-eval model."""

    def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, tp: int = 1,
                 batch_size: int | str | None = None, max_tokens: int | None = None,
                 dtype: str = "float32", model: LanguageModel | None = None,
                 max_batch_size=None, device=None, **unused):
        super().__init__()
        if unused:
            log.warning("hcx: ignoring model_args %s", sorted(unused))
        if device not in (None, "", "cpu", "cuda") and not str(device).startswith("cuda"):
            raise HcxError(f"lm_eval --model hcx: device {device!r} is not supported "
                           "(hcx picks the GPU when there is one)")
        budget = Budget()
        if batch_size is not None and not str(batch_size).startswith("auto"):
            budget.batch_size = _int(batch_size, "batch_size")
        if max_tokens is not None:
            budget.max_tokens = _int(max_tokens, "max_tokens")
        if model is None:
            path = checkpoint or pretrained
            if not path:
                raise HcxError("lm_eval --model hcx needs --model_args checkpoint=PATH "
                               "(an hcx checkpoint or a Hugging Face directory)")
            model = open_model(str(path), tp=_int(tp, "tp"), budget=budget, dtype=dtype)
        else:
            model.budget = budget if (batch_size is not None or max_tokens is not None) else model.budget
        self.model = model

    # --- what lm-eval asks of every model ----------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.model.eot_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes: BOS if the tokenizer has one, else EOS
        (lm-eval's ``hf`` model does the same)."""
        tok = self.model.tokenizer
        if self.model.kind == "hf":
            bos = tok.bos_token_id
        else:
            bos = tok.special_id("<s>") if hasattr(tok, "special_id") else None
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self.model.budget.batch_size

    @property
    def device(self):
        return getattr(self.model, "device", None)

    @property
    def tokenizer_name(self) -> str:
        return f"hcx:{self.model.path}".replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.model.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.model.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model_name": self.model.name, "model_path": self.model.path,
                "model_kind": self.model.kind}

    # --- scoring -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``requests``: lm-eval's ``((context, continuation), context ids, continuation
        ids)``. Requests with the same context ids become one question; the results come
        back in lm-eval's order as ``(logprob, is_greedy)``."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            groups[tuple(ctx)].append(i)
        keys = list(groups)
        questions = [ChoiceRequest(list(k), [requests[i][2] for i in groups[k]]) for k in keys]
        scores = self.model.loglikelihood(questions, desc="lm-eval loglikelihood")
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for k, qs in zip(keys, scores):
            for i, s in zip(groups[k], qs):
                out[i] = (s.logprob, s.greedy)
                strings = requests[i][0]
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods over disjoint windows, as lm-eval's ``hf``
        model computes them (``get_rolling_token_windows`` + ``make_disjoint_window``)."""
        # hcx's window check wants every continuation shorter than the window, so the
        # windows are one token shorter than the model's (the sums differ from lm-eval's
        # hf model only for documents longer than the window).
        window = self.max_length - 1
        per_doc: list[list[tuple[list[int], list[int]]]] = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm or len(requests) < 2,
                              desc="lm-eval rolling windows", leave=False):
            per_doc.append([lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=window, context_len=1)])
        flat = [ChoiceRequest(ctx, [cont]) for windows in per_doc for ctx, cont in windows]
        scores = self.model.loglikelihood(flat, desc="lm-eval rolling") if flat else []
        out, k = [], 0
        for req, windows in zip(requests, per_doc):
            total = sum(s[0].logprob for s in scores[k:k + len(windows)])
            k += len(windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # --- generation --------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos = self.model.decode([self.eot_token_id])
        gens = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                asked = {k: gen_kwargs[k] for k in ("do_sample", "temperature") if k in gen_kwargs}
                raise SamplingRefused(
                    f"lm_eval --model hcx decodes greedily only; task {req.task_name!r} asks "
                    f"for sampling ({asked}). Set do_sample=false / temperature=0 "
                    "(e.g. --gen_kwargs do_sample=false,temperature=0).")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos or None)
            gens.append(GenerationRequest(context, max_new_tokens=int(kwargs["max_gen_toks"]),
                                          stop=tuple(s for s in until if s)))
        texts = self.model.generate(gens, desc="lm-eval generate")
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    # --- chat --------------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: Hugging Face directories with a chat template only.
        lm-eval renders the chat to text and tokenizes the text, and hcx's own tokenizer
        never reads marker strings in text as markers (hcx.tokenizer.chat inserts them as ids)."""
        tok = self.model.tokenizer
        if self.model.kind != "hf" or not getattr(tok, "chat_template", None):
            raise HcxError(f"{self.model.name}: --apply_chat_template needs a Hugging Face "
                           "directory with a chat template (hcx export makes one); hcx's "
                           "native evaluator (hcx eval --chat) chats with hcx checkpoints")
        return tok.apply_chat_template(chat_history, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return getattr(self.model.tokenizer, "chat_template", None)

    def close(self) -> None:
        self.model.close()
