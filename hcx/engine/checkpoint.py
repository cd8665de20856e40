"""Checkpoints with megatron-core ``dist_checkpointing``.

Layout of ``<checkpoint dir>``::

    latest                 text file naming the newest complete checkpoint
    step_00000020/         a complete checkpoint
        (dist_checkpointing files: model + optimizer, layout independent)
        rng/rank_00003.pt  python/numpy/torch(/cuda)/megatron-tracker RNG per rank
        hcx.json           step, consumed samples, scheduler, recipe
        manifest.json      size and SHA-256 of every other file (written last)
    step_00000030.incomplete/   a save that was interrupted or is still being written
                                (ignored by resume, removed)

A save writes into ``step_N.incomplete``; each rank checksums the files it wrote; rank 0
writes ``hcx.json`` and the manifest, verifies the directory, renames it to ``step_N``
and only then replaces ``latest`` (write to a temp file, fsync, ``os.replace``). A crash
at any point leaves ``latest`` naming the previous complete checkpoint. Resume trusts
``latest`` only after verifying what it names (structure, sizes and checksums) and
otherwise falls back to the newest checkpoint that verifies, saying why. Every load
(resume, ``checkpoint.init_from``, ``hcx export``/``eval``/``generate``, reference and
reward models) goes through :func:`verify_contents`: a file whose bytes changed since
the save is refused by name. Checkpoints of earlier hcx versions carry no manifest and
load with a warning.

With :class:`Saver` (``checkpoint.async_save``) the shards are written by a background
process (megatron-core's async save) while training continues; the save is finalized
(checksums, ``hcx.json``, rename, ``latest``, pruning) at a later step boundary once
every rank's writer has finished, so an unfinished background write is only ever a
``.incomplete`` directory. ``checkpoint.fully_parallel_save`` / ``fully_parallel_load``
spread the writing and reading of replicated state over the data-parallel ranks
(megatron's FullyParallelSave/LoadStrategyWrapper).

Because dist_checkpointing stores global tensors (each rank writes its shards), a
checkpoint saved at one TP/PP/DP layout loads at another.

``save_weights`` writes a weights-only checkpoint (``hcx import``): the same layout
without optimizer state or RNG files, read by ``load(..., optimizer=None)``
(``checkpoint.init_from``, ``hcx export``).

A checkpoint carries its run's tokenizer (``tokenizer/`` in the step directory, named by
``hcx.json``'s ``tokenizer_path``; :func:`tokenizer_bundle`), so that it opens wherever it
is moved or copied (see :func:`bundled_tokenizer`).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from hcx.errors import HcxError
from hcx.files import write_text_atomic

STEP_PREFIX = "step_"
INCOMPLETE = ".incomplete"
META = "hcx.json"
LATEST = "latest"
# Size and checksum of every other file of a checkpoint; its presence in a step
# directory also means the save finished (it is written last, before the rename).
MANIFEST = "manifest.json"
CHECKSUM = "sha256"  # the hashlib algorithm (see "checksums" below for why)
# Where each rank's writer leaves the checksums of the files it wrote, for rank 0 to
# merge into the manifest (removed before the checkpoint is sealed).
DIGESTS_DIR = ".digests"
# For tests: seconds each rank's writer waits after writing its shards, which widens
# the window in which a background (async) save is in flight.
WRITE_DELAY_ENV = "HCX_CHECKPOINT_WRITE_DELAY_S"
# The optimizer format that reshards across TP, PP and DP (megatron's
# 'fully_reshardable'); it gathers optimizer state per DP group on save.
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# hcx.json's "optimizer" for checkpoints without optimizer state (save_weights).
WEIGHTS_ONLY = "none"
# The folder of a step directory that holds the run's tokenizer files, and the key of
# hcx.json naming the recipe's data.tokenizer.path inside the step directory.
TOKENIZER_DIR = "tokenizer"
TOKENIZER_KEY = "tokenizer_path"


class CheckpointError(HcxError, RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


@dataclass
class Found:
    path: Path
    step: int
    meta: dict[str, Any]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def on_rank0(fn, what: str):
    """Run ``fn`` on rank 0 and give its result to every rank. If it raises, every rank
    raises the same CheckpointError (instead of the others waiting forever in the next
    collective while rank 0 unwinds)."""
    result, error = None, None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"{what}: {e}"
    if dist.is_initialized() and _world() > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise CheckpointError(error)
    return result


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)
    _fsync_dir(path.parent)  # the rename itself survives a power loss


# --- RNG ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# --- checksums and finding checkpoints --------------------------------------------------
# SHA-256 because it is fast where checkpoints are written (hashlib/OpenSSL uses the SHA
# instructions of current x86 and Arm server CPUs, which puts it ahead of BLAKE2b and
# MD5 there; docs/benchmarks.md), about what one process reads from shared storage,
# and because anyone can check a file by hand with ``sha256sum``. zlib's CRC-32 is
# faster but is 32 bits and needs a script to check.
# Writers hash the files they wrote (in the background for async saves); a load spreads
# the hashing over the ranks, and threads within each (hashlib releases the GIL).

_VERIFIED: set[tuple] = set()  # checkpoints this process verified (path, manifest stat)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, CHECKSUM).hexdigest()


def _digest_files(paths: list[Path]) -> dict[Path, tuple[int, str]]:
    """``{path: (size, checksum)}``, hashed by a few threads."""
    if not paths:
        return {}
    with ThreadPoolExecutor(min(len(paths), 8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_digest, paths))
    return {p: (p.stat().st_size, d) for p, d in zip(paths, digests)}


def _manifest_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _write_manifest(directory: Path, files: dict[str, list]) -> None:
    body = {"algorithm": CHECKSUM, "files": files, "digest": _manifest_digest(files)}
    _write_atomic(directory / MANIFEST, json.dumps(body, indent=1, sort_keys=True))


def add_manifest(path: Path) -> None:
    """Checksum every file of the checkpoint ``path`` and write its manifest: for a
    checkpoint saved by an earlier hcx (one that is known to be intact)."""
    path = Path(path)
    names = [p for p in sorted(path.rglob("*")) if p.is_file() and p.name != MANIFEST]
    _write_manifest(path, {str(p.relative_to(path)): list(v)
                           for p, v in _digest_files(names).items()})


def read_manifest(path: Path) -> tuple[dict[str, list] | None, str | None]:
    """``(files, None)``: ``{name: [size, checksum]}`` of the checkpoint ``path``;
    ``(None, None)`` when it has no manifest (saved by an earlier hcx);
    ``(None, reason)`` when the manifest itself is damaged."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None, None
    try:
        body = json.loads(f.read_text())
        files = body["files"]
        ok = body.get("algorithm") == CHECKSUM and body["digest"] == _manifest_digest(files)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"file {MANIFEST} is damaged ({e})"
    if not ok:
        return None, f"file {MANIFEST} is damaged (its own checksum does not match)"
    return files, None


