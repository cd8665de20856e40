"""What verifying a checkpoint's checksums costs.

    .venv/bin/python bench/checkpoint_verify.py [--mb 1024] [--files 8] [--repeat 3] [--json out.json]

Writes ``--files`` files of random bytes (``--mb`` MB in all, like the ``*.distcp``
shards of one rank or one small checkpoint) into a temporary directory, gives it a
manifest (:func:`hcx.engine.checkpoint.add_manifest`), then times

* ``checksum_failure(dir)``: what a load runs on each rank over its share of the files
  (SHA-256, a thread per file up to 8; hashlib releases the GIL), and
* one thread hashing file after file with ``hashlib.file_digest``, for
  ``sha256`` (the choice), ``blake2b``, ``md5`` and ``zlib.crc32`` (the alternatives).

Both wall-clock MB/s and MB per CPU-second (all threads of the process) are reported:
on a shared machine the second is the cost that does not depend on what else runs.
The files were just written, so they are read from the page cache: the figures are the
hashing cost. Reading from storage adds its own time (the checksum then overlaps the
read); on shared file systems that is usually the bound. MB = 10^6 bytes. Medians over
``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import zlib
from pathlib import Path

from hcx.engine import checkpoint


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _one_thread(files: list[Path], algorithm: str) -> None:
    for f in files:
        if algorithm == "crc32":
            _crc32(f)
        else:
            with open(f, "rb") as fh:
                hashlib.file_digest(fh, algorithm)


def _median_seconds(fn, repeat: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds (this process, all threads) of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = args.mb * 10**6 // args.files
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = []
        for i in range(args.files):
            f = d / f"__{i}_0.distcp"
            f.write_bytes(os.urandom(size))
            files.append(f)
        checkpoint.add_manifest(d)
        total = sum(f.stat().st_size for f in files) / 1e6
        assert checkpoint.checksum_failure(d) is None
        rows = {"checksum_failure (sha256, threads)":
                _median_seconds(lambda: checkpoint.checksum_failure(d), args.repeat)}
        for algorithm in ("sha256", "blake2b", "md5", "crc32"):
            rows[f"{algorithm}, one thread"] = _median_seconds(
                lambda a=algorithm: _one_thread(files, a), args.repeat)
    result = {"mb": total, "files": args.files, "cores": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(),
              "load_average": os.getloadavg(),
              "mb_per_s": {k: round(total / wall) for k, (wall, _) in rows.items()},
              "mb_per_cpu_s": {k: round(total / cpu) for k, (_, cpu) in rows.items()}}
    print(f"{'':38s} {'MB/s':>7s} {'MB/CPU-s':>9s}")
    for name in rows:
        print(f"{name:38s} {result['mb_per_s'][name]:>7,} {result['mb_per_cpu_s'][name]:>9,}")
    print(f"load average {result['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
