"""Checkpoints with megatron-core ``dist_checkpointing``.

Layout of ``<checkpoint dir>``::

    latest                 text file naming the newest complete checkpoint
    step_00000020/         a complete checkpoint
        (dist_checkpointing files: model + optimizer, layout independent)
        hcx.json           step, consumed samples, scheduler, recipe (written last)
        rng/rank_00003.pt  python/numpy/torch(/cuda)/megatron-tracker RNG per rank
    step_00000030.incomplete/   a save that was interrupted (ignored, removed)

A save writes into ``step_N.incomplete``, verifies it, renames it to ``step_N`` and
only then replaces ``latest`` (write to a temp file, fsync, ``os.replace``). A crash at
any point leaves ``latest`` naming the previous complete checkpoint. Resume trusts
``latest`` only after verifying what it names and otherwise falls back to the newest
complete checkpoint, saying why.

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

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hcx.errors import HcxError
from hcx.files import write_text_atomic

STEP_PREFIX = "step_"
INCOMPLETE = ".incomplete"
META = "hcx.json"
LATEST = "latest"
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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


# --- finding checkpoints -----------------------------------------------------------


def verify(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else the reason it is not."""
    if not path.is_dir():
        return "directory missing"
    if not (path / META).is_file():
        return f"no {META} (the save did not finish)"
    if not (path / "metadata.json").is_file():
        return "no dist_checkpointing metadata.json"
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable {META}: {e}"
    files = meta.get("files", {})
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, expected {size}"
    return None


def find_resumable(ckpt_dir: Path, log=print) -> Found | None:
    """The checkpoint to resume from, explaining anything skipped."""
    if not ckpt_dir.is_dir():
        return None
    for p in sorted(ckpt_dir.glob(f"{STEP_PREFIX}*{INCOMPLETE}")):
        log(f"checkpoint: skipping half-written checkpoint {p} (a save was interrupted)")
    candidates = complete_checkpoints(ckpt_dir)[::-1]
    latest_file = ckpt_dir / LATEST
    if latest_file.is_file():
        named = ckpt_dir / latest_file.read_text().strip()
        reason = verify(named)
        if reason is None:
            return Found(named, _step_of(named), json.loads((named / META).read_text()))
        log(f"checkpoint: '{LATEST}' names {named}, which is not usable ({reason}); "
            "falling back to the newest complete checkpoint")
    for p in candidates:
        reason = verify(p)
        if reason is None:
            return Found(p, _step_of(p), json.loads((p / META).read_text()))
        log(f"checkpoint: skipping {p}: {reason}")
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


def _seal(tmp: Path, meta: dict[str, Any], tokenizer: TokenizerBundle | None) -> None:
    """Finish a checkpoint directory: write the run's tokenizer into it, record every
    file's size in hcx.json (written last, atomically, so its presence means the save
    completed) and verify the result."""
    if tokenizer is not None:
        tokenizer.write(tmp)
        meta = {**meta, TOKENIZER_KEY: tokenizer.path}
    files = {str(p.relative_to(tmp)): p.stat().st_size
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_atomic(tmp / META, json.dumps({**meta, "files": files}, indent=1))
    reason = verify(tmp)
    if reason:
        raise CheckpointError(f"checkpoint {tmp} failed verification: {reason}")


def save(ckpt_dir: Path, step: int, model, optimizer, scheduler,
         extra: dict[str, Any], keep_last: int,
         tokenizer: TokenizerBundle | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. ``tokenizer``
    (needed on rank 0 only) is written into the checkpoint."""
    from megatron.core import dist_checkpointing

    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / (step_dir_name(step) + INCOMPLETE)

    def prepare():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def finalize():
        n_rng = len(list((tmp / "rng").glob("rank_*.pt")))
        if n_rng != _world():
            raise CheckpointError(f"{tmp}: {n_rng} RNG files for {_world()} ranks")
        meta = {"step": step, "world_size": _world(), "optimizer": _optimizer_kind(optimizer),
                "scheduler": scheduler.state_dict(), **extra}
        _seal(tmp, meta, tokenizer)
        if final.exists():  # re-saving a step (e.g. after an earlier crash): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        _write_atomic(ckpt_dir / LATEST, final.name + "\n")
        _prune(ckpt_dir, keep_last, step)

    on_rank0(prepare, f"cannot create {tmp}")
    state = _sharded_state(model, optimizer, is_loading=False, with_optimizer=True)
    dist_checkpointing.save(state, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    on_rank0(finalize, f"saving step {step} failed")
    return final


def save_weights(path: Path, model, extra: dict[str, Any],
                 tokenizer: TokenizerBundle | None = None) -> Path:
    """Collective: a checkpoint of the model weights only (step 0; no optimizer, scheduler
    or RNG state), as ``hcx import`` writes. ``load(path, model)`` with no optimizer reads
    it, which is what ``checkpoint.init_from``, ``hcx export`` and inference do; it cannot
    be resumed from. Written as ``path.incomplete`` and renamed, so ``path`` is either
    complete or absent."""
    from megatron.core import dist_checkpointing

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
    dist_checkpointing.save(state, str(tmp))
    _barrier()
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


def load(path: Path, model, optimizer=None, scheduler=None, restore_rng: bool = True,
         log=print) -> dict[str, Any]:
    """Load a checkpoint into the (possibly differently parallelized) model.
    With ``optimizer=None`` only the weights are loaded. Returns the hcx metadata."""
    from megatron.core import dist_checkpointing

    reason = verify(path)
    if reason:
        raise CheckpointError(f"cannot load {path}: {reason}")
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
        loaded = dist_checkpointing.load(state, str(path))
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
