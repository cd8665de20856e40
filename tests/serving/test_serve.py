"""``hcx serve`` as a client sees it: one server process on the tiny SFT checkpoint
(and a ``--tp 2`` one), checked against HcxModel in this process."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow


class Server:
    """A running ``hcx serve``: its process, base URL and stderr file."""

    def __init__(self, checkpoint, tmp_path, *args: str):
        self.log = open(tmp_path / "serve.stderr", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hcx.cli", "serve", str(checkpoint), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self) -> Server:
        """Read the ready line (the URL)."""
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in iter(self.proc.stdout.readline, "")]
                         + [lines.put("")], daemon=True).start()
        try:
            ready = lines.get(timeout=300)
        except queue.Empty:
            ready = ""
        if not ready.startswith("serving "):
            self.close()
            raise AssertionError(f"hcx serve did not start: {ready!r}\n{self.stderr()[-4000:]}")
        self.url = ready.split(" on ")[1].strip()
        self.root = self.url.removesuffix("/v1")
        self.client = httpx.Client(timeout=300)
        return self

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.client.post(self.url + path, json=body)

    def stderr(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(sft_checkpoint, tmp_path_factory, request):
    s = Server(sft_checkpoint, tmp_path_factory.mktemp("serve"), "--max-batch", "8")
    try:
        request.getfixturevalue("local")  # loads while the server starts
        yield s.wait_ready()
    finally:
        s.close()


@pytest.fixture(scope="module")
def local(sft_checkpoint):
    """The same checkpoint in this process, as hcx eval opens it."""
    from hcx.evaluation.models import HcxModel

    model = HcxModel(str(sft_checkpoint), log=lambda *a: None)
    yield model
    model.close()


QUICK = ["--tasks", "quick", "--limit", "6", "--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def in_process_quick(local, tmp_path_factory) -> dict:
    """Every metric of the quick suite (one task of every kind) evaluated in this process:
    what ``hcx eval CKPT --tasks quick --limit 6 --max-new-tokens 16`` gives."""
    from hcx.evaluation.runner import evaluate
    from hcx.evaluation.tasks import resolve_tasks

    out = tmp_path_factory.mktemp("quick") / "in-process"
    evaluate(local, resolve_tasks(["quick"]), out, limit=6, max_new_tokens=16, log=lambda *a: None)
    return quick_scores(out)


def quick_scores(run) -> dict:
    import json

    tasks = json.loads((run / "scores.json").read_text())["tasks"]
    return {f"{t}/{m}": v["value"] for t, e in tasks.items() for m, v in e["metrics"].items()}


def eval_through(server, out) -> dict:
    """``hcx eval URL`` on the quick suite, through the endpoint client."""
    from tests.conftest import hcx

    hcx("eval", server.url, *QUICK, "--out", str(out))
    return quick_scores(out)


def test_eval_through_the_endpoint_equals_in_process(server, in_process_quick, tmp_path):
    """The quick suite through ``hcx eval URL`` (log-likelihoods from echoed logprobs,
    greedy generation, chat-free prompts as token ids) scores exactly as in process."""
    got = eval_through(server, tmp_path / "endpoint")
    assert len({k.split("/")[0] for k in got}) == 9
    assert got == in_process_quick


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def test_models_health_and_tokenize(server, local):
    models = ok(server.client.get(server.url + "/models"))
    [card] = models["data"]
    assert card["id"] == "run" and card["object"] == "model"
    assert card["max_model_len"] == local.max_length and card["eos_token_id"] == local.eot_id
    assert ok(server.client.get(server.root + "/health"))["status"] == "ok"
    text = "대한민국의 수도는 서울"
    tokens = ok(server.client.post(server.root + "/tokenize", json={"prompt": text}))
    assert tokens["tokens"] == local.encode(text) and tokens["count"] == len(tokens["tokens"])
    back = ok(server.client.post(server.root + "/detokenize", json={"tokens": tokens["tokens"]}))
    assert back["prompt"] == local.decode(tokens["tokens"])
    info = ok(server.client.get(server.root + "/tokenizer_info"))
    assert info["eos_token_id"] == local.eot_id and info["vocab_size"] == local.vocab


def test_completions_equal_in_process_generation(server, local):
    from hcx.evaluation.models import GenerationRequest

    cases = [(GenerationRequest("대한민국의 수도는", 12), {}),
             (GenerationRequest("Hello", 20, stop=("a", "e")), {"stop": ["a", "e"]}),
             (GenerationRequest("옛날 옛적에", 10, temperature=0.8, top_p=0.9, seed=7),
              {"temperature": 0.8, "top_p": 0.9, "seed": 7})]
    for request, extra in cases:
        body = {"model": "run", "prompt": request.prompt, "max_tokens": request.max_new_tokens,
                "temperature": 0, **extra}
        got = ok(server.post("/completions", body))
        [choice] = got["choices"]
        assert choice["text"] == local.generate([request])[0]
        assert got["object"] == "text_completion" and choice["finish_reason"] in ("stop", "length")
    # several prompts, one choice each, in order; as texts or token ids
    want = local.generate([GenerationRequest("서울은", 5), GenerationRequest("Hello", 5)])
    for prompt in (["서울은", "Hello"], [local.encode("서울은"), local.encode("Hello")]):
        got = ok(server.post("/completions", {"prompt": prompt, "max_tokens": 5,
                                              "temperature": 0}))
        assert [c["index"] for c in got["choices"]] == [0, 1]
        assert [c["text"] for c in got["choices"]] == want


def scored(server, context: list[int], continuation: list[int], max_tokens: int):
    """Log-probability of ``continuation`` and whether it is greedy, read from an echo
    request as lm-eval's local-completions model reads it."""
    got = ok(server.post("/completions", {"prompt": context + continuation, "echo": True,
                                          "max_tokens": max_tokens, "logprobs": 1,
                                          "temperature": 0}))
    lp = got["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    span = range(len(context), len(context) + len(continuation))
    greedy = all(max(lp["top_logprobs"][i], key=lp["top_logprobs"][i].get) == lp["tokens"][i]
                 for i in span)
    return sum(lp["token_logprobs"][i] for i in span), greedy


def test_echo_logprobs_equal_loglikelihood(server, local):
    from hcx.evaluation.models import ChoiceRequest

    def tokenize(text):
        return ok(server.client.post(server.root + "/tokenize", json={"prompt": text}))["tokens"]

    context = tokenize("대한민국의 수도는")
    continuations = [tokenize("대한민국의 수도는 서울입니다")[len(context):],
                     local.generations([context], 3, ())[0].ids]  # the greedy one
    scores = local.loglikelihood([ChoiceRequest(context, continuations)])[0]
    assert [s.greedy for s in scores] == [False, True]
    for cont, want in zip(continuations, scores):
        for max_tokens in (0, 1):
            logprob, greedy = scored(server, context, cont, max_tokens)
            assert logprob == pytest.approx(want.logprob, abs=1e-4)
            assert greedy == want.greedy


def test_chat_two_turns(server, local):
    from hcx.evaluation.models import GenerationRequest

    conversation = [{"role": "system", "content": "짧게 답하세요."},
                    {"role": "user", "content": "수도는?"},
                    {"role": "assistant", "content": "서울입니다."},
                    {"role": "user", "content": "왜요?"}]
    got = ok(server.post("/chat/completions", {"model": "run", "messages": conversation,
                                               "max_tokens": 10, "temperature": 0}))
    [choice] = got["choices"]
    assert got["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == local.generate([GenerationRequest(conversation, 10)])[0]
    assert got["usage"]["prompt_tokens"] == len(local.chat_prompt(conversation))


def comparable(response: dict) -> dict:
    return {k: v for k, v in response.items() if k not in ("id", "created")}


def assert_same(got, want, path="response"):
    """Equal JSON, floats within 1e-5 (batching changes summation order, not results)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, path


def load_requests() -> list[tuple[str, dict]]:
    prompts = ["대한민국의 수도는", "Hello", "옛날 옛적에 호랑이가", "The weather today is",
               "서울은", "a b c", "파이썬으로", "Once upon a time"]
    reqs = []
    for i, p in enumerate(prompts):
        reqs.append(("/completions", {"prompt": p, "max_tokens": 4 + i % 3, "temperature": 0}))
        reqs.append(("/completions", {"prompt": p, "max_tokens": 6, "temperature": 0.9,
                                      "seed": i, "n": 1 + i % 2}))
        reqs.append(("/completions", {"prompt": p + " 입니다", "max_tokens": 0, "echo": True,
                                      "logprobs": 2, "temperature": 0}))
        reqs.append(("/chat/completions", {"messages": [{"role": "user", "content": p}],
                                           "max_tokens": 5, "temperature": 0}))
    reqs.append(("/completions", {"prompt": prompts[:3], "max_tokens": 3, "temperature": 0,
                                  "logprobs": 1}))
    return reqs


def test_concurrent_load_gives_the_answers_of_requests_alone(server):
    requests = load_requests()
    alone = [comparable(ok(server.post(path, body))) for path, body in requests]
    order = [i % len(requests) for i in range(6 * len(requests))]  # 198 requests
    random.Random(0).shuffle(order)

    def send(i):
        with httpx.Client(timeout=300) as client:
            path, body = requests[i]
            return i, client.post(server.url + path, json=body)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(send, order))
    for i, response in results:
        assert_same(comparable(ok(response)), alone[i], f"request {i} {requests[i]}")
    assert "model call failed" not in server.stderr()
    # requests did share model calls
    assert ok(server.client.get(server.root + "/health"))["largest_batch"] > 1


BAD = [
    ("malformed JSON", "/completions", b'{"prompt": "x",', 400, None),
    ("unknown model", "/completions", {"model": "gpt-5", "prompt": "x"}, 404, "model"),
    ("prompt + max_tokens over the window", "/completions",
     {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("negative max_tokens", "/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens 0 without echo", "/completions", {"prompt": "x", "max_tokens": 0}, 400,
     "max_tokens"),
    ("negative temperature", "/completions", {"prompt": "x", "temperature": -0.5}, 400,
     "temperature"),
    ("top_p 0", "/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p over 1", "/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
    ("logprobs 6", "/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("n 0", "/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("prompt of a wrong type", "/completions", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("no prompt", "/completions", {"max_tokens": 3}, 400, "prompt"),
    ("max_tokens not a number", "/completions", {"prompt": "x", "max_tokens": "many"}, 400,
     "max_tokens"),
    ("empty prompt", "/completions", {"prompt": ""}, 400, "prompt"),
    ("token id outside the vocabulary", "/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("unknown role", "/chat/completions", {"messages": [{"role": "robot", "content": "x"}]},
     400, "messages"),
    ("streaming", "/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
]


@pytest.mark.parametrize("what,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, what, path, body, status, param):
    if isinstance(body, bytes):
        response = server.client.post(server.url + path, content=body,
                                      headers={"content-type": "application/json"})
    else:
        response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    if param:
        assert param in error["message"] or what == "unknown model"
    # still serving
    assert ok(server.post("/completions", {"prompt": "x", "max_tokens": 1, "temperature": 0}))


def test_tp2_server_answers_as_tp1(server, sft_checkpoint, in_process_quick, tmp_path):
    """A --tp 2 server answers as the one-process server, and hcx eval through it scores
    the quick suite exactly as in process."""
    requests = [{"prompt": "대한민국의 수도는", "max_tokens": 8, "temperature": 0},
                {"prompt": "Hello world, this is", "max_tokens": 0, "echo": True, "logprobs": 2,
                 "temperature": 0}]
    want = [comparable(ok(server.post("/completions", r))) for r in requests]
    tp2 = Server(sft_checkpoint, tmp_path, "--tp", "2")
    try:
        tp2.wait_ready()
        got = [comparable(ok(tp2.post("/completions", r))) for r in requests]
        assert got[0] == want[0]
        g, w = got[1]["choices"][0]["logprobs"], want[1]["choices"][0]["logprobs"]
        assert g["tokens"] == w["tokens"] and g["text_offset"] == w["text_offset"]
        assert g["token_logprobs"][1:] == pytest.approx(w["token_logprobs"][1:], abs=1e-4)
        assert eval_through(tp2, tmp_path / "endpoint-tp2") == in_process_quick
        tp2.proc.send_signal(signal.SIGTERM)
        assert tp2.proc.wait(timeout=120) == 0, tp2.stderr()[-4000:]
    finally:
        tp2.close()


def test_sigterm_answers_requests_in_flight_then_exits_0(server):
    """Last: it stops the module's server."""
    prompts = ["대한민국의", "Hello", "옛날", "The", "서울", "파이썬"]

    def send(prompt):
        with httpx.Client(timeout=300) as client:
            return client.post(server.url + "/completions",
                               json={"prompt": prompt, "max_tokens": 200, "temperature": 0})

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(send, p) for p in prompts]
        deadline = time.monotonic() + 120
        while True:  # until every request not yet answered is being answered
            busy = ok(server.client.get(server.root + "/health"))["requests"]
            if busy and busy == sum(not f.done() for f in futures):
                break
            assert time.monotonic() < deadline, "the requests never arrived"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    for r in responses:
        assert ok(r)["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.proc.wait(timeout=60) == 0, server.stderr()[-4000:]
    assert "stopped (SIGTERM)" in server.stderr()

