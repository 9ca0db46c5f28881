"""Files that survive a power cut: data fsynced before its name is, and the name fsynced with its folder.

A rename alone is atomic against a crash of the process, not against a power cut: the kernel may write the
new name before the data, so after the cut the final name holds a truncated file, or the rename is lost with
the folder's unsynced entries. So: write a temporary name, fsync it, rename it into place, fsync the folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file (or, opened read-only, a folder) by its path."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Put the finished file ``tmp`` in place as ``path``: its data fsynced, renamed, the folder fsynced."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def write_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``data`` into ``path`` with ``mode`` from the start (a key or token is never readable by others, not
    even half-written), whole or absent after a power cut."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # O_CREAT's mode passes through the umask
    replace_durably(tmp, path)
