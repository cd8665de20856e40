"""megatron-core's fused kernels compiled when first called instead of when imported.

megatron-core 0.16 decorates its fused kernels (bias + GeLU, GeGLU, SwiGLU, ...) with
``megatron.core.jit.jit_fuser``, which is ``torch.compile``; the first decoration imports
TorchDynamo and Inductor, about 1.5 s of every process's start (a quarter of ``import
megatron.core``, paid by every ``hcx`` command, torchrun rank and test subprocess). hcx
turns those fusions off (``bias_activation_fusion=False`` and the others in
:mod:`hcx.engine.model`), so the kernels are never called; should one be, it is compiled
then, with the same options, which is all ``torch.compile`` does lazily anyway.

:func:`install` (run when ``hcx`` is imported; it imports neither torch nor megatron)
wraps ``jit_fuser`` the moment ``megatron.core.jit`` is loaded, before any kernel is
decorated. Any other ``jit_fuser`` (megatron's ``torch.jit.script`` fallback, or the no-op
of ``disable_jit_fuser``) is left as it is.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

MODULE = "megatron.core.jit"


def deferred(compile_fn):
    """A drop-in for ``compile_fn`` (``torch.compile``) that compiles on the first call."""

    def jit_fuser(fn=None, **options):
        if fn is None:  # used as @jit_fuser(**options)
            return lambda f: jit_fuser(f, **options)
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(fn, **options)
            return compiled(*args, **kwargs)

        return call

    return jit_fuser


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = deferred(torch.compile)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Defer megatron's kernel compilation in this process (once; no effect if megatron
    is already imported)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
