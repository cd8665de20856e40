"""Endpoint models against a fake OpenAI-compatible server (a stdlib HTTP server in a
thread) backed by a toy model whose answers are computed by hand: log-likelihoods and
greedy flags, generation and chat, the API key, retries, errors, concurrency, the request
cache, chat-only endpoints, and one ``hcx eval URL`` run end to end."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hcx.evaluation import tasks as T
from hcx.evaluation.endpoint import EndpointModel, EndpointOptions, LoglikelihoodUnsupported
from hcx.evaluation.endpoint_client import EndpointError
from hcx.evaluation.models import ChoiceRequest, GenerationRequest, ModelOpenError, open_model
from hcx.evaluation.runner import evaluate, model_identity
from tests.conftest import hcx
from tests.evaluation.test_tasks import write_task

# --- the toy model: characters are tokens; after character p it expects chr(p + 1) ----

VOCAB = 256
HIT = math.log(0.5)  # the expected next character
MISS = math.log(0.5 / (VOCAB - 1))  # any other


def next_char(c: str) -> str:
    return chr((ord(c) + 1) % VOCAB)


def toy_logprob(prev: str, tok: str) -> float:
    return HIT if tok == next_char(prev) else MISS


def toy_continue(text: str, n: int) -> str:
    """Greedy decoding: count up from the last character."""
    out, c = "", text[-1] if text else "a"
    for _ in range(n):
        c = next_char(c)
        out += c
    return out


class FakeServer:
    """What the handler serves and what it saw."""

    def __init__(self):
        self.models = [{"id": "toy", "object": "model", "max_model_len": 64, "eos_token_id": 0}]
        self.script: list[tuple[str, int, dict, bytes]] = []  # (route prefix, status, headers, body)
        self.requests: list[dict] = []
        self.logprobs = True  # False: completions answer without logprobs
        self.chat_only = False  # True: /v1/completions is 404
        self.tokenize = True  # False: no /tokenize route (a hosted API)
        self.barrier: threading.Barrier | None = None  # holds completion requests together
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()

    def sent(self, prefix: str = "/") -> list[dict]:
        return [r for r in self.requests if r["path"].startswith(prefix)]

    def answer(self, method: str, path: str, headers, body: dict | None) -> tuple[int, dict, bytes]:
        with self.lock:
            self.requests.append({"method": method, "path": path, "headers": dict(headers),
                                  "body": body})
            for i, (prefix, status, extra, raw) in enumerate(self.script):
                if path.startswith(prefix):
                    del self.script[i]
                    return status, extra, raw
        if path == "/v1/models":
            return ok({"object": "list", "data": self.models})
        if path == "/tokenize" and self.tokenize:
            return ok({"tokens": [ord(c) for c in body["prompt"]]})
        if path == "/detokenize":
            return ok({"prompt": "".join(map(chr, body["tokens"]))})
        if path == "/v1/completions" and not self.chat_only:
            if self.barrier is not None:
                self.barrier.wait(timeout=10)
            return ok(self.completions(body))
        if path == "/v1/chat/completions":
            last = body["messages"][-1]["content"]
            text = ("you said " + last)[: body["max_tokens"]]
            return ok({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "length"}]})
        return 404, {}, json.dumps({"detail": "Not Found"}).encode()

    def completions(self, body: dict) -> dict:
        prompts = body["prompt"]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        choices = []
        for i, p in enumerate(prompts):
            text = p if isinstance(p, str) else "".join(map(chr, p))
            out = toy_continue(text, body["max_tokens"])  # stop strings are left to the client
            if body.get("temperature", 0) > 0:
                out = f"[{body['seed']}]{out}"[: body["max_tokens"]]
            choice = {"index": i, "text": out, "finish_reason": "length", "logprobs": None}
            if body.get("echo") and body.get("logprobs") and self.logprobs:
                whole = text + out
                lps = [None] + [toy_logprob(a, b) for a, b in zip(whole, whole[1:])]
                top = [None] + [{next_char(a): HIT, b: toy_logprob(a, b)} for a, b in zip(whole, whole[1:])]
                choice["logprobs"] = {"tokens": list(whole), "token_logprobs": lps,
                                      "top_logprobs": top, "text_offset": list(range(len(whole)))}
                choice["text"] = whole
            choices.append(choice)
        return {"object": "text_completion", "model": body["model"], "choices": choices}


def ok(payload: dict) -> tuple[int, dict, bytes]:
    return 200, {}, json.dumps(payload).encode()


@pytest.fixture
def server():
    state = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def handle_one(self, method):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw) if raw else None
            with state.lock:
                state.inflight += 1
                state.max_inflight = max(state.max_inflight, state.inflight)
            try:
                status, extra, data = state.answer(method, self.path, self.headers, body)
            finally:
                with state.lock:
                    state.inflight -= 1
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **extra}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.handle_one("GET")

        def do_POST(self):
            self.handle_one("POST")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def open_toy(server: FakeServer, log=None, **options) -> EndpointModel:
    model = EndpointModel(server.url, EndpointOptions(backoff=0.001, **options),
                          log=log or (lambda m: None))
    model.waits = []
    model.client.sleep = model.waits.append  # record the backoff instead of waiting
    return model


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


# --- log-likelihoods, generation, chat ------------------------------------------------


def test_loglikelihoods_and_greedy_flags_are_the_toy_models(server):
    model = open_toy(server)
    assert (model.name, model.max_length, model.kind, model.eot_id) == ("toy", 64, "endpoint", 0)
    assert model.encode("ab") == [97, 98] and model.decode([97, 98]) == "ab"
    scores = model.loglikelihood([ChoiceRequest(ids("ab"), [ids("cd"), ids("x")]),
                                  ChoiceRequest(ids("q"), [ids("rst")])])
    # "ab|cd": c after b and d after c are expected (greedy); "ab|x": x after b is not
    assert [(s.logprob, s.greedy) for s in scores[0]] == [(pytest.approx(2 * HIT), True),
                                                          (pytest.approx(MISS), False)]
    assert scores[1][0].logprob == pytest.approx(3 * HIT) and scores[1][0].greedy
    # one request per question, its continuations as a prompt list, lm-eval's settings
    asked = [r["body"] for r in server.sent("/v1/completions")]
    assert sorted(len(b["prompt"]) for b in asked) == [1, 2]
    first = next(b for b in asked if len(b["prompt"]) == 2)
    assert first["prompt"] == [ids("abcd"), ids("abx")]
    assert {k: first[k] for k in ("echo", "logprobs", "max_tokens", "temperature")} == \
        {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}


def test_long_questions_keep_the_last_context_tokens(server):
    # a 6-token window: the prompt holds context + continuation + 1 generated token,
    # so context + continuation is cut to 5 tokens, the context losing its first ones
    model = open_toy(server, max_length=6)
    score, = model.loglikelihood([ChoiceRequest(ids("abcdef"), [ids("gh")])])[0]
    assert server.sent("/v1/completions")[0]["body"]["prompt"] == [ids("defgh")]
    assert score.logprob == pytest.approx(2 * HIT) and score.greedy


def test_generation_and_chat_routes(server):
    model = open_toy(server, max_length=16)
    out = model.generate([
        GenerationRequest("0123456789abcdefghij", max_new_tokens=4),  # cut to the last 12
        GenerationRequest("abc", max_new_tokens=5, stop=("f",)),      # the stop cut here too
        GenerationRequest("hello", max_new_tokens=40, chat=True),
        GenerationRequest([{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "hi"}], max_new_tokens=40),
        GenerationRequest("abc", max_new_tokens=6, temperature=0.7, top_p=0.9, seed=42),
    ])
    assert out == ["klmn", "de", "you said hello", "you said hi", "[42]de"]
    plain = [r["body"] for r in server.sent("/v1/completions")]
    assert ids("89abcdefghij") in [b["prompt"] for b in plain]  # fitted token ids: 16 - 4 = 12
    assert next(b for b in plain if b["max_tokens"] == 5)["stop"] == ["f"]
    sampled = next(b for b in plain if b["temperature"] > 0)
    assert (sampled["top_p"], sampled["seed"]) == (0.9, 42)
    chats = [r["body"]["messages"] for r in server.sent("/v1/chat/completions")]
    assert [{"role": "user", "content": "hello"}] in chats and len(chats) == 2


def test_api_key_comes_from_the_named_variable(server, monkeypatch):
    monkeypatch.setenv("HCX_TEST_KEY", "sekrit")
    open_toy(server, api_key_env="HCX_TEST_KEY").generate([GenerationRequest("a", 2)])
    assert {r["headers"].get("Authorization") for r in server.requests} == {"Bearer sekrit"}
    server.requests.clear()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    open_toy(server).generate([GenerationRequest("a", 2)])
    assert all("Authorization" not in r["headers"] for r in server.requests)


def test_a_local_tokenizer_or_none(server, tmp_path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = Tokenizer(models.WordLevel(vocab={chr(i): i for i in range(VOCAB)}, unk_token=chr(0)))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    chars.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=chars, eos_token=chr(3)).save_pretrained(tmp_path)
    server.models[0].pop("eos_token_id")
    model = open_toy(server, tokenizer=str(tmp_path), max_length=8)
    assert (model.encode("abc"), model.decode([97, 98]), model.eot_id) == ([97, 98, 99], "ab", 3)
    assert model.generate([GenerationRequest("0123456789", 2)]) == [":;"]
    assert server.sent("/v1/completions")[0]["body"]["prompt"] == ids("456789")
    assert not server.sent("/tokenize")

    server.tokenize, logged = False, []  # no tokenizer at all: prompts go as text
    model = open_toy(server, log=logged.append)
    assert model.generate([GenerationRequest("0123456789", 2)]) == [":;"]
    assert server.sent("/v1/completions")[-1]["body"]["prompt"] == "0123456789"
    assert any("no /tokenize route" in m for m in logged)
    with pytest.raises(EndpointError, match=r"no /tokenize route.*give --tokenizer DIR"):
        model.encode("ab")
    with pytest.raises(EndpointError, match=r"end-of-text token id.*--tokenizer"):
        model.eot_id


# --- retries and errors -----------------------------------------------------------------


def test_503s_and_429_are_retried(server):
    model = open_toy(server)
    busy = json.dumps({"error": {"message": "overloaded"}}).encode()
    server.script += [("/v1/completions", 503, {}, busy), ("/v1/completions", 503, {}, busy)]
    assert model.generate([GenerationRequest("a", 3)]) == ["bcd"]
    assert len(server.sent("/v1/completions")) == 3 and len(model.waits) == 2
    assert model.waits[1] > model.waits[0]  # exponential backoff

    server.requests.clear()
    server.script.append(("/v1/completions", 429, {"Retry-After": "7"}, b"{}"))
    assert model.generate([GenerationRequest("x", 2)]) == ["yz"]
    assert len(server.sent("/v1/completions")) == 2 and model.waits[-1] == 7.0


def test_retries_end_with_a_message(server):
    model = open_toy(server, max_retries=2)
    server.script += [("/v1/completions", 502, {}, b"bad gateway")] * 3
    with pytest.raises(EndpointError, match=r"HTTP 502 after 3 attempt.*bad gateway.*server failed"):
        model.generate([GenerationRequest("a", 3)])


def test_a_400_is_not_retried_and_its_message_reaches_the_user(server):
    model = open_toy(server)
    server.script.append(("/v1/completions", 400, {}, json.dumps(
        {"object": "error", "message": "This model's maximum context length is 64 tokens"}).encode()))
    with pytest.raises(EndpointError, match=r"/v1/completions: HTTP 400.*maximum context length is 64"):
        model.generate([GenerationRequest("a", 3)])
    assert len(server.sent("/v1/completions")) == 1 and model.waits == []


def test_garbage_answers_name_what_is_wrong(server):
    model = open_toy(server)
    server.script.append(("/v1/completions", 200, {}, b"<html>proxy error</html>"))
    with pytest.raises(EndpointError, match=r"v1/completions: the answer \(HTTP 200\) is not JSON.*proxy"):
        model.generate([GenerationRequest("a", 3)])
    server.script.append(("/v1/completions", 200, {}, b'{"id": "x"}'))
    with pytest.raises(EndpointError, match=r"v1/completions: the answer has no 'choices' field"):
        model.loglikelihood([ChoiceRequest(ids("ab"), [ids("c")])])


def test_unreachable_server_and_model_choice(server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EndpointError, match=rf"cannot reach http://127.0.0.1:{port}/v1/models "
                                            r"\(is the server running\? `hcx serve CKPT`"):
        EndpointModel(f"http://127.0.0.1:{port}", EndpointOptions(max_retries=0))
    server.models.append({"id": "other", "max_model_len": 32})
    with pytest.raises(EndpointError, match=r"several models \(toy, other\).*--endpoint-model"):
        open_toy(server)
    assert open_toy(server, model="other").max_length == 32
    with pytest.raises(EndpointError, match=r"serves toy, other, not 'nope'"):
        open_toy(server, model="nope")


# --- concurrency and the request cache ----------------------------------------------------


def test_requests_run_concurrently_and_answers_keep_their_order(server):
    model = open_toy(server, concurrency=4)
    server.barrier = threading.Barrier(4)  # the first 4 answers wait for each other
    prompts = ["a", "k", "p", "A", "0", "x", "m", "F"]
    out = model.generate([GenerationRequest(p, 2) for p in prompts])
    assert server.max_inflight >= 4
    assert out == [toy_continue(p, 2) for p in prompts]


def test_the_cache_answers_a_second_run(server, tmp_path):
    cache = tmp_path / "run" / "requests.jsonl"
    asks = [ChoiceRequest(ids("ab"), [ids("cd"), ids("x")]), ChoiceRequest(ids("z"), [ids("y")])]
    gens = [GenerationRequest("abc", 3), GenerationRequest("hi", 9, chat=True)]

    def run(log=None):
        model = open_toy(server, cache=cache, log=log)
        try:
            return model.loglikelihood(asks), model.generate(gens)
        finally:
            model.close()

    first = run()
    sent = len(server.requests)
    lines = cache.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["key"] for line in lines)  # 2 + 1 tokenize + 2
    logged: list[str] = []
    assert run(logged.append) == first
    assert [r["path"] for r in server.requests[sent:]] == ["/v1/models"]  # nothing resent
    assert "request cache" in logged[0] and "5 answers" in logged[0]
    assert any("2 of 2 requests" in m for m in logged)

    with open(cache, "a") as f:  # a run killed mid-write
        f.write('{"key": "abc", "route": "/v1/compl')
    gens.append(GenerationRequest("pq", 2))
    assert run()[1][-1] == "rs"
    assert [json.loads(line)["response"] for line in cache.read_text().splitlines()]  # whole lines


# --- endpoints without log-likelihoods, and the runner -----------------------------------


def mc_task(tmp_path: Path, name: str = "tiny_mc") -> T.Task:
    return write_task(tmp_path, {"name": name, "kind": "multiple_choice", "prompt": "{{ q }}",
                                 "choices": "opts", "target": "gold", "metrics": ["acc"],
                                 "target_delimiter": ""},
                      [{"q": "ab", "opts": ["c", "x"], "gold": 0},
                       {"q": "mn", "opts": ["z", "o"], "gold": 1},
                       {"q": "st", "opts": ["u", "v"], "gold": 0}])


def gen_task(tmp_path: Path) -> T.Task:
    return write_task(tmp_path, {"name": "tiny_gen", "kind": "generation", "prompt": "{{ q }}",
                                 "target": "a", "metrics": ["exact_match"],
                                 "generation": {"max_new_tokens": 3}},
                      [{"q": "ab", "a": "cde"}, {"q": "xy", "a": "nope"}])


def test_chat_only_endpoints_name_the_task_and_the_way_out(server, tmp_path):
    out = tmp_path / "run"
    model = open_toy(server, api="chat", max_length=None)
    with pytest.raises(LoglikelihoodUnsupported,
                       match=r"task tiny_mc needs log-likelihoods.*--api chat.*--mc-mode generate, "
                             r"or serve the model with hcx serve / vLLM.*1 finished task"):
        evaluate(model, [gen_task(tmp_path), mc_task(tmp_path)], out, log=lambda m: None)
    done = json.loads((out / "scores.json").read_text())["tasks"]
    assert list(done) == ["tiny_gen"]  # the task before the failure stays written

    server.logprobs = False  # a completions API without prompt logprobs
    with pytest.raises(LoglikelihoodUnsupported, match=r"task tiny_mc needs.*without logprobs"):
        evaluate(open_toy(server), [mc_task(tmp_path)], tmp_path / "run2", log=lambda m: None)


def test_runner_scores_and_identity(server, tmp_path):
    model = open_toy(server)
    scores = evaluate(model, [mc_task(tmp_path), gen_task(tmp_path)], tmp_path / "run",
                      log=lambda m: None)
    # ab|c is expected, ab|x not -> 0; mn|o expected -> 1; st|u expected -> 0: all right
    assert scores["tasks"]["tiny_mc"]["metrics"]["acc"]["value"] == 1.0
    assert scores["tasks"]["tiny_gen"]["metrics"]["exact_match"]["value"] == 0.5
    assert scores["model"]["kind"] == "endpoint" and scores["model"]["path"] == server.url
    assert model_identity(model) == {"path": server.url, "step": None, "dtype": None, "served": "toy"}
    with pytest.raises(ModelOpenError, match="--tp and --dp apply to checkpoints"):
        open_model(server.url, tp=2)


def test_cli_eval_against_the_server(server, tmp_path):
    mc_task(tmp_path)
    out = tmp_path / "out"
    run = hcx("eval", server.url, "--tasks", str(tmp_path / "tiny_mc.yaml"), "--limit", "3",
              "--out", str(out), "--concurrency", "2", timeout=120)
    assert run.stdout.strip() == str(out)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["tasks"]["tiny_mc"]["metrics"]["acc"]["value"] == 1.0
    assert (out / "requests.jsonl").is_file()


def test_flags_that_do_not_fit_the_model(server, tmp_path, capsys):
    from hcx import cli

    assert cli.main(["eval", server.url, "--tasks", "kobest_copa", "--tp", "2",
                     "--batch-size", "4"]) == 1
    assert "--batch-size, --tp apply to checkpoints" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path), "--tasks", "kobest_copa", "--concurrency", "2"]) == 1
    assert "--concurrency applies to http(s):// endpoints" in capsys.readouterr().err
    assert not server.requests  # refused before anything was sent


def test_default_run_dir_of_an_endpoint():
    from hcx.commands.evaluate import default_eval_dir

    assert default_eval_dir("http://localhost:8000/v1", 3, "hcx", served="Qwen/Qwen2.5-7B") == \
        Path("runs/eval/Qwen2.5-7B@localhost-8000-limit3")
    assert default_eval_dir("https://api.example.com/v1", None, "hcx") == \
        Path("runs/eval/api.example.com")
