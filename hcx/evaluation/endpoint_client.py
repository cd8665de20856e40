"""HTTP to an OpenAI-compatible server: JSON requests with retries, and the request cache.

Connection errors, timeouts, 429 (rate limited) and 5xx answers are retried with
exponential backoff and jitter (a ``Retry-After`` header, when the server sends one, says
how long to wait instead), up to ``max_retries`` times; any other 4xx is the request's
fault and is not retried. What finally fails raises :class:`EndpointError` naming the
URL, the HTTP status, the server's own message and what to do.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from hcx.errors import HcxError, require
from hcx.evaluation.request_cache import RequestCache, request_key

SERVE_HINT = "is the server running? `hcx serve CKPT` starts one"
MAX_WAIT_S = 300.0  # the longest a Retry-After is obeyed, and the backoff's ceiling


class EndpointError(HcxError, RuntimeError):
    """A request to the server failed for good. ``status``: the HTTP status (None when no
    answer came); ``server_message``: what the server said (an excerpt)."""

    def __init__(self, message: str, status: int | None = None, server_message: str = ""):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


def is_endpoint(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def base_url(url: str) -> str:
    """The server's ``/v1`` address: ``http://host:8000`` and ``http://host:8000/v1/``
    both give ``http://host:8000/v1``; a longer path (a hosted API's) is kept as given."""
    url = url.rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


def excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def server_message(response) -> str:
    """The error text of an answer: OpenAI's ``{"error": {"message"}}``, vLLM's
    ``{"message"}``, FastAPI's ``{"detail"}``, else the body itself (an excerpt)."""
    try:
        body = response.json()
    except ValueError:
        return excerpt(response.text) or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return excerpt(err["message"])
        for found in (err, body.get("message"), body.get("detail")):
            if found:
                return excerpt(found if isinstance(found, str) else json.dumps(found))
    return excerpt(response.text)


def retry_after(response) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_WAIT_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return min(max((when - datetime.now(timezone.utc)).total_seconds(), 0.0), MAX_WAIT_S)


@dataclass
class RetryPolicy:
    max_retries: int = 5
    backoff: float = 0.5  # the first wait, in seconds; doubled at every retry

    def wait(self, attempt: int) -> float:
        """Before retry ``attempt`` (1, 2, ...): exponential, plus up to 25% jitter so
        that concurrent requests refused together do not come back together."""
        base = min(self.backoff * 2 ** (attempt - 1), MAX_WAIT_S)
        return base * (1 + 0.25 * random.random())