def verify(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else the reason it is not. Checks the
    structure and file sizes (cheap); :func:`checksum_failure` reads the contents."""
    path = Path(path)
    if not path.is_dir():
        return "directory missing"
    if not (path / META).is_file():
        return f"no {META} (the save did not finish)"
    if not (path / "metadata.json").is_file():
        return "no dist_checkpointing metadata.json"
    files, reason = read_manifest(path)
    if reason:
        return reason
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable {META}: {e}"
    sizes = {name: size for name, (size, _) in (files or {}).items()}
    for name, size in {**meta.get("files", {}), **sizes}.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, expected {size}"
    return None


def checksum_failure(path: Path, names: list[str] | None = None) -> str | None:
    """None when the files ``names`` (default: all) of checkpoint ``path`` have the
    checksums its manifest records (or it has no manifest), else the first file that
    does not, named."""
    path = Path(path)
    files, reason = read_manifest(path)
    if reason or files is None:
        return reason
    names = sorted(files) if names is None else names
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        return f"missing file {missing[0]}"
    got = _digest_files([path / n for n in names])
    for name in names:
        size, digest = got[path / name]
        want_size, want = files[name]
        if size != want_size:
            return f"file {name} has {size} bytes, expected {want_size}"
        if digest != want:
            return (f"file {name} is damaged: its {CHECKSUM} is {digest[:16]}..., the "
                    f"manifest records {want[:16]}... (changed on disk after the save)")
    return None


def _verified_key(path: Path) -> tuple:
    st = (Path(path) / MANIFEST).stat()
    return str(Path(path).resolve()), st.st_mtime_ns, st.st_size


def _share(files: dict[str, list], rank: int, world: int) -> list[str]:
    """This rank's part of ``files`` to hash: the largest first, each to the rank with
    the fewest bytes so far (the same answer on every rank)."""
    loads = [(0, r) for r in range(world)]
    mine = []
    for name in sorted(files, key=lambda n: (-files[n][0], n)):
        load, r = heapq.heappop(loads)
        if r == rank:
            mine.append(name)
        heapq.heappush(loads, (load + files[name][0], r))
    return sorted(mine)


def _checksums_collective(path: Path) -> str | None:
    """:func:`checksum_failure` with the files spread over all ranks (collective): each
    rank hashes its share, every rank gets the first failure. Free for a checkpoint
    this process (rank 0) has already verified."""
    known = on_rank0(lambda: _verified_key(path) in _VERIFIED
                     if (path / MANIFEST).is_file() else False,
                     f"cannot read {path / MANIFEST}")
    if known:
        return None
    files, reason = read_manifest(path)
    if reason or files is None:
        return reason
    reason = checksum_failure(path, _share(files, _rank(), _world()))
    if dist.is_initialized() and _world() > 1:
        reasons: list = [None] * _world()
        dist.all_gather_object(reasons, reason)
        reason = next((r for r in reasons if r), None)
    if reason is None:
        _VERIFIED.add(_verified_key(path))
    return reason


def verify_contents(path: Path, log=print) -> None:
    """Collective: refuse (CheckpointError, naming the file) a checkpoint that is not
    complete or whose files changed since it was saved. The one check before anything
    is loaded from a checkpoint. Checkpoints without a manifest (earlier hcx versions)
    pass with a warning."""
    path = Path(path)
    reason = on_rank0(lambda: verify(path), f"cannot verify {path}")
    if reason is None and not (path / MANIFEST).is_file():
        log(f"checkpoint: warning: {path} has no {MANIFEST} (saved by an earlier hcx "
            "version): loading it without verifying checksums")
        return
    reason = reason or _checksums_collective(path)
    if reason:
        raise CheckpointError(f"cannot load {path}: {reason}; use another checkpoint "
                              "(resume falls back to the previous one by itself)")


def _candidates(ckpt_dir: Path, log) -> list[Path]:
    """Checkpoints to resume from in order of preference (``latest``'s, then the
    others newest first), each complete by :func:`verify`; says what it skips."""
    if not ckpt_dir.is_dir():
        return []
    for p in sorted(ckpt_dir.glob(f"{STEP_PREFIX}*{INCOMPLETE}")):
        log(f"checkpoint: skipping half-written checkpoint {p} (a save was interrupted)")
    order = []
    latest_file = ckpt_dir / LATEST
    if latest_file.is_file():
        named = ckpt_dir / latest_file.read_text().strip()
        reason = verify(named)
        if reason is None:
            order.append(named)
        else:
            log(f"checkpoint: '{LATEST}' names {named}, which is not usable ({reason}); "
                "falling back to the newest complete checkpoint")
    for p in complete_checkpoints(ckpt_dir)[::-1]:
        if p in order:
            continue
        reason = verify(p)
        if reason is None:
            order.append(p)
        else:
            log(f"checkpoint: skipping {p}: {reason}")
    return order


def _skip_damaged(p: Path, reason: str, log) -> None:
    log(f"checkpoint: skipping {p}: {reason}; falling back to the previous checkpoint")


def find_resumable(ckpt_dir: Path, log=print) -> Found | None:
    """The checkpoint to resume from, explaining anything skipped (one process; checks
    the contents too). :func:`resume_point` is the collective form training uses."""
    for p in _candidates(ckpt_dir, log):
        reason = checksum_failure(p)
        if reason is None:
            if (p / MANIFEST).is_file():
                _VERIFIED.add(_verified_key(p))
            return Found(p, _step_of(p), json.loads((p / META).read_text()))
        _skip_damaged(p, reason, log)
    return None


def resume_point(ckpt_dir: Path, log=print) -> Path | None:
    """Collective :func:`find_resumable`: rank 0 picks the candidates, all ranks share
    the checksumming of each until one verifies."""
    found = on_rank0(lambda: [str(p) for p in _candidates(ckpt_dir, log)],
                     "looking for a checkpoint to resume from")
    for p in map(Path, found):
        reason = _checksums_collective(p)
        if reason is None:
            return p
        _skip_damaged(p, reason, log)
    return None


def checkpoint_path(path: Path) -> Path:
    """A step directory, or a checkpoints directory (the step its ``latest`` names)."""
    path = Path(path)
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    return path


def _step_of(path: Path) -> int:
    return int(path.name[len(STEP_PREFIX):].split(".")[0])


# --- the tokenizer a checkpoint carries ----------------------------------------------
# Each step directory holds a copy of the tokenizer (rather than one copy per run folder
# that checkpoints point back to): the step directory is what every command takes
# (init_from, hcx eval/export/generate, a reward model), so one that carries its tokenizer
# opens after the run folder is moved, when only a checkpoint is copied elsewhere, and
# whatever checkpoint.dir was. The cost is a tokenizer per kept checkpoint (0.5 MB for
# the shipped one, tens of MB for the largest HF vocabularies; weights are GBs), pruned
# with the checkpoints.


@dataclass
class TokenizerBundle:
    """The tokenizer files a run uses, read once when it starts (so a tokenizer replaced
    at its path during the run is not what its checkpoints carry)."""

    files: dict[str, bytes]  # file name -> contents
    entry: str  # what data.tokenizer.path names among them ("" = the folder)

    @property
    def path(self) -> str:
        """``hcx.json``'s ``tokenizer_path``: relative to the step directory."""
        return f"{TOKENIZER_DIR}/{self.entry}" if self.entry else TOKENIZER_DIR

    def write(self, step_dir: Path) -> None:
        folder = step_dir / TOKENIZER_DIR
        folder.mkdir(exist_ok=True)
        for name, data in self.files.items():
            (folder / name).write_bytes(data)


def tokenizer_bundle(config) -> TokenizerBundle | None:
    """The files of a recipe's ``data.tokenizer``, read now; None for ``bytes`` (no file)."""
    from hcx.tokenizer.loading import tokenizer_files

    files, entry = tokenizer_files(config)
    if not files:
        return None
    return TokenizerBundle({f.name: f.read_bytes() for f in files}, entry)


def bundled_tokenizer(step_dir: Path, meta: dict[str, Any]) -> Path | None:
    """The tokenizer a checkpoint carries, or None (checkpoints of earlier hcx versions,
    and of runs with the ``bytes`` tokenizer, carry none)."""
    rel = meta.get(TOKENIZER_KEY)
    if not rel:
        return None
    path = Path(step_dir) / rel
    return path if path.exists() else None


# --- save / load -------------------------------------------------------------------


def _sharded_state(model, optimizer, is_loading: bool, with_optimizer: bool):
    # Keys are global (layer numbers include the pipeline offset): the whole model's
    # when pp == 1, this stage's slice of it otherwise.
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIM_METADATA
        )
    return state


