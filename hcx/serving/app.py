"""The HTTP routes (OpenAI and vLLM compatible), on FastAPI.

Handlers check a request, tokenize it, hand model calls to the engine thread
(:class:`~hcx.serving.worker.EngineWorker`) and build the answer from the results.
Generation goes through ``HcxModel.generations``, the path ``hcx eval`` generates
with, so a server's answer is the one in-process evaluation gives for the same prompt
and settings.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass

from hcx.errors import HcxError, require
from hcx.evaluation.models import HcxModel, Sampling
from hcx.serving.batches import Generate, Score
from hcx.serving.protocol import (ApiError, ChatRequest, CompletionRequest, DetokenizeRequest,
                                  Message, TokenizeRequest, error_body, validation_message)
from hcx.serving.tokens import logprobs_object
from hcx.serving.worker import EngineWorker


@dataclass
class Served:
    """What the routes answer from."""

    model: HcxModel
    worker: EngineWorker
    name: str
    active: int = 0  # requests being answered

    @property
    def max_model_len(self) -> int:
        return self.model.max_length


@dataclass
class Choice:
    """One generated continuation, as the response shows it."""

    text: str
    ids: list[int]  # its tokens (those behind ``text``)
    finish_reason: str
    generated: int  # tokens generated (with a stop token)


def create_app(served: Served):
    fastapi = require("fastapi", "serve", purpose="hcx serve")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = fastapi.FastAPI(title="hcx serve", version="1")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(fastapi.HTTPException)
    async def http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.middleware("http")
    async def count_and_catch(request, call_next):
        served.active += 1
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - an answer, never a dropped connection
            return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                           "server_error"), status_code=500)
        finally:
            served.active -= 1

    @app.get("/health")
    async def health():
        return {"status": "ok", "requests": served.active - 1,  # in flight, this one aside
                "largest_batch": served.worker.largest_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(served)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(served, name)
        return model_card(served)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await complete(served, req)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await chat_complete(served, req)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(served, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give either prompt (a text) or messages", param="prompt")
        ids = (served.model.encode(req.prompt) if req.prompt is not None
               else chat_ids(served, req.messages))
        return {"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len}

    @app.get("/tokenizer_info")
    async def tokenizer_info():  # vLLM's; lm-eval's remote tokenizer starts here
        tok = served.model.tokenizer
        return {"tokenizer_class": type(tok).__name__, "name": tok.name,
                "vocab_size": served.model.vocab, "eos_token_id": served.model.eot_id,
                "pad_token_id": tok.pad, "model_max_length": served.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(served, req.model)
        vocab = served.model.vocab
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: {bad[0]} is not a token id (the vocabulary has "
                                f"{vocab} ids)", param="tokens")
        return {"prompt": served.model.decode(req.tokens)}

    return app


def model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "hcx",
            "root": served.model.path, "max_model_len": served.max_model_len,
            "eos_token_id": served.model.eot_id}


def check_model(served: Served, name: str | None) -> None:
    if name is not None and name != served.name:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                            f"`{served.name}`", param="model", code="model_not_found")


def check_common(req, max_tokens: int) -> tuple[float, float, tuple[str, ...]]:
    """Temperature, top-p and stop strings of a request (OpenAI's defaults)."""
    if req.stream:
        raise ApiError(400, "streaming is not supported by hcx serve: send stream=false",
                       param="stream")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(not s for s in stops):
        raise ApiError(400, "stop: stop strings must not be empty", param="stop")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    return temperature, top_p, stops


def check_fits(served: Served, prompt: list[int], max_tokens: int, index: int | None = None) -> None:
    which = "the prompt" if index is None else f"prompt {index}"
    if not prompt:
        raise ApiError(400, f"{which} is empty: give at least one token", param="prompt")
    vocab = served.model.vocab
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"{which}: {bad[0]} is not a token id (the vocabulary has "
                            f"{vocab} ids)", param="prompt")
    if len(prompt) + max_tokens > served.max_model_len:
        raise ApiError(400, f"{which} has {len(prompt)} tokens and max_tokens is "
                            f"{max_tokens}: {len(prompt) + max_tokens} tokens exceed the "
                            f"model's window of {served.max_model_len} tokens",
                       param="max_tokens" if max_tokens else "prompt")


async def generate(served: Served, prompt: list[int], max_tokens: int, n: int,
                   temperature: float, top_p: float, seed: int | None,
                   stops: tuple[str, ...]) -> list[Choice]:
    """``n`` continuations of ``prompt``: greedy (computed once), or sampled as one
    batch of ``n`` copies drawn from ``seed`` (a fresh one if None)."""
    if temperature == 0:
        sampling, copies = None, 1
    else:
        seed = secrets.randbelow(2**31) if seed is None else seed
        sampling, copies = Sampling(temperature, top_p, seed), n
    work = Generate((tuple(prompt),) * copies, max_tokens, stops, sampling)
    generations = await served.worker.submit(work)
    choices = [to_choice(served, g) for g in generations]
    return choices * n if copies == 1 else choices