class EndpointClient:
    """JSON requests to one server, retried as :class:`RetryPolicy` says, answered from a
    :class:`RequestCache` when one is set. Safe to use from several threads."""

    def __init__(self, url: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 600.0,
                 retry: RetryPolicy | None = None, concurrency: int = 8, log=print):
        httpx = require("httpx", "eval", purpose="evaluating a model behind an endpoint")

        self.base = base_url(url)
        # vLLM's /tokenize and /detokenize sit beside /v1, at the server's root
        self.root = self.base[: -len("/v1")] if self.base.endswith("/v1") else self.base
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        self.has_key = bool(key)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.log = log
        self.sleep = time.sleep  # tests record the waits instead of waiting
        self.cache: RequestCache | None = None
        self._lock = threading.Lock()
        self.counts = {"sent": 0, "cached": 0}  # requests answered by the server / the cache
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency,
                                max_keepalive_connections=concurrency))

    def url(self, route: str) -> str:
        """``/v1/completions`` -> ``<base>/completions``; ``/tokenize`` -> ``<root>/tokenize``."""
        return self.base + route[len("/v1"):] if route.startswith("/v1/") else self.root + route

    def use_cache(self, path: Path) -> int:
        """Answer from (and append to) the request cache at ``path``; how many it holds."""
        if self.cache is not None:
            self.cache.close()
        self.cache = RequestCache(path)
        return len(self.cache)

    def post(self, route: str, payload: dict) -> dict:
        """The server's JSON answer to ``payload`` (from the cache when it holds it)."""
        key = request_key(route, payload) if self.cache is not None else None
        if key is not None and (found := self.cache.get(key)) is not None:
            self._count("cached")
            return found
        answer = self.send("POST", route, payload)
        self._count("sent")
        if key is not None:
            self.cache.put(key, route, answer)
        return answer

    def get(self, route: str, *, retry_connect: bool = True) -> dict:
        return self.send("GET", route, None, retry_connect=retry_connect)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def send(self, method: str, route: str, payload: dict | None, *,
             retry_connect: bool = True) -> dict:
        """One request, retried; the decoded JSON object of its answer."""
        import httpx

        url = self.url(route)
        attempts = self.retry.max_retries + 1
        for attempt in range(1, attempts + 1):
            wait = None
            try:
                response = self.http.request(method, url, json=payload)
            except httpx.TimeoutException as e:
                failure = EndpointError(
                    f"{url}: no answer within {self.timeout:g} s ({type(e).__name__}) after "
                    f"{attempt} attempt(s): raise --timeout, or lower --concurrency if the "
                    "server is overloaded")
            except httpx.TransportError as e:  # refused, reset, DNS: no answer at all
                failure = EndpointError(f"cannot reach {url} ({SERVE_HINT}): {excerpt(e)}")
                if not retry_connect:
                    raise failure from e
            else:
                status = response.status_code
                if status < 400:
                    return self._decode(response, url)
                message = server_message(response)
                failure = EndpointError(
                    f"{url}: HTTP {status} after {attempt} attempt(s): {message}. "
                    f"{self._advice(status, route)}", status=status, server_message=message)
                if status != 429 and status < 500:
                    raise failure  # the request's own fault: sending it again won't help
                wait = retry_after(response)
            if attempt == attempts:
                raise failure
            wait = self.retry.wait(attempt) if wait is None else wait
            self.log(f"{url}: {excerpt(failure, 160)}; retry {attempt} of "
                     f"{self.retry.max_retries} in {wait:.1f} s")
            self.sleep(wait)
        raise AssertionError("unreachable")

    def _decode(self, response, url: str) -> dict:
        try:
            body = response.json()
        except ValueError:
            raise EndpointError(
                f"{url}: the answer (HTTP {response.status_code}) is not JSON: "
                f"{excerpt(response.text, 200)!r}; is this an OpenAI-compatible server?",
                status=response.status_code) from None
        if not isinstance(body, dict):
            raise EndpointError(f"{url}: the answer is JSON but not an object: "
                                f"{excerpt(json.dumps(body), 200)}", status=response.status_code)
        return body

    def _advice(self, status: int, route: str) -> str:
        if status in (401, 403):
            if not self.has_key:
                return (f"No API key was sent: put it in ${self.api_key_env} "
                        "(--api-key-env names another variable)")
            return f"The server refused the API key in ${self.api_key_env}"
        if status == 404:
            return (f"Does the server answer {route} (is {self.base} its /v1 address), and "
                    "does it serve the model named by --endpoint-model?")
        if status == 429:
            return "The server kept rate-limiting: lower --concurrency or raise --max-retries"
        if status >= 500:
            return "The server failed: see its log; raise --max-retries to wait longer"
        return "The server refused the request (see its message)"

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.http.close()


def field(body: dict, path: str, url: str):
    """``body``'s value at a dotted ``path`` (``choices``, ``message.content``), or an
    error naming the endpoint and the missing field."""
    value = body
    for name in path.split("."):
        if not isinstance(value, dict) or name not in value:
            raise EndpointError(f"{url}: the answer has no {path!r} field "
                                f"({excerpt(json.dumps(body), 200)}); is this an "
                                "OpenAI-compatible server?")
        value = value[name]
    return value
