"""Atomic file writes: readers see either the old file or the complete new one.

Each write goes to a temporary file in the target's folder, is flushed to disk, and
then replaces the target with `os.replace`, which is atomic on POSIX file systems.
A failure part way leaves the target untouched and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path that replaces `target` when the block exits cleanly.

    The caller writes the file at the yielded path by any means (a library's
    `save`, `savefig`, `to_csv`). The temporary name keeps the target's suffix,
    because some writers (Keras `save`, matplotlib) pick the format from it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f".partial{target.suffix}", dir=target.parent
    )
    os.close(handle)
    temporary_path = Path(temporary)
    # mkstemp creates the file private (0600); give it the mode a plain open() would.
    os.chmod(temporary_path, 0o666 & ~_current_umask())
    try:
        yield temporary_path
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, target)
    finally:
        temporary_path.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `target` atomically and return the target path."""
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `target` atomically and return the target path."""
    return write_bytes(target, text.encode("utf-8"))


def replace_symlink(link: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    """Point `link` at `destination`, replacing any existing link atomically."""
    link = Path(link)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.partial")
    temporary.unlink(missing_ok=True)
    os.symlink(destination, temporary)
    os.replace(temporary, link)