def _distributed_optimizers(optimizer) -> list:
    """The megatron DistributedOptimizers inside ``optimizer`` (a ChainedOptimizer or one)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def _optimizer_kind(optimizer) -> str:
    return "distributed" if _distributed_optimizers(optimizer) else "plain"


def _write_and_digest(write_fn, tmp: Path, rank: int, also: tuple[Path, ...],
                      *args, **kwargs) -> None:
    """What each rank's writer runs (a forked process for an async save): megatron's
    write of this rank's shards (``write_fn``; None when it has none), then the checksums
    of the files it wrote, left in ``.digests/rank_N.json`` for rank 0's :func:`_seal`."""
    files = list(also)
    if write_fn is not None:
        write_fn(*args, **kwargs)
        files += [Path(bucket[0]) for bucket in args[1]]  # (path, key, data) per file
    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)
    digests = {str(p.relative_to(tmp)): list(v) for p, v in _digest_files(files).items()}
    (tmp / DIGESTS_DIR).mkdir(exist_ok=True)
    write_text_atomic(tmp / DIGESTS_DIR / f"rank_{rank:05d}.json", json.dumps(digests))


def _shard_request(state: dict, tmp: Path, strategy, also: list[Path]):
    """megatron's save of ``state`` into ``tmp`` as an AsyncRequest (run it with
    ``execute_sync()`` or schedule it), its writer extended to checksum what it wrote.
    ``common.pt`` is written now (rank 0); the shards, then ``.metadata`` and
    ``metadata.json`` (megatron's finalize functions), when the request runs."""
    from megatron.core import dist_checkpointing

    request = dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy,
                                      async_sharded_save=True)
    return request._replace(async_fn=partial(_write_and_digest, request.async_fn, tmp,
                                             _rank(), tuple(also)))


