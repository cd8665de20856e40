"""Writing small text files so that a crash leaves the old file or the new one, never half
of one: checkpoint metadata, evaluation scores and samples, reports, pipeline state,
launch scripts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, fsync it, then rename it
    over ``path``. Missing folders are created. The file gets ``mode``, else the permissions of any new file (0666 less
    the umask; mkstemp's own 0600 would hide reports and scores from other users). The
    temporary file is removed if anything fails."""
    if not isinstance(text, str):
        raise TypeError(f"write_text_atomic writes str, not {type(text).__name__} "
                        "(write_bytes_atomic writes bytes)")
    return write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """:func:`write_text_atomic` for bytes (a report's PNG chart)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # `--out new/dir/file` just works
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
