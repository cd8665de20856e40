"""An evaluation model served over HTTP by an OpenAI-compatible server: ``hcx serve``,
vLLM, SGLang, or a hosted API.

- **Log-likelihoods** are asked the way lm-evaluation-harness's ``local-completions``
  asks them: ``/v1/completions`` with the context and continuation token ids as the
  prompt, ``echo: true, logprobs: 1, max_tokens: 1, temperature: 0``. The server answers
  the log-probability of every prompt token (``token_logprobs``) and the most likely
  token at each position (``top_logprobs``); a continuation's log-likelihood is the sum
  over its positions, and it is greedy where each of its tokens is as likely as the most
  likely one (lm-eval's test). The continuations of one question go in one request.
- **Generation**: conversations (and ``--chat`` prompts) go to ``/v1/chat/completions``,
  where the server renders its chat template; plain prompts go to ``/v1/completions``
  as token ids cut to the window like in-process evaluation (as text when no tokenizer
  is at hand). Stop strings are sent and applied here too; a sampled request carries its
  own seed, so results do not depend on concurrency or order.
- Token ids come from a local Hugging Face tokenizer (``--tokenizer``) or the server's
  ``/tokenize`` and ``/detokenize`` routes (vLLM's, which hcx serve has too).

All the requests of a call are sent ``concurrency`` at a time; answers are kept in the
request cache (:mod:`hcx.evaluation.request_cache`) when one is set, so a run that is
started again resends nothing already answered.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from hcx.evaluation.endpoint_client import EndpointClient, EndpointError, RetryPolicy, excerpt, field
from hcx.evaluation.language_model import (
    Budget,
    ChoiceRequest,
    GenerationRequest,
    LanguageModel,
    Sampling,
    Score,
    cut_at_stop,
)

APIS = ("completions", "chat")
REQUEST_CACHE = "requests.jsonl"  # in the run directory


class LoglikelihoodUnsupported(EndpointError):
    """The endpoint gives no log-probabilities of prompt tokens (a chat API, or a
    completions API without echo and logprobs)."""


@dataclass
class EndpointOptions:
    """How to talk to the server (``hcx eval URL`` flags of the same names)."""

    model: str | None = None  # --endpoint-model; default: the only model the server lists
    api_key_env: str = "OPENAI_API_KEY"  # sent as "Authorization: Bearer" when set
    concurrency: int = 8  # requests in flight at once
    timeout: float = 600.0  # seconds for one answer
    max_retries: int = 5
    api: str = "completions"  # or "chat": chat completions only (no log-likelihoods)
    tokenizer: str | None = None  # a local HF tokenizer directory, else the server's /tokenize
    max_length: int | None = None  # the model's window, else max_model_len from /v1/models
    cache: Path | None = None  # the request cache (JSONL); None: no cache
    backoff: float = 0.5  # seconds before the first retry (doubled at each one)

    def check(self) -> None:
        problems = []
        if self.api not in APIS:
            problems.append(f"--api must be one of {', '.join(APIS)}, not {self.api!r}")
        if self.concurrency < 1:
            problems.append(f"--concurrency must be at least 1 (got {self.concurrency})")
        if self.max_retries < 0:
            problems.append(f"--max-retries must be 0 or more (got {self.max_retries})")
        if self.timeout <= 0:
            problems.append(f"--timeout must be positive (got {self.timeout:g})")
        if self.max_length is not None and self.max_length < 3:
            problems.append(f"--max-length must be at least 3 (got {self.max_length})")
        if problems:
            raise EndpointError("; ".join(problems))


def endpoint_dir_name(url: str, model: str | None) -> str:
    """A run directory name for a served model: ``<model>@<host>-<port>``
    (``Qwen/Qwen2.5-7B`` served on localhost:8000 -> ``Qwen2.5-7B@localhost-8000``)."""
    parts = urlsplit(url)
    where = "-".join(str(p) for p in (parts.hostname or "endpoint", parts.port) if p)
    if not model:
        return where
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in model.rstrip("/").split("/")[-1])
    return f"{name}@{where}"


class EndpointModel(LanguageModel):
    """A model behind an OpenAI-compatible server (``path``: its ``/v1`` URL; ``name``:
    the served model's id)."""

    kind = "endpoint"

    def __init__(self, url: str, options: EndpointOptions | None = None, log=print):
        self.options = options = options or EndpointOptions()
        options.check()
        self.log = log
        self.client = EndpointClient(
            url, api_key_env=options.api_key_env, timeout=options.timeout,
            retry=RetryPolicy(options.max_retries, options.backoff),
            concurrency=options.concurrency, log=log)
        self.path = self.client.base
        if options.api_key_env != "OPENAI_API_KEY" and not self.client.has_key:
            log(f"${options.api_key_env} is not set: requests carry no API key")
        self.budget = Budget()  # unused: the server batches; concurrency bounds the load
        try:
            entry = self._served_model()
        except BaseException:
            self.client.close()
            raise
        self.name = entry["id"]
        self.max_length = options.max_length or entry.get("max_model_len") or 0
        if not self.max_length and options.api == "completions":
            self.client.close()
            raise EndpointError(
                f"{self.path}: the server does not say the model's context window "
                "(no max_model_len in /v1/models): give --max-length N")
        self._eos = entry.get("eos_token_id")
        self._tokenizer = None
        if options.tokenizer:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(options.tokenizer, local_files_only=True)
        self._remote_tokenizer = True  # until /tokenize says it is not there
        if options.cache is not None:
            self.use_request_cache(options.cache)

    # --- the served model ---------------------------------------------------------
    def _served_model(self) -> dict:
        """The ``/v1/models`` entry of the model to evaluate (``{"id": name}`` alone when
        the server lists none but --endpoint-model names it)."""
        wanted = self.options.model
        try:
            # A server that is not up is reported at once, not retried for minutes.
            body = self.client.get("/v1/models", retry_connect=False)
        except EndpointError as e:
            if wanted and e.status is not None and e.status < 500 and e.status not in (401, 403):
                return {"id": wanted}  # a server without the listing route: take the name
            raise
        listed = field(body, "data", self.client.url("/v1/models"))
        entries = [m for m in listed if isinstance(m, dict) and "id" in m] if isinstance(listed, list) else []
        names = [m["id"] for m in entries]
        if wanted:
            found = [m for m in entries if m["id"] == wanted]
            if found:
                return found[0]
            if names:
                raise EndpointError(f"{self.path} serves {', '.join(names)}, not {wanted!r}: "
                                    "give one of these as --endpoint-model")
            return {"id": wanted}
        if len(names) == 1:
            return entries[0]
        if not names:
            raise EndpointError(f"{self.path}: /v1/models lists no model: name the model with "
                                "--endpoint-model")
        raise EndpointError(f"{self.path} serves several models ({', '.join(names)}): choose "
                            "one with --endpoint-model")

    def use_request_cache(self, path: Path) -> None:
        """Keep every answer in the JSONL file ``path`` and answer from it first."""
        held = self.client.use_cache(Path(path))
        self.log(f"request cache {path}: {held} answers stored" if held
                 else f"request cache {path}: empty")

    # --- tokenizer ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self._tokenizer is not None:
            return self._tokenizer.encode(text, add_special_tokens=False)
        try:
            body = self.client.post("/tokenize", {"model": self.name, "prompt": text,
                                                  "add_special_tokens": False})
        except EndpointError as e:
            if e.status in (404, 405, 501):
                raise EndpointError(
                    f"{self.client.url('/tokenize')}: the server has no /tokenize route "
                    "(vLLM and hcx serve have one; hosted APIs do not): give --tokenizer DIR, "
                    "the served model's Hugging Face tokenizer", status=e.status) from e
            raise
        return [int(t) for t in field(body, "tokens", self.client.url("/tokenize"))]

    def decode(self, ids: list[int]) -> str:
        if self._tokenizer is not None:
            return self._tokenizer.decode(ids, skip_special_tokens=True)
        body = self.client.post("/detokenize", {"model": self.name, "tokens": list(ids)})
        return field(body, "prompt", self.client.url("/detokenize"))

    @property
    def eot_id(self) -> int:
        if self._eos is not None:
            return int(self._eos[0] if isinstance(self._eos, list) else self._eos)
        if self._tokenizer is not None and self._tokenizer.eos_token_id is not None:
            return self._tokenizer.eos_token_id
        raise EndpointError(f"{self.path}: the end-of-text token id is needed (a question with "
                            "an empty context) and /v1/models does not give it: give "
                            "--tokenizer DIR")

    # --- scoring --------------------------------------------------------------------
    def loglikelihood(self, requests: list[ChoiceRequest], desc: str = "score") -> list[list[Score]]:
        """Scores of every continuation of every request, in the input order: one
        ``/v1/completions`` request per question, ``concurrency`` at a time."""
        if self.options.api == "chat":
            raise self._unsupported(desc, "--api chat: chat completions give no "
                                          "log-probabilities of a prompt")
        # The prompt holds the context, the whole continuation and one generated token:
        # two more than in-process scoring reads, so the context is fitted 2 tokens
        # shorter (the server refuses more than its window).
        cut = [self._fit(r, self.max_length - 2) for r in requests]
        route = "/v1/completions"
        jobs = [self._score_job(route, r, desc) for r in cut]
        return self._fan_out(jobs, desc, route)

    def _score_job(self, route: str, r: ChoiceRequest, desc: str) -> Callable[[], list[Score]]:
        payload = {"model": self.name, "prompt": [r.context + c for c in r.continuations],
                   "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}

        def job() -> list[Score]:
            try:
                body = self.client.post(route, payload)
            except EndpointError as e:
                said = e.server_message.lower()
                if e.status in (400, 422, 501) and ("echo" in said or "logprob" in said):
                    raise self._unsupported(desc, f"it refused echo/logprobs: {e.server_message}") from e
                raise
            return self._parse_scores(body, r, desc)

        return job

    def _parse_scores(self, body: dict, r: ChoiceRequest, desc: str) -> list[Score]:
        url = self.client.url("/v1/completions")
        choices = field(body, "choices", url)
        if not isinstance(choices, list) or len(choices) != len(r.continuations):
            raise EndpointError(f"{url}: {len(r.continuations)} prompts sent, "
                                f"{len(choices) if isinstance(choices, list) else 'no'} choices "
                                "answered")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        start = len(r.context)
        scores = []
        for choice, cont in zip(choices, r.continuations):
            logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
            if not logprobs or logprobs.get("token_logprobs") is None:
                raise self._unsupported(desc, "its /v1/completions answered without logprobs")
            tokens = logprobs["token_logprobs"]
            top = field(logprobs, "top_logprobs", url)
            end = start + len(cont)
            if len(tokens) < end or not isinstance(top, list) or len(top) < end:
                raise self._unsupported(
                    desc, f"it echoed {len(tokens)} prompt log-probabilities for a prompt of "
                          f"{end} tokens")
            own = tokens[start:end]
            if any(lp is None for lp in own) or any(not t for t in top[start:end]):
                raise EndpointError(f"{url}: a continuation position has no log-probability "
                                    f"(token_logprobs {excerpt(own, 120)})")
            # lm-eval's greedy test: each token as likely as the most likely one there
            greedy = all(lp >= max(t.values()) for lp, t in zip(own, top[start:end]))
            scores.append(Score(float(sum(own)), greedy))
        return scores

    def _unsupported(self, desc: str, reason: str) -> LoglikelihoodUnsupported:
        task = f"task {desc}" if desc != "score" else "this task"
        return LoglikelihoodUnsupported(
            f"{task} needs log-likelihoods of prompt tokens, which {self.path} does not give "
            f"({reason}): run it with --mc-mode generate, or serve the model with hcx serve / "
            "vLLM (their /v1/completions echo prompt log-probabilities)")

    def _score(self, requests: list[ChoiceRequest]) -> list[list[Score]]:
        return self.loglikelihood(requests)

    # --- generation -----------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], desc: str = "generate") -> list[str]:
        """Continuations cut at the first stop string, in the input order."""
        chat = [r.chat or isinstance(r.prompt, list) or self.options.api == "chat" for r in requests]
        jobs = [self._chat_job(r) if c else self._completion_job(r) for r, c in zip(requests, chat)]
        routes = {"/v1/chat/completions" if c else "/v1/completions" for c in chat}
        return self._fan_out(jobs, desc, " and ".join(sorted(routes)))

    def _sampling(self, r: GenerationRequest) -> dict:
        """The request's sampling settings: greedy, or its own temperature, top-p and
        seed (each request carries the seed kinds gave it, so a run is reproduced
        whatever the order in which requests are answered)."""
        if r.temperature <= 0:
            return {"temperature": 0}
        return {"temperature": r.temperature, "top_p": r.top_p, "seed": r.seed}

    def _chat_job(self, r: GenerationRequest) -> Callable[[], str]:
        messages = r.prompt if isinstance(r.prompt, list) else [{"role": "user", "content": r.prompt}]
        payload = {"model": self.name, "messages": messages, "max_tokens": r.max_new_tokens,
                   **self._sampling(r), **({"stop": list(r.stop)} if r.stop else {})}
        route = "/v1/chat/completions"

        def job() -> str:
            body = self.client.post(route, payload)
            text = field(self._first_choice(body, route), "message.content", self.client.url(route))
            return cut_at_stop(text or "", r.stop)  # a refused answer (null) counts as empty

        return job

    def _completion_job(self, r: GenerationRequest) -> Callable[[], str]:
        route = "/v1/completions"

        def job() -> str:
            payload = {"model": self.name, "prompt": self._prompt(r), "max_tokens": r.max_new_tokens,
                       **self._sampling(r), **({"stop": list(r.stop)} if r.stop else {})}
            body = self.client.post(route, payload)
            text = field(self._first_choice(body, route), "text", self.client.url(route))
            return cut_at_stop(text or "", r.stop)

        return job

    def _prompt(self, r: GenerationRequest) -> list[int] | str:
        """Token ids cut to the window as in-process evaluation cuts them, or the text
        when no tokenizer is at hand (the server then refuses what does not fit)."""
        if self._tokenizer is None and not self._remote_tokenizer:
            return r.prompt
        try:
            ids = self.encode(r.prompt)
        except EndpointError as e:
            if self._tokenizer is not None or e.status not in (404, 405, 501):
                raise
            if self._remote_tokenizer:
                self._remote_tokenizer = False
                self.log(f"{self.path}: no /tokenize route; prompts are sent as text, uncut "
                         "(--tokenizer DIR cuts them to the window)")
            return r.prompt
        return self._fit_prompt(ids, r.max_new_tokens)

    def _first_choice(self, body: dict, route: str) -> dict:
        choices = field(body, "choices", self.client.url(route))
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EndpointError(f"{self.client.url(route)}: the answer's 'choices' is empty "
                                f"({excerpt(body, 200)})")
        return choices[0]

    def _generate(self, prompts: list[list[int]], max_new_tokens: int,
                  stops: tuple[str, ...], sampling: Sampling | None = None) -> list[str]:
        # Only the base class's generate calls this, and generate is overridden above.
        raise NotImplementedError("EndpointModel.generate sends requests itself")

    # --- fan-out ----------------------------------------------------------------------
    def _fan_out(self, jobs: list[Callable], desc: str, route: str) -> list:
        """Run ``jobs`` ``concurrency`` at a time; their results in the input order. The
        first failure stops the call (requests not yet started are dropped)."""
        counts = dict(self.client.counts)
        results: list = [None] * len(jobs)
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency,
                                  thread_name_prefix="hcx-endpoint")
        try:
            with self._progress(len(jobs), desc) as bar:
                futures = {pool.submit(job): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
        except BaseException as e:
            pool.shutdown(wait=False, cancel_futures=True)
            if isinstance(e, KeyboardInterrupt):
                # Requests in flight would keep the process alive until they end (up to
                # --timeout): closing the connections ends them now.
                self.client.close()
            raise
        pool.shutdown()
        cached = self.client.counts["cached"] - counts["cached"]
        sent = self.client.counts["sent"] - counts["sent"]
        if cached:
            self.log(f"{desc}: {cached} of {cached + sent} requests ({route} and tokenization) "
                     "answered from the request cache")
        return results

    def close(self) -> None:
        self.client.close()
