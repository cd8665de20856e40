"""Python functions a task names (lm-eval's ``!function`` idea): ``module:function`` for an
importable module, or ``path/to/file.py:function`` (relative to the task file), so a
benchmark of a new shape is a YAML file and a small user module, not a change inside hcx.

- ``process_docs``: ``function(docs: list[dict]) -> list[dict]``, applied to every dataset
  the task reads (its examples and its few-shot pool), after ``dataset.filter``;
- ``metric_functions``: ``{name: function}``, each ``function(predictions, references) ->
  float`` over the whole task (a correlation, a corpus score): ``predictions`` are the
  extracted answers of a generation task, ``references`` each example's targets; the
  standard error is a bootstrap over the examples.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from hcx.errors import HcxError


class TaskFunctionError(HcxError, ValueError):
    pass


def load_function(spec: str, task_name: str, task_file: Path | None, key: str) -> Callable:
    """The callable ``spec`` names; errors name the task, the key and what to fix."""
    where = f"task {task_name}: {key}={spec!r}"
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise TaskFunctionError(f"{where}: expected 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_absolute() and task_file is not None:
            path = task_file.parent / path
        if not path.is_file():
            raise TaskFunctionError(f"{where}: no such file {path}")
        name = f"hcx_task_functions_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                raise TaskFunctionError(f"{where}: importing {path} failed: {e!r}") from None
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise TaskFunctionError(f"{where}: cannot import {module_name} ({e}); put it on "
                                    "PYTHONPATH or name a file: 'path/to/file.py:function'") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TaskFunctionError(f"{where}: {module_name} has no function {attr!r}")
    return fn
