"""The one data-root resolver: a CLI flag, then ``HCX_DATA_DIR``, then ``../shared/data``;
and the rule that makes a recipe's relative input paths absolute (:func:`resolve_input`).

Recipes name shared files as ``data://train/pretrain/...``; everything else is an
ordinary path. A recipe's relative input paths are made absolute when it is loaded
(see :func:`resolve_input` and docs/recipes.md, "Paths"), so what a run records never
depends on the directory a later command runs in.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

DATA_SCHEME = "data://"
_flag_root: Path | None = None

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def set_data_root(path: str | os.PathLike | None) -> None:
    """Set by the ``--data-dir`` CLI flag; takes precedence over the environment."""
    global _flag_root
    _flag_root = Path(path) if path else None


def data_root() -> Path:
    if _flag_root is not None:
        return _flag_root
    if os.environ.get("HCX_DATA_DIR"):
        return Path(os.environ["HCX_DATA_DIR"])
    for candidate in (PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return PROJECT_ROOT.parent / "shared" / "data"


def resolve(path: str) -> Path:
    """Resolve a recipe path; ``data://x`` becomes ``<data root>/x``."""
    if path.startswith(DATA_SCHEME):
        root = data_root()
        resolved = root / path[len(DATA_SCHEME):]
        if not root.is_dir():
            raise FileNotFoundError(
                f"{path}: data root {root} does not exist; pass --data-dir or set HCX_DATA_DIR"
            )
        return resolved
    return Path(path)


def _absolute(path: Path) -> Path:
    """``path`` made absolute and normalised (``..`` removed) without resolving symbolic
    links (a data folder linked into place keeps its name)."""
    return Path(os.path.normpath(os.path.join(os.getcwd(), os.path.expanduser(path))))


def _present(path: Path) -> bool:
    """A file or folder, a glob that matches something, or an indexed dataset prefix
    (``name`` for ``name.bin``/``name.idx``)."""
    text = str(path)
    if path.exists() or os.path.exists(text + ".idx") or os.path.exists(text + ".bin"):
        return True
    return glob.has_magic(text) and bool(glob.glob(text))


def resolve_input(value: str, recipe_dir: Path | None) -> str:
    """A recipe's input path (a tokenizer, a data source, a checkpoint to start from),
    absolute. Paths with a scheme (``data://``, ``hf://``, ``python://``) and absolute
    paths are kept. A relative path

    - given on the command line (``recipe_dir`` None: a ``KEY=VALUE`` override) is taken
      from the current directory, as any shell argument;
    - written in a recipe file is taken from that file's folder (``recipe_dir``, the file
      that sets the key, which may be a ``base:``); where nothing is there, a path into a
      shipped folder (``tokenizer/...``, ``eval/...``, ``recipes/...``) is taken from the
      shipped root (:func:`hcx.resources.root`: the repository root of a checkout, the
      package's copy in a wheel), and anything else from the current directory, where
      ``output_dir`` puts runs (so ``init_from: runs/tiny/checkpoints`` finds what ``hcx
      pretrain`` wrote); the first candidate that exists wins, and with none the current
      directory's.
    """
    if not value or "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(_absolute(path))
    here = _absolute(path)
    if recipe_dir is None:
        return str(here)
    candidates = [_absolute(Path(recipe_dir) / path)]
    from hcx.resources import shipped_file

    shipped = shipped_file(path)
    if shipped is not None:
        candidates.append(_absolute(shipped))
    candidates.append(here)
    return str(next((c for c in candidates if _present(c)), here))
