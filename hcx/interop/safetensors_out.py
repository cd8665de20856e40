"""Sharded safetensors written tensor by tensor, as the tensors arrive.

``safetensors.torch.save_file`` takes a whole shard's tensors at once, which for the
Hugging Face default shard size (5 GB) means holding 5 GB. Since every tensor's name,
shape and dtype is known before any is read (they follow from the recipe), the shards
are planned up front with Hugging Face's own rule (``huggingface_hub``'s
``split_state_dict_into_shards_factory``: tensors in order, a new shard when the next
would pass ``max_shard_size``, a larger tensor alone), each shard's header is written
first, and each tensor's bytes are appended when it comes. Files and index follow
transformers' conventions: ``model.safetensors`` when one shard suffices, else
``model-00001-of-00003.safetensors``... with ``model.safetensors.index.json``
(``metadata.total_size``, ``metadata.total_parameters``, ``weight_map``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from hcx.errors import HcxError

SINGLE, INDEX, PATTERN = "model.safetensors", "model.safetensors.index.json", "model{suffix}.safetensors"

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


# huggingface_hub's units (parse_size_to_int): decimal, so "5GB" is 5 * 10**9 bytes
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}


class ShardError(HcxError, ValueError):
    pass


def parse_size(size: str | int) -> int:
    """Bytes in ``5GB``/``500MB``/``2KB``/``1TB`` (powers of 1000, as Hugging Face
    counts) or an integer; errors name ``--max-shard-size``."""
    if isinstance(size, int) or str(size).strip().isdigit():
        value = int(size)
    else:
        text = str(size).strip()
        unit = text[-2:].upper()
        try:
            value = int(float(text[:-2]) * SIZE_UNITS[unit])
        except (KeyError, ValueError):
            raise ShardError(f"--max-shard-size {size!r}: give bytes or a size like 5GB, "
                             "500MB (units KB, MB, GB, TB)") from None
    if value <= 0:
        raise ShardError(f"--max-shard-size {size!r} must be positive")
    return value


class _Spec:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.nbytes = math.prod(shape) * dtype.itemsize


class ShardedWriter:
    """Writes ``plan`` (name -> (shape, dtype), in the order :meth:`add` receives them)
    into ``directory``; :meth:`close` checks that every tensor came and writes the index."""

    def __init__(self, directory: Path, plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_size: str | int = "5GB"):
        from huggingface_hub import split_state_dict_into_shards_factory

        self.directory = Path(directory)
        specs = {name: _Spec(shape, dtype) for name, (shape, dtype) in plan.items()}
        for name, spec in specs.items():
            if spec.dtype not in DTYPES:
                raise ShardError(f"{name}: dtype {spec.dtype} has no safetensors code")
        split = split_state_dict_into_shards_factory(
            specs, get_storage_size=lambda s: s.nbytes, get_storage_id=lambda s: None,
            filename_pattern=PATTERN, max_shard_size=parse_size(max_shard_size))
        self.sharded = split.is_sharded
        self.files = {file: list(names) for file, names in split.filename_to_tensors.items()}
        self.metadata = {"total_parameters": sum(math.prod(s.shape) for s in specs.values()),
                         **split.metadata}
        self.weight_map = {n: f for f, names in self.files.items() for n in names}
        self._specs = specs
        # Hugging Face's split puts a tensor above max_shard_size in a shard of its own
        # ahead of the shard being filled, so files are not filled one after another:
        # each is open from its first tensor to its last, in its planned order.
        self._written = {file: 0 for file in self.files}
        self._handles: dict = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``: the next of its file in the plan, of its shape and dtype."""
        file = self.weight_map.get(name)
        if file is None:
            raise ShardError(f"{name} is not in the export's plan")
        names = self.files[file]
        if self._written[file] >= len(names) or names[self._written[file]] != name:
            raise ShardError(f"{name} came out of order for {file}")
        spec = self._specs[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ShardError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, planned "
                             f"{spec.shape} {spec.dtype}")
        if file not in self._handles:
            self._handles[file] = self._open(file)
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1)
        self._handles[file].write(memoryview(data.numpy()))
        self._written[file] += 1
        if self._written[file] == len(names):
            self._handles.pop(file).close()

    def _open(self, file: str):
        header: dict = {"__metadata__": {"format": "pt"}}
        at = 0
        for name in self.files[file]:
            spec = self._specs[name]
            header[name] = {"dtype": DTYPES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [at, at + spec.nbytes]}
            at += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes
        handle = open(self.directory / file, "wb")
        handle.write(struct.pack("<Q", len(text)) + text)
        return handle

    def close(self) -> list[str]:
        """Write the index (sharded) and return the files written."""
        for handle in self._handles.values():
            handle.close()
        missing = [n for f, names in self.files.items() for n in names[self._written[f]:]]
        if missing:
            raise ShardError(f"the export stopped before {missing[0]}")
        if self.sharded:
            index = {"metadata": self.metadata, "weight_map": self.weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            return [*self.files, INDEX]
        return list(self.files)
