"""Starting and stopping ``hcx serve``.

Every process opens the checkpoint (at tensor-parallel size ``tp``). Rank 0 runs
uvicorn on a socket it binds itself (so port 0 means a free port, known before the
ready line is printed) and the engine thread; the other ranks follow rank 0's calls
(:func:`hcx.serving.worker.follow`).

Stopping: SIGTERM or SIGINT on rank 0 is uvicorn's graceful shutdown (no new
connections, requests in flight are answered), then the engine thread runs what is
queued and tells the other ranks to stop; every process exits 0. The other ranks
ignore SIGTERM and SIGINT (torchrun and a terminal send them to every process): they
stop when rank 0 says so.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from hcx.errors import HcxError, require
from hcx.evaluation.models import Budget, HcxModel, checkpoint_name


class ServeError(HcxError, ValueError):
    pass


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Connections accepted from it inherit TCP_NODELAY (Linux): without it a response
    # written in two parts (headers, body) waits for the client's delayed ACK, 40 ms on
    # every keep-alive request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another "
                         "--port (0: any free port) or --host") from None
    sock.set_inheritable(False)
    return sock


def url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, tp: int = 1,
          name: str | None = None, max_batch: int = 8, log=print) -> int:
    """Serve ``checkpoint`` until SIGTERM/SIGINT; 0 when every request was answered."""
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # stop when rank 0 says so, not when torchrun or a terminal does
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    sock = None
    if rank == 0:
        require("uvicorn", "serve", purpose="hcx serve")
        sock = bind(host, port)  # before loading: a busy port fails at once
    name = name or checkpoint_name(Path(checkpoint))
    model = HcxModel(checkpoint, tp=tp, budget=Budget(batch_size=max_batch), log=log)
    try:
        if model.rank0:
            serve_http(model, sock, host, name, max_batch, log)
        else:
            from hcx.serving.worker import follow

            follow(model, log)
    finally:
        if sock is not None:
            sock.close()
        model.close()
    return 0


def serve_http(model: HcxModel, sock: socket.socket, host: str, name: str, max_batch: int,
               log) -> None:
    import uvicorn

    from hcx.serving.app import Served, create_app
    from hcx.serving.worker import EngineWorker

    worker = EngineWorker(model, max_batch=max_batch, log=log).start()
    app = create_app(Served(model, worker, name))
    ready = f"serving {name} on {url(host, sock.getsockname()[1])}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                print(ready, flush=True)
                log(f"hcx serve: {ready} (tp={model.engine.topo.tp}, max batch {max_batch}); "
                    "SIGTERM or Ctrl-C stops it")

    server = Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    # uvicorn raises the signal it stopped on again once it is done; these handlers
    # take it (the process then exits 0 after stopping the engine).
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, f: received.append(s))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log(f"hcx serve: stopped ({signal.Signals(received[0]).name})")
    sys.stdout.flush()
