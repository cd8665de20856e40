"""``hcx serve``: an OpenAI-compatible HTTP server on a checkpoint (docs/serve.md)."""

from __future__ import annotations

import argparse

from hcx.commands.common import log, needs_relaunch, relaunch_with_torchrun


def cmd_serve(args: argparse.Namespace, argv: list[str]) -> int:
    from hcx.errors import require
    from hcx.serving.server import ServeError

    # Checked before any process starts: a core install says which extra to add.
    require("fastapi", "serve", purpose="hcx serve")
    require("uvicorn", "serve", purpose="hcx serve")
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port {args.port}: give a port from 0 (any free port) to 65535")
    if args.max_batch < 1:
        raise ServeError(f"--max-batch {args.max_batch}: give at least 1")
    if args.tp < 1:
        raise ServeError(f"--tp {args.tp}: give at least 1")
    if needs_relaunch(args.tp):
        return relaunch_with_torchrun(args.tp, argv, signal_workers=True)
    from hcx.serving.server import serve

    return serve(args.checkpoint, host=args.host, port=args.port, tp=args.tp,
                 name=args.model_name, max_batch=args.max_batch, log=log)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server on a checkpoint",
        description="Serve an hcx checkpoint (any saved TP/PP layout; --tp N runs N "
                    "tensor-parallel processes) over HTTP with OpenAI's and vLLM's routes: "
                    "/v1/models, /v1/completions (with echo and logprobs, for scoring), "
                    "/v1/chat/completions (hcx's chat layout), /tokenize, /detokenize, "
                    "/health. Answers equal hcx eval's in-process ones. Prints 'serving "
                    "NAME on URL' when ready; SIGTERM or Ctrl-C stops it after answering the "
                    "requests in flight. Needs the 'serve' extra. See docs/serve.md.")
    p.add_argument("checkpoint", help="e.g. runs/tiny-sft/checkpoints")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes")
    p.add_argument("--model-name",
                   help="the model's name in the API (default: the checkpoint's run name)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="at most this many prompts or sequences in one model call (default: 8)")
    p.set_defaults(func=cmd_serve)
