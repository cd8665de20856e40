"""Serving throughput: requests/s through ``hcx serve`` against ``HcxModel`` in process,
on the same prompts, side by side.

    python bench/serve_throughput.py CKPT [--requests 64] [--clients 16] [--max-batch 8] \
        [--max-tokens 16] [--tp 1]

Two workloads, each on both sides:

* ``greedy``: completions of ``--max-tokens`` tokens (``temperature: 0``); in process,
  ``HcxModel.generate`` with batches of ``--max-batch``;
* ``scoring``: an lm-eval style log-likelihood per request (``echo``, ``max_tokens: 0``,
  ``logprobs: 1`` on context + continuation ids); in process, ``HcxModel.loglikelihood``.

The server runs in its own process (started, and its first answer waited for, before
any timing); ``--clients`` threads send the requests concurrently, each request on its
own, so the server's batching is what groups them. The in-process side gets all
prompts at once. The answers are compared: greedy texts must be equal and
log-likelihoods within 1e-4 (the script exits 1 otherwise, after the table).
"""

from __future__ import annotations

import argparse
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcx.cli import quiet_known_warnings  # noqa: E402

PROMPTS = ["대한민국의 수도는", "옛날 옛적에 호랑이가", "The weather today is", "Once upon a time",
           "서울에서 부산까지", "파이썬으로 정렬하는 방법은", "My favourite food is", "한국어와 영어를"]
CONTINUATIONS = [" 서울입니다.", " 살았습니다.", " sunny and warm.", " there was a king.",
                 " 기차로 갑니다.", " sorted를 씁니다.", " kimchi.", " 함께 배웁니다."]


def start_server(ckpt: str, max_batch: int, tp: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "hcx.cli", "serve", ckpt, "--port", "0",
                             "--max-batch", str(max_batch), "--tp", str(tp)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    ready = lines.get(timeout=600)
    if not ready.startswith("serving "):
        proc.kill()
        sys.exit(f"hcx serve did not start: {ready!r}")
    return proc, ready.split(" on ")[1].strip()


def timed_requests(url: str, bodies: list[dict], clients: int) -> tuple[float, list[dict]]:
    import httpx

    local = threading.local()

    def send(body):
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)
        r = local.client.post(url + "/completions", json=body)
        r.raise_for_status()
        return r.json()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, bodies[:clients]))  # warm-up: connections, first batches
        start = time.perf_counter()
        answers = list(pool.map(send, bodies))
    return time.perf_counter() - start, answers


def main() -> int:
    quiet_known_warnings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--tp", type=int, default=1, help="the server's TP size (in process: 1)")
    args = ap.parse_args()

    from hcx.evaluation.models import Budget, ChoiceRequest, GenerationRequest, HcxModel

    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS) % 2) for i in range(args.requests)]
    conts = [CONTINUATIONS[i % len(CONTINUATIONS)] for i in range(args.requests)]

    proc, url = start_server(args.checkpoint, args.max_batch, args.tp)
    try:
        model = HcxModel(args.checkpoint, budget=Budget(batch_size=args.max_batch),
                         log=lambda *a: None)
        model.rank0 = False  # no progress bars
        choices = [ChoiceRequest(model.encode(p), [model.encode(p + c)[len(model.encode(p)):]])
                   for p, c in zip(prompts, conts)]
        greedy = [{"prompt": p, "max_tokens": args.max_tokens, "temperature": 0} for p in prompts]
        scoring = [{"prompt": r.context + r.continuations[0], "max_tokens": 0, "echo": True,
                    "logprobs": 1, "temperature": 0} for r in choices]
        rows, failures = [], []

        served_s, answers = timed_requests(url, greedy, args.clients)
        model.generate([GenerationRequest(p, args.max_tokens) for p in prompts[:args.max_batch]])
        start = time.perf_counter()
        texts = model.generate([GenerationRequest(p, args.max_tokens) for p in prompts])
        local_s = time.perf_counter() - start
        same = sum(a["choices"][0]["text"] == t for a, t in zip(answers, texts))
        rows.append(("greedy", served_s, local_s, f"{same}/{len(texts)} texts equal"))
        failures += [] if same == len(texts) else ["greedy texts differ"]

        served_s, answers = timed_requests(url, scoring, args.clients)
        model.loglikelihood(choices[:args.max_batch])
        start = time.perf_counter()
        scores = model.loglikelihood(choices)
        local_s = time.perf_counter() - start
        worst = max(abs(sum(a["choices"][0]["logprobs"]["token_logprobs"][len(r.context):])
                        - s[0].logprob) for a, r, s in zip(answers, choices, scores))
        rows.append(("scoring", served_s, local_s, f"max |Δ log-likelihood| {worst:.1e}"))
        failures += [] if worst <= 1e-4 else ["log-likelihoods differ"]
        model.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)

    n = args.requests
    print(f"\n{n} requests, {args.clients} clients, max batch {args.max_batch}, "
          f"max_tokens {args.max_tokens}, server tp {args.tp}")
    print(f"{'workload':10s} {'server req/s':>13s} {'in process req/s':>17s}  answers")
    for name, served_s, local_s, note in rows:
        print(f"{name:10s} {n / served_s:13.1f} {n / local_s:17.1f}  {note}")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
