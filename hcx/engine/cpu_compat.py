"""Make megatron-core 0.16 run on machines without CUDA.

megatron-core assumes CUDA in a handful of places even when nothing needs a GPU
(see docs/architecture.md, "CPU compatibility"). This module is the *only* place
hcx works around that. ``enable()`` does nothing when CUDA is available, so the
GPU path is megatron-core exactly as released.

Patched spots (observed in megatron-core 0.16.1; every one raises
"Torch not compiled with CUDA enabled" or "Found no NVIDIA driver" otherwise):

1. ``device="cuda"`` / ``device=torch.cuda.current_device()`` in tensor factories:
   pipeline schedules (``total_num_tokens = torch.zeros(..., device="cuda")``),
   ``p2p_communication`` (shape exchange buffers), ``param_and_grad_buffer`` (DDP
   grad buffers), ``utils.GlobalMemoryBuffer`` (attention scratch), RoPE
   ``inv_freq.to(device=...)``, ``clip_grads`` norms, ``tensor.cuda()`` calls.
   A ``TorchFunctionMode`` rewrites any CUDA device argument to CPU.
2. ``torch.cuda.current_device()`` returns ``"cpu"``, so the many
   ``device=torch.cuda.current_device()`` arguments need no rewriting. This matters
   in custom autograd backwards (``tensor_parallel/layers.py`` allocates the
   sequence-parallel all-gather buffer there), which the autograd engine runs
   without the function-mode stack of 1. ``torch.cuda.synchronize()`` is a no-op
   (p2p and the DDP buffers call it).
3. The tensor-parallel RNG tracker (``tensor_parallel/random.py``) saves, seeds
   and restores the *CUDA* generator even with dropout 0. On CPU the generator
   that dropout uses is the CPU default generator, so the tracker gets CPU
   versions of get/set/seed. This keeps the tracker's meaning: forks inside a
   model-parallel region draw from a per-TP-rank stream.
4. Type-string checks: the optimizers and ``clip_grads`` test
   ``param.type() == 'torch.cuda.FloatTensor'`` (and the Half/BFloat16 names) to
   pick fp32 vs mixed-precision paths, and raise on anything else. Under the mode,
   ``Tensor.type()`` reports a CPU tensor under its CUDA name: on a CUDA-less
   machine the CPU plays the role megatron gives the CUDA device everywhere else.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_enabled = False
_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # an int device index means a CUDA device
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call (spot 1)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # spot 4
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def is_active() -> bool:
    return _enabled


def enable() -> bool:
    """Install the patches if CUDA is absent. Returns True when they are active."""
    global _enabled, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _enabled:
            return True
        # Spot 2.
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda device=None: None
        # Spot 3: the CUDA generator API, as used by megatron's RNG tracker.
        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
        torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._get_cuda_rng_state = _cpu_get_rng_state
        mcore_random._set_cuda_rng_state = _cpu_set_rng_state
        # Spot 1. The mode stack is per thread; megatron's device work runs on the
        # main thread (checkpoint writer threads only do file I/O).
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _enabled = True
    return True
