"""Makes ``lm_eval --model hcx`` work from lm-evaluation-harness's own command line.

lm-eval 0.4.13 finds models only in its registry (``lm_eval.api.registry``), which
``lm_eval/models/__init__.py`` fills with lazy ``"module:Class"`` placeholders; it reads no
entry points and imports nothing of other packages. So hcx's wheel puts
``hcx-lm-eval.pth`` into site-packages (see ``setup.py``), a one-line import hook
(:data:`PTH_LINE`) that Python runs at start-up. At start-up it only puts a small object
on ``sys.meta_path`` (no import at all, a few microseconds); each later import asks it
one string comparison. When a process imports ``lm_eval.models``, the hook imports this
module, which lets the real finder load lm-eval's model table and then adds
``"hcx" -> "hcx.evaluation.lm_eval.model:HcxLM"`` to it, as lm-eval adds its own (a lazy
placeholder: hcx's model module, and torch, load only when ``--model hcx`` is asked for).

This module uses only the standard library.
"""

from __future__ import annotations

import sys

MODEL_NAME = "hcx"
MODEL_TARGET = "hcx.evaluation.lm_eval.model:HcxLM"
WATCHED = "lm_eval.models"  # the module that fills lm-eval's model registry
MARK = "hcx_lm_eval_hook"  # the attribute that tells the hook apart on sys.meta_path

# The line of hcx-lm-eval.pth (setup.py writes the same). Python runs .pth lines that start
# with "import"; this one defines the hook inline so that start-up imports nothing, and
# adds it once (Python may process a site-packages directory twice at start-up; the
# .venv of this repository does).
PTH_LINE = (
    "import sys; any(getattr(f, 'hcx_lm_eval_hook', False) for f in sys.meta_path) or "
    "sys.meta_path.insert(0, type('HcxLmEvalHook', (), {'hcx_lm_eval_hook': True, "
    "'find_spec': staticmethod(lambda name, path=None, target=None: "
    "__import__('importlib').import_module('hcx.evaluation.lm_eval.plugin').find_spec(name, path, target) "
    "if name == 'lm_eval.models' else None)}))\n"
)


def register() -> None:
    """Add hcx's lazy placeholder to lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisterAfter:
    """Wraps the loader of ``lm_eval.models``: runs it, then :func:`register`."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        register()

    def __getattr__(self, name):  # get_source, get_data, is_package, ...
        return getattr(self._inner, name)


def find_spec(fullname, path=None, target=None):
    """The hook's answer for ``lm_eval.models``: the spec the other finders give, its
    loader wrapped so that hcx registers once lm-eval's own models are in."""
    if fullname != WATCHED:
        return None
    for finder in sys.meta_path:
        if getattr(finder, MARK, False) or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisterAfter(spec.loader)
            return spec
    return None


def install() -> None:
    """What hcx-lm-eval.pth does, for a process started without it (idempotent)."""
    if WATCHED in sys.modules:  # lm-eval's model table is loaded already
        register()
    else:
        exec(PTH_LINE, {})
