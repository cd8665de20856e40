"""The engine thread: the one thread that runs the model.

HTTP handlers (on uvicorn's event loop) :meth:`EngineWorker.submit` work and await its
future; the thread takes the oldest queued work together with up to ``max_batch``
queued works of the same key (see :mod:`hcx.serving.batches`), runs them as one call
and hands each its results. An exception fails only the futures of that call.

Under tensor parallelism only rank 0 serves HTTP: before each call its engine thread
broadcasts the call to the other ranks, which run it too in :func:`follow` (their
results are dropped); :class:`~hcx.serving.batches.Stop` ends them.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hcx.evaluation.models import HcxModel
from hcx.serving import batches
from hcx.serving.batches import Ping, Stop, Work

# An idle server still talks to the other ranks this often: their wait for the next
# call is a collective, which times out after the process group's timeout (30 min).
KEEPALIVE_S = 60.0
# At most this many (padded) tokens in one scoring pass: its logits hold
# tokens x vocabulary floats.
SCORE_TOKENS = 16384


@dataclass
class Pending:
    work: Work
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def broadcast(item) -> object:
    """Rank 0's ``item`` on every rank (the default group)."""
    box = [item]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


class EngineWorker:
    def __init__(self, model: HcxModel, max_batch: int = 8, log=None):
        self.model = model
        self.max_batch = max_batch
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.broadcasts = distributed()
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.largest_batch = 0  # the most requests one call has answered (reported by /health)
        # The CUDA device is per thread: the engine thread uses the one the model is on.
        self._device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self._thread = threading.Thread(target=self._loop, name="hcx-engine", daemon=True)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    async def submit(self, work: Work):
        """Queue ``work``; its results (one per prompt or sequence) when it has run."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is stopping")
            self._queue.append(Pending(work, future, loop))
            self._cond.notify()
        return await future

    def stop(self) -> None:
        """Run what is queued, then end the thread (and the other ranks' loops)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    # --- the engine thread -----------------------------------------------------------

    def _loop(self) -> None:
        if self._device is not None:
            torch.cuda.set_device(self._device)
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(timeout=KEEPALIVE_S)
                if not self._queue:
                    if self._stopping:
                        break
                    batch = None  # idle: a keepalive
                else:
                    batch = self._take()
            if batch is None:
                if self.broadcasts:
                    broadcast(Ping())
                continue
            self._run(batch)
        if self.broadcasts:
            broadcast(Stop())

    def _take(self) -> list[Pending]:
        """The oldest work and queued works that may share its call (under the lock)."""
        first = self._queue.popleft()
        taken = [first]
        key = first.work.key()
        if key is None:
            return taken
        size, longest = first.work.size, max(len(s) for s in _rows(first.work))
        for p in list(self._queue):
            if p.work.key() != key or size + p.work.size > self.max_batch:
                continue
            wider = max(longest, *(len(s) for s in _rows(p.work)))
            if isinstance(p.work, batches.Score) and (size + p.work.size) * wider > SCORE_TOKENS:
                continue
            self._queue.remove(p)
            taken.append(p)
            size, longest = size + p.work.size, wider
        return taken

    def _run(self, batch: list[Pending]) -> None:
        works = [p.work for p in batch]
        call = batches.merge(works)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            if self.broadcasts:
                broadcast(call)
            parts = batches.split(batches.run(self.model, call), works)
        except Exception as e:  # noqa: BLE001 - one call's failure fails its requests only
            self.log(f"hcx serve: a model call failed: {e}\n{traceback.format_exc()}")
            for p in batch:
                _resolve(p, error=e)
            return
        for p, part in zip(batch, parts):
            _resolve(p, result=part)


def _rows(work: Work):
    return work.prompts if isinstance(work, batches.Generate) else work.sequences


def _resolve(p: Pending, result=None, error: Exception | None = None) -> None:
    def settle():
        if p.future.done():  # the client went away
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(result)

    try:
        p.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop has closed: nobody waits for the answer
        pass


def follow(model: HcxModel, log=None) -> None:
    """The loop of the ranks other than 0: run every call rank 0 broadcasts, until Stop."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    while True:
        work = broadcast(None)
        if isinstance(work, Stop):
            return
        try:
            batches.run(model, work)
        except Exception as e:  # noqa: BLE001 - rank 0 fails the same way and reports it
            log(f"hcx serve [rank {dist.get_rank()}]: a model call failed: {e}")