def _seal(tmp: Path, meta: dict[str, Any], tokenizer: TokenizerBundle | None) -> None:
    """Finish a checkpoint directory (rank 0, after every rank's writer finished): write
    the run's tokenizer into it, ``hcx.json`` (with every file's size), then the
    manifest of sizes and checksums (the writers' checksums of their shards, the rest
    hashed here), and verify the result."""
    if tokenizer is not None:
        tokenizer.write(tmp)
        meta = {**meta, TOKENIZER_KEY: tokenizer.path}
    digests: dict[str, list] = {}
    for rank in range(_world()):
        f = tmp / DIGESTS_DIR / f"rank_{rank:05d}.json"
        if not f.is_file():
            raise CheckpointError(f"{tmp}: rank {rank} left no checksums of its files "
                                  "(its writer failed)")
        digests.update(json.loads(f.read_text()))
    shutil.rmtree(tmp / DIGESTS_DIR)
    files = {str(p.relative_to(tmp)): p.stat().st_size
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_atomic(tmp / META, json.dumps({**meta, "files": files}, indent=1))
    rest = [tmp / name for name in [*files, META] if name not in digests]
    digests.update({str(p.relative_to(tmp)): list(v) for p, v in _digest_files(rest).items()})
    _write_manifest(tmp, digests)
    reason = verify(tmp)
    if reason:
        raise CheckpointError(f"checkpoint {tmp} failed verification: {reason}")


def _dp_group_size() -> tuple[Any, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 1
    return (ps.get_data_parallel_group(with_context_parallel=True),
            ps.get_data_parallel_world_size(with_context_parallel=True))


class Saver:
    """Writes a run's checkpoints. Collective: every rank makes the same calls.

    Synchronous by default. With ``async_save`` (megatron-core's async save), the call
    to :meth:`save` takes what the save needs (RNG, metadata, ``common.pt``, the shard
    plan) and returns; a forked process per rank writes the shards while training goes
    on (the fork is a copy-on-write snapshot, so the optimizer may update the weights in
    place meanwhile). The save is published -- checksums, ``hcx.json``, the manifest,
    the rename to ``step_N``, ``latest``, pruning -- by :meth:`poll` at a step boundary
    once every rank's writer has finished, or by :meth:`wait`. Until then it is a
    ``.incomplete`` directory that resume ignores, so a crash at any moment leaves the
    previous checkpoint as the one to resume from. One save is in flight at a time: a
    new save first waits for the previous one, so pruning only ever removes finished
    checkpoints.

    ``fully_parallel``: the shards that several data-parallel ranks hold identical
    copies of are written by all of them, a share each, instead of by the first DP rank
    (megatron's FullyParallelSaveStrategyWrapper; the files differ, the checkpoint and
    what loads from it do not).
    """

    def __init__(self, ckpt_dir: Path, keep_last: int, async_save: bool = False,
                 fully_parallel: bool = False, tokenizer: TokenizerBundle | None = None,
                 on_saved: Callable[[Path], None] | None = None, log=print):
        self.ckpt_dir, self.keep_last = Path(ckpt_dir), keep_last
        self.fully_parallel, self.tokenizer = fully_parallel, tokenizer
        self.on_saved, self.log = on_saved, log
        self.pending: Path | None = None  # the step directory being written in the background
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            # Temporal (forked per save) writers: a persistent spawned worker would move
            # CPU tensors into shared memory, and training would change them mid-write.
            self._queue = AsyncCallsQueue(persistent=False)
        self._strategy = None

    def _sharded_strategy(self):
        group, size = _dp_group_size()
        if not self.fully_parallel or size == 1:
            return None  # dist_checkpointing's default
        if self._strategy is None:
            from megatron.core.dist_checkpointing.serialization import (
                get_default_save_sharded_strategy)
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper)

            # The state's structure is the same at every save: plan the split once.
            self._strategy = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(), group, do_cache_distribution=True)
        return self._strategy

    def save(self, step: int, model, optimizer, scheduler, extra: dict[str, Any]) -> Path:
        """Save (or, async, start saving) step ``step``. Returns the step directory it
        becomes once published."""
        self.wait()
        final = self.ckpt_dir / step_dir_name(step)
        tmp = self.ckpt_dir / (step_dir_name(step) + INCOMPLETE)

        def prepare():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()

        on_rank0(prepare, f"cannot create {tmp}")
        # As of now (JSON round trip: a copy that later steps cannot change).
        meta = json.loads(json.dumps({
            "step": step, "world_size": _world(), "optimizer": _optimizer_kind(optimizer),
            "scheduler": scheduler.state_dict(), **extra}))
        state = _sharded_state(model, optimizer, is_loading=False, with_optimizer=True)
        rng_file = tmp / "rng" / f"rank_{_rank():05d}.pt"
        request = _shard_request(state, tmp, self._sharded_strategy(), [rng_file])
        # After megatron's save() began (it warns about a directory that is not empty);
        # before the writer runs (it checksums this file).
        rng_file.parent.mkdir(exist_ok=True)
        torch.save(rng_state(), rng_file)
        request.add_finalize_fn(partial(self._publish, step, tmp, final, meta))
        if self._queue is None:
            request.execute_sync()
        else:
            self._queue.schedule_async_request(request)
            self.pending = final
        return final

    def _publish(self, step: int, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        def finalize():
            n_rng = len(list((tmp / "rng").glob("rank_*.pt")))
            if n_rng != _world():
                raise CheckpointError(f"{tmp}: {n_rng} RNG files for {_world()} ranks")
            _seal(tmp, meta, self.tokenizer)
            if final.exists():  # re-saving a step (e.g. after an earlier crash): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            _write_atomic(self.ckpt_dir / LATEST, final.name + "\n")
            _prune(self.ckpt_dir, self.keep_last, step)

        self.pending = None
        on_rank0(finalize, f"saving step {step} failed")
        if self.on_saved is not None:
            self.on_saved(final)

    def _finalize(self, blocking: bool) -> None:
        if self._queue is None or not self._queue.get_num_unfinalized_calls():
            return
        pending = self.pending
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointError:
            raise
        except Exception as e:  # megatron's finalize re-raises a writer's failure everywhere
            raise CheckpointError(f"the background save of {pending} failed: {e}") from e

    def poll(self) -> None:
        """At a step boundary: publish the background save if every rank's writer is
        done (a cheap all-reduce when it is not)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until a background save is written, and publish it."""
        if self.pending is not None:
            self.log(f"checkpoint: waiting for the background save of {self.pending.name}")
        self._finalize(blocking=True)

    def abort(self) -> None:
        """Stop a background write without publishing it (after a failure elsewhere:
        finalizing needs every rank). Its ``.incomplete`` directory stays, ignored."""
        if self._queue is None:
            return
        while self._queue.async_calls:
            self._queue.async_calls.popleft().async_caller.close(abort=True)
        self.pending = None


def save(ckpt_dir: Path, step: int, model, optimizer, scheduler,
         extra: dict[str, Any], keep_last: int,
         tokenizer: TokenizerBundle | None = None) -> Path:
    """Collective: a synchronous save (see :class:`Saver`). Returns the final checkpoint
    path. ``tokenizer`` (needed on rank 0 only) is written into the checkpoint."""
    return Saver(ckpt_dir, keep_last, tokenizer=tokenizer).save(
        step, model, optimizer, scheduler, extra)


def save_weights(path: Path, model, extra: dict[str, Any],
                 tokenizer: TokenizerBundle | None = None) -> Path:
    """Collective: a checkpoint of the model weights only (step 0; no optimizer, scheduler
    or RNG state), as ``hcx import`` writes. ``load(path, model)`` with no optimizer reads
    it, which is what ``checkpoint.init_from``, ``hcx export`` and inference do; it cannot
    be resumed from. Written as ``path.incomplete`` and renamed, so ``path`` is either
    complete or absent."""
    tmp = path.with_name(path.name + INCOMPLETE)

    def prepare():
        if path.exists():
            raise CheckpointError(f"{path} already exists")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    def finalize():
        meta = {"step": 0, "world_size": _world(), "optimizer": WEIGHTS_ONLY,
                "consumed_samples": 0, **extra}
        _seal(tmp, meta, tokenizer)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    on_rank0(prepare, f"cannot create {tmp}")
    state = _sharded_state(model, None, is_loading=False, with_optimizer=False)
    _shard_request(state, tmp, None, []).execute_sync()
    on_rank0(finalize, f"saving the weights to {path} failed")
    return path


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoint directories (not necessarily verified), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob(f"{STEP_PREFIX}*")
                  if p.is_dir() and not p.name.endswith(INCOMPLETE))


