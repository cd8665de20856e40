"""The one data-root resolver: a CLI flag, then ``HCX_DATA_DIR``, then ``../shared/data``.

Recipes name shared files as ``data://train/pretrain/...``; everything else is an
ordinary path (relative paths are taken from the current directory).
"""

from __future__ import annotations

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
