"""The one way tracepipe replaces a file: a temp file in the same directory, write, fsync, rename over the
target, fsync the directory. A reader sees the old file or the new one, never half of one; after return the
new one survives a power loss (unless `durable=False`, for monitoring files that may lag a crash).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["fsync_dir", "move_durably", "replacing", "write_atomic"]

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename (or create, unlink) in directory `path` durable. Silently nothing where directories
    cannot be opened (some network filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """`with replacing(path) as tmp:` write `tmp` (any writer that takes a file name: pyarrow, numpy); on
    exit it is fsynced and renamed over `path`, and the directory fsynced. On an error the temp file is
    removed and `path` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Replace `path` with `data` (text is written as UTF-8)."""
    with replacing(path, durable=durable) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def move_durably(source: Path, target: Path) -> None:
    """Rename `source` to `target` (same filesystem) and make both directory entries durable."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)
    if Path(source).parent != Path(target).parent:
        fsync_dir(Path(source).parent)
