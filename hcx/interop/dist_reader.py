"""Read single tensors, or single layers of stacked tensors, from an hcx checkpoint
without building the model, so that an export holds one layer at a time.

megatron's ``dist_checkpointing`` (its ``torch_dist`` format) stores each parameter as
one global tensor of PyTorch distributed checkpoint (DCP) format, however the saving
run was laid out (TP, PP, DP): every rank wrote its shards with their offsets in the
global tensor. The layers of the decoder are stacked along a leading axis
(``decoder.layers.mlp.linear_fc2.weight`` is ``[num_layers, hidden, ffn]``), so one
layer is the slice ``[i]``; DCP's own planner helpers find the stored shards that
overlap it and copy only those bytes.

megatron's loader is not used for this: its ``dist_checkpointing.load`` builds the whole
sharded state of a model (and with one process cannot load part of a stacked tensor).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hcx.errors import HcxError


class CheckpointReadError(HcxError, ValueError):
    pass


class _Slices:
    """The load planner's part that DCP's file reader calls: where each read lands."""

    def __init__(self, targets: dict[str, torch.Tensor]):
        self.targets = targets

    def resolve_tensor(self, item) -> torch.Tensor:
        t = self.targets[item.dest_index.fqn]
        for dim, (offset, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            t = t.narrow(dim, offset, length)
        return t

    def commit_tensor(self, item, tensor) -> None:  # written in place by resolve_tensor's view
        pass

    def load_bytes(self, item, value) -> None:  # only tensors are asked for
        raise CheckpointReadError(f"unexpected non-tensor item {item.dest_index.fqn}")


class DistCheckpointReader:
    """Tensors of a dist checkpoint directory, read on demand."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        try:
            self._reader = FileSystemReader(str(self.path))
            self._metadata = self._reader.read_metadata()
        except Exception as e:  # a missing or damaged .metadata file
            raise CheckpointReadError(f"{self.path}: cannot read the checkpoint's tensor "
                                      f"index ({e})") from None
        self.tensors = {k: v for k, v in self._metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).properties.dtype

    def _entry(self, key: str):
        if key not in self.tensors:
            raise CheckpointReadError(f"{self.path}: the checkpoint has no tensor {key}")
        return self.tensors[key]

    def read(self, wanted: dict[str, tuple[str, int | None]]) -> dict[str, torch.Tensor]:
        """``{name: (key, layer)}`` -> ``{name: tensor}``: the whole tensor ``key`` when
        ``layer`` is None, else its slice ``[layer]`` (a stacked layer tensor). One pass
        over the files for all of them."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        out: dict[str, torch.Tensor] = {}
        targets: dict[str, torch.Tensor] = {}
        items = []
        for name, (key, layer) in wanted.items():
            shape = self.shape(key)
            if layer is None:
                size, offsets = shape, (0,) * len(shape)
            else:
                if not 0 <= layer < shape[0]:
                    raise CheckpointReadError(f"{self.path}: {key} has {shape[0]} layers, "
                                              f"not a layer {layer}")
                size, offsets = (1, *shape[1:]), (layer,) + (0,) * (len(shape) - 1)
            if key in targets:
                raise CheckpointReadError(f"{key} asked for twice in one read")
            targets[key] = torch.empty(size, dtype=self.dtype(key))
            out[name] = targets[key] if layer is None else targets[key][0]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(size))
            items += create_read_items_for_chunk_list(key, self.tensors[key], [chunk])
        self._reader.set_up_storage_reader(self._metadata, is_coordinator=True)
        plan = self._reader.prepare_global_plan([self._reader.prepare_local_plan(LoadPlan(items))])[0]
        self._reader.read_data(plan, _Slices(targets)).wait()
        return out
