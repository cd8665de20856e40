"""The files hcx ships besides its code: benchmark tasks and suites (``eval/``), the
default tokenizer and its spec (``tokenizer/``) and the recipes (``recipes/``).

In a checkout (and an editable install) they are the repository's own top-level folders,
which is where the README, the tests and ``hcx pretrain recipes/tiny.yaml`` find them. A
wheel carries copies of them as package data under ``hcx/shipped/`` (setup.py's
``build_py`` puts them there), read with :mod:`importlib.resources`. :func:`root` is the
folder holding ``eval/``, ``tokenizer/`` and ``recipes/`` in either case.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
from importlib import resources
from pathlib import Path

from hcx.errors import HcxError

#: The top-level folders that are shipped, and their place inside the package.
SHIPPED = ("eval", "tokenizer", "recipes")
PACKAGE_DIR = "shipped"

_CHECKOUT = Path(__file__).resolve().parents[1]


class ResourceError(HcxError, FileNotFoundError):
    pass


@functools.lru_cache(maxsize=None)
def root() -> Path:
    """The folder that holds ``eval/``, ``tokenizer/`` and ``recipes/``: ``hcx/shipped``
    inside an installed wheel, else the repository root of a checkout."""
    packaged = resources.files("hcx") / PACKAGE_DIR
    if packaged.is_dir():
        if isinstance(packaged, Path):
            return packaged
        # A package imported from a zip: extract once, for the life of the process
        # (tokenizers and recipes are read by libraries that need real files).
        stack = contextlib.ExitStack()
        atexit.register(stack.close)
        return Path(stack.enter_context(resources.as_file(packaged)))
    if (_CHECKOUT / "eval" / "tasks").is_dir():
        return _CHECKOUT
    raise ResourceError(f"hcx's shipped files (eval/, tokenizer/, recipes/) are neither in "
                        f"{packaged} (an installed wheel) nor in {_CHECKOUT} (a checkout): "
                        "reinstall hcx")


def tasks_dir() -> Path:
    """``eval/tasks``: one YAML file per benchmark task (``_base/`` holds their bases)."""
    return root() / "eval" / "tasks"


def suites_dir() -> Path:
    """``eval/suites``: one YAML file per suite."""
    return root() / "eval" / "suites"


def recipes_dir() -> Path:
    return root() / "recipes"


def default_tokenizer() -> Path:
    """The shipped bilingual tokenizer, ``tokenizer/hcx-ko-en-32k/tokenizer.model``."""
    return root() / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model"


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes, relative to ``recipes/`` (``tiny.yaml``,
    ``pipeline/demo.yaml``, ...)."""
    base = recipes_dir()
    return sorted(str(p.relative_to(base)) for p in base.rglob("*.yaml"))


def recipe_path(path: str | Path) -> Path:
    """A recipe file: ``path`` itself when it exists (any user recipe, anywhere), else the
    shipped recipe it names: ``tiny.yaml``, ``recipes/tiny.yaml`` and
    ``pipeline/demo.yaml`` work from any directory, with a wheel as in a checkout. A name
    that is neither comes back unchanged (the loader then says it is not found)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts
    inside = Path(*parts[1:]) if parts and parts[0] == "recipes" and len(parts) > 1 else given
    try:
        candidate = recipes_dir() / inside
    except ResourceError:
        return given
    return candidate if candidate.is_file() else given


def shipped_file(path: str | Path) -> Path | None:
    """The shipped file or folder a relative path names from the shipped root
    (``tokenizer/hcx-ko-en-32k/tokenizer.model``), or None when it names none (its
    first part must be one of :data:`SHIPPED`)."""
    rel = Path(path)
    if rel.is_absolute() or not rel.parts or rel.parts[0] not in SHIPPED:
        return None
    try:
        candidate = root() / rel
    except ResourceError:
        return None
    return candidate if candidate.exists() else None