def _prune(ckpt_dir: Path, keep_last: int, newest: int) -> None:
    """Keep the checkpoint just saved and the ``keep_last - 1`` before it. Directories of
    later steps (left by a damaged checkpoint that resume skipped) are not this run's
    to judge, and are replaced when the run reaches their step."""
    older = [p for p in complete_checkpoints(ckpt_dir) if _step_of(p) < newest]
    for p in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(f"{STEP_PREFIX}*{INCOMPLETE}"):
        shutil.rmtree(p, ignore_errors=True)


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its state tensors before loading into it.

    Without Apex/Transformer Engine (torch's Adam), megatron-core 0.16's
    ``DistributedOptimizer.state_dict`` reads each state's ``step`` and fails on a
    fresh optimizer, which the load path needs. megatron's own remedy (used for its
    FSDP format) is one step on zero gradients; every value it touches (main params,
    moments, step) is then overwritten by the checkpoint.
    """
    for opt in _distributed_optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def check_shapes(path: Path, model_state: dict) -> None:
    """Refuse a checkpoint whose tensors have other shapes than the model's (another
    vocabulary, hidden size, ...): megatron-core would otherwise load some of them into
    the wrong places without complaint."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for sharded in nested_values(model_state):
        if not isinstance(sharded, ShardedTensor) or sharded.key not in saved:
            continue
        have = tuple(saved[sharded.key].global_shape)
        if have != tuple(sharded.global_shape):
            raise CheckpointError(
                f"{path}: tensor {sharded.key} has shape {have} in the checkpoint but "
                f"{tuple(sharded.global_shape)} in this model (a different model shape or "
                "tokenizer vocabulary): use a new output_dir, or a checkpoint of this shape")


