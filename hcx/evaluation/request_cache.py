"""The answers an endpoint gave, kept in a JSONL file so that an interrupted run resumes
without sending its requests again.

Every answered request is one line ``{"key", "route", "response"}``, appended and
flushed as soon as the answer arrives (under a lock: the requests of a call are sent from
several threads). The key is the SHA-256 of the route and the request's canonical JSON
(sorted keys, no spaces), so the same question asked of the same served model finds its
answer whatever the order or the concurrency of the run. A line cut short by a crash
(the file's last, without its newline) is dropped when the file is read.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from hcx.errors import HcxError


class RequestCacheError(HcxError, ValueError):
    pass


def request_key(route: str, payload: dict) -> str:
    """What identifies a request: its route and its canonical JSON."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{route}\n{canonical}".encode()).hexdigest()


class RequestCache:
    """Answers by :func:`request_key`, read from ``path`` at start and appended to it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.answers: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._file = None
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A torn last line (the process died mid-write): drop it from the file too,
            # so the next answer starts on a line of its own.
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.answers[record["key"]] = record["response"]
            except (ValueError, KeyError, TypeError) as e:
                raise RequestCacheError(
                    f"{self.path}:{n}: not a request-cache line ({e}); the file holds the "
                    "answers of earlier runs: delete it to send every request again") from e

    def get(self, key: str) -> dict | None:
        return self.answers.get(key)

    def put(self, key: str, route: str, response: dict) -> None:
        line = json.dumps({"key": key, "route": route, "response": response},
                          ensure_ascii=False) + "\n"
        with self._lock:
            self.answers[key] = response
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()

    def __len__(self) -> int:
        return len(self.answers)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