def to_choice(served: Served, g) -> Choice:
    """The tokens behind a generation's text: cut after the token where a stop string
    begins; a stop token (end of document or turn) stays last, as vLLM's logprobs show
    it (lm-eval drops the last token of an echo with max_tokens=1, whatever it is)."""
    ids = list(g.ids)
    stop = [ids.pop()] if ids and ids[-1] in served.model.stop_ids else []
    decode = served.model.decode
    if ids and len(decode(ids)) > len(g.text):
        keep = 0
        while len(decode(ids[:keep])) < len(g.text):
            keep += 1
        ids, stop = ids[:keep], []
    return Choice(g.text, ids + stop, g.finish_reason, len(g.ids))


def prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt: the list of prompts is empty", param="prompt")
    return list(prompt)


async def complete(served: Served, req: CompletionRequest) -> dict:
    check_model(served, req.model)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    temperature, top_p, stops = check_common(req, max_tokens)
    if max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens must be at least 1 (0 only with echo=true, to score "
                            "the prompt)", param="max_tokens")
    prompts = prompt_list(req.prompt)
    texts = [p if isinstance(p, str) else None for p in prompts]
    ids = [served.model.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for i, p in enumerate(ids):
        check_fits(served, p, max_tokens, i if len(ids) > 1 else None)
    n = req.n
    if max_tokens == 0:
        per_prompt = [[Choice("", [], "length", 0)] * n for _ in ids]
    else:
        per_prompt = await asyncio.gather(*[
            generate(served, p, max_tokens, n, temperature, top_p, req.seed, stops) for p in ids])
    logprobs: list[list[dict | None]] = [[None] * n for _ in ids]
    if req.logprobs is not None:
        logprobs = await score_choices(served, ids, texts, per_prompt, req.logprobs, req.echo)
    choices = []
    for i, (prompt, text) in enumerate(zip(ids, texts)):
        shown = (text if text is not None else served.model.decode(prompt)) if req.echo else ""
        for j, c in enumerate(per_prompt[i]):
            choices.append({"index": i * n + j, "text": shown + c.text,
                            "logprobs": logprobs[i][j], "finish_reason": c.finish_reason})
    prompt_tokens = sum(len(p) for p in ids)
    completion_tokens = sum(c.generated for cs in per_prompt for c in cs)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def score_choices(served: Served, ids: list[list[int]], texts: list[str | None],
                        per_prompt: list[list[Choice]], top: int,
                        echo: bool) -> list[list[dict]]:
    """Each choice's ``logprobs``: one forward pass over prompt + choice (each distinct
    sequence once), shown from the prompt's first token with echo, else from the
    choice's first."""
    sequences = {}
    for prompt, choices in zip(ids, per_prompt):
        for c in choices:
            sequences.setdefault(tuple(prompt + c.ids), None)
    keys = list(sequences)
    results = await served.worker.submit(Score(tuple(keys), top))
    scores = dict(zip(keys, results))
    out = []
    for prompt, text, choices in zip(ids, texts, per_prompt):
        row = []
        for c in choices:
            seq = prompt + c.ids
            start = 0 if echo else len(prompt)
            row.append(logprobs_object(served.model.tokenizer, seq, scores[tuple(seq)], start, top))
        out.append(row)
    return out


def chat_ids(served: Served, messages: list[Message]) -> list[int]:
    try:
        return served.model.chat_prompt([{"role": m.role, "content": m.text()} for m in messages])
    except HcxError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None


async def chat_complete(served: Served, req: ChatRequest) -> dict:
    check_model(served, req.model)
    prompt = chat_ids(served, req.messages)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
        max_tokens = served.max_model_len - len(prompt)
        if max_tokens < 1:
            raise ApiError(400, f"the conversation has {len(prompt)} tokens: no room is left "
                                f"in the model's window of {served.max_model_len} tokens",
                           param="messages")
    temperature, top_p, stops = check_common(req, max_tokens)
    check_fits(served, prompt, max_tokens)
    choices = await generate(served, prompt, max_tokens, req.n, temperature, top_p, req.seed,
                             stops)
    completion_tokens = sum(c.generated for c in choices)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": served.name,
            "choices": [{"index": j, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None, "finish_reason": c.finish_reason}
                        for j, c in enumerate(choices)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt) + completion_tokens}}