def _load_strategy(path: Path, fully_parallel: bool):
    """megatron's FullyParallelLoadStrategyWrapper over the DP group (each rank reads a
    share of the replicated state and the ranks exchange it), or None (the default: each
    rank reads all it needs)."""
    group, size = _dp_group_size()
    if not fully_parallel or size == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper)

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)), group)


def load(path: Path, model, optimizer=None, scheduler=None, restore_rng: bool = True,
         log=print, fully_parallel: bool = False) -> dict[str, Any]:
    """Load a checkpoint into the (possibly differently parallelized) model.
    With ``optimizer=None`` only the weights are loaded. Returns the hcx metadata.
    Collective; refuses a checkpoint whose files changed since the save
    (:func:`verify_contents`). ``fully_parallel``: see :func:`_load_strategy`."""
    from megatron.core import dist_checkpointing

    verify_contents(path, log)
    meta = json.loads((path / META).read_text())
    if optimizer is not None:
        saved, current = meta.get("optimizer"), _optimizer_kind(optimizer)
        if saved == WEIGHTS_ONLY:
            raise CheckpointError(f"{path} holds model weights only (no optimizer state to "
                                  "resume): use it as checkpoint.init_from")
        if saved != current:
            raise CheckpointError(
                f"{path} holds a {saved} optimizer's state but this run uses a {current} one: "
                f"set parallel.distributed_optimizer={str(saved == 'distributed').lower()} to "
                "resume, or use checkpoint.init_from to take only the weights"
            )
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(model, optimizer, is_loading=True,
                           with_optimizer=optimizer is not None)
    check_shapes(path, state["model"])
    try:
        loaded = dist_checkpointing.load(state, str(path),
                                         sharded_strategy=_load_strategy(path, fully_parallel))
    except Exception as e:  # shape/key mismatches surface here; name the checkpoint
        raise CheckpointError(f"cannot load {path} into this model: {e}") from e
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
        if meta.get("world_size") == _world() and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log(f"checkpoint: saved with {meta.get('world_size')} ranks, running with {_world()}: "
                "RNG streams are re-seeded, not restored")
    return meta
