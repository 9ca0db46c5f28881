"""A lazy file system for power-cut tests, in the spirit of LazyFS (written here, not copied): a FUSE file
system over a backing folder that keeps what a power cut would lose in memory, and drops it on command.

* A file's data reaches the durable state only when the file is fsynced (or fdatasynced).
* A folder's entries (new names, renames, unlinks, new folders) reach it only when the folder is fsynced.
* ``drop``: everything not durable is forgotten, exactly as a power cut would: the view becomes the durable
  state (a name made durable whose data never was is an empty file).

Commands go through a control file at the mount's root, ``.lazyfs-control`` (write ``drop``). At unmount the
durable state is written to the backing folder, so a remount starts from what survived; a power-cut test
drops, unmounts and mounts again (the kernel's caches of the old view go with the unmount).

SQLite on it: POSIX byte-range locks are left to the kernel (FUSE keeps them locally when the file system
implements no ``lock``), and mmap of the WAL index works through the page cache; both are fine for one
process, which is how the appliance uses its store.

Run: ``python -m tests.lazyfs BACKING MOUNTPOINT`` (foreground; ``fusermount -u MOUNTPOINT`` to stop).
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CONTROL = ".lazyfs-control"


@dataclass
class Node:
    """A file or folder: its id stays with it through renames."""

    id: int
    is_dir: bool
    data: bytearray = field(default_factory=bytearray)  # a file's live bytes
    entries: dict[str, int] = field(default_factory=dict)  # a folder's live names -> node ids
    mode: int = 0o644
    mtime: float = field(default_factory=time.time)


class LazyState:
    """The live view and the durable state, as plain data (no FUSE here): the tests of the semantics use it
    directly too."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.nodes: dict[int, Node] = {}
        self.root = self._new(True, 0o755)
        self.durable_data: dict[int, bytes] = {}  # file id -> its bytes at its last fsync
        self.durable_entries: dict[int, dict[str, int]] = {self.root: {}}  # folder id -> names at its last fsync
        self.durable_modes: dict[int, tuple[bool, int]] = {self.root: (True, 0o755)}
        self.lock = threading.RLock()

    def _new(self, is_dir: bool, mode: int) -> int:
        node = Node(next(self._ids), is_dir, mode=mode)
        self.nodes[node.id] = node
        return node.id

    # ---------------------------------------------------------------------------------------- paths
    def lookup(self, path: str) -> Node:
        node = self.nodes[self.root]
        for part in [p for p in path.split("/") if p]:
            if not node.is_dir or part not in node.entries:
                raise OSError(errno.ENOENT, path)
            node = self.nodes[node.entries[part]]
        return node

    def parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        folder = self.lookup(head or "/")
        if not folder.is_dir:
            raise OSError(errno.ENOTDIR, head)
        return folder, name

    # ---------------------------------------------------------------------------------------- changes
    def create(self, path: str, mode: int, is_dir: bool = False) -> Node:
        folder, name = self.parent(path)
        if name in folder.entries:
            raise OSError(errno.EEXIST, path)
        node_id = self._new(is_dir, mode)
        folder.entries[name] = node_id
        return self.nodes[node_id]

    def unlink(self, path: str) -> None:
        folder, name = self.parent(path)
        node_id = folder.entries.pop(name, None)
        if node_id is None:
            raise OSError(errno.ENOENT, path)

    def rename(self, old: str, new: str) -> None:
        src, a = self.parent(old)
        dst, b = self.parent(new)
        if a not in src.entries:
            raise OSError(errno.ENOENT, old)
        node_id = src.entries.pop(a)
        dst.entries[b] = node_id

    def fsync_file(self, node: Node) -> None:
        if node.is_dir:
            self.fsync_dir(node)
        else:
            self.durable_data[node.id] = bytes(node.data)
            self.durable_modes[node.id] = (False, node.mode)

    def fsync_dir(self, node: Node) -> None:
        self.durable_entries[node.id] = dict(node.entries)
        for name, child in node.entries.items():
            c = self.nodes[child]
            self.durable_modes.setdefault(child, (c.is_dir, c.mode))
            if c.is_dir:
                self.durable_entries.setdefault(child, {})

    def drop(self) -> None:
        """The power cut: the live view becomes the durable state."""
        kept: dict[int, Node] = {}

        def rebuild(node_id: int) -> None:
            is_dir, mode = self.durable_modes.get(node_id, (False, 0o644))
            node = Node(node_id, is_dir, mode=mode)
            kept[node_id] = node
            if is_dir:
                node.entries = dict(self.durable_entries.get(node_id, {}))
                for child in node.entries.values():
                    rebuild(child)
            else:
                node.data = bytearray(self.durable_data.get(node_id, b""))

        rebuild(self.root)
        self.nodes = kept

    # ---------------------------------------------------------------------------------------- disk
    def load(self, backing: Path) -> None:
        """The backing folder as the durable (and live) state."""
        def walk(folder: Path, node: Node) -> None:
            for p in sorted(folder.iterdir()):
                child = Node(next(self._ids), p.is_dir(), mode=stat.S_IMODE(p.stat().st_mode))
                self.nodes[child.id] = child
                node.entries[p.name] = child.id
                if child.is_dir:
                    walk(p, child)
                else:
                    child.data = bytearray(p.read_bytes())
                self.fsync_file(child)
            self.fsync_dir(node)

        walk(backing, self.nodes[self.root])

    def save(self, backing: Path) -> None:
        """The durable state into the backing folder (at unmount): what survived, and nothing else."""
        self.drop()
        for p in backing.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

        def write(folder: Path, node: Node) -> None:
            for name, child_id in node.entries.items():
                child = self.nodes[child_id]
                if child.is_dir:
                    (folder / name).mkdir(mode=child.mode)
                    write(folder / name, child)
                else:
                    (folder / name).write_bytes(bytes(child.data))
                    os.chmod(folder / name, child.mode)

        write(backing, self.nodes[self.root])


def serve(backing: Path, mountpoint: Path) -> None:
    from fuse import FUSE, FuseOSError, Operations

    state = LazyState()
    state.load(backing)

    def guarded(fn):
        def run(*args):
            with state.lock:
                try:
                    return fn(*args)
                except KeyError:
                    raise FuseOSError(errno.ENOENT) from None
                except OSError as exc:
                    raise FuseOSError(exc.errno or errno.EIO) from None
        return run

    class Lazy(Operations):
        use_ns = False

        @guarded
        def getattr(self, path, fh=None):
            if path == "/" + CONTROL:
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
            node = state.lookup(path)
            kind = stat.S_IFDIR if node.is_dir else stat.S_IFREG
            return {"st_mode": kind | node.mode, "st_nlink": 2 if node.is_dir else 1,
                    "st_size": len(node.data), "st_mtime": node.mtime, "st_ctime": node.mtime,
                    "st_atime": node.mtime, "st_uid": os.getuid(), "st_gid": os.getgid()}

        @guarded
        def readdir(self, path, fh):
            return [".", "..", *state.lookup(path).entries]

        @guarded
        def mkdir(self, path, mode):
            state.create(path, stat.S_IMODE(mode), is_dir=True)

        @guarded
        def create(self, path, mode, fi=None):
            state.create(path, stat.S_IMODE(mode))
            return 0

        @guarded
        def open(self, path, flags):
            if path != "/" + CONTROL:
                node = state.lookup(path)
                if flags & os.O_TRUNC:
                    node.data = bytearray()
            return 0

        @guarded
        def read(self, path, size, offset, fh):
            return bytes(state.lookup(path).data[offset:offset + size])

        @guarded
        def write(self, path, data, offset, fh):
            if path == "/" + CONTROL:
                if data.strip() == b"drop":
                    state.drop()
                return len(data)
            node = state.lookup(path)
            if offset > len(node.data):
                node.data.extend(b"\0" * (offset - len(node.data)))
            node.data[offset:offset + len(data)] = data
            node.mtime = time.time()
            return len(data)

        @guarded
        def truncate(self, path, length, fh=None):
            if path == "/" + CONTROL:
                return
            node = state.lookup(path)
            del node.data[length:]
            node.data.extend(b"\0" * (length - len(node.data)))

        @guarded
        def unlink(self, path):
            state.unlink(path)

        @guarded
        def rmdir(self, path):
            if state.lookup(path).entries:
                raise OSError(errno.ENOTEMPTY, path)
            state.unlink(path)

        @guarded
        def rename(self, old, new):
            state.rename(old, new)

        @guarded
        def chmod(self, path, mode):
            state.lookup(path).mode = stat.S_IMODE(mode)

        def chown(self, path, uid, gid):
            return 0

        def utimens(self, path, times=None):
            return 0

        @guarded
        def fsync(self, path, datasync, fh):
            state.fsync_file(state.lookup(path))

        @guarded
        def fsyncdir(self, path, datasync, fh):
            state.fsync_dir(state.lookup(path))

        def flush(self, path, fh):
            return 0

        def release(self, path, fh):
            return 0

        def statfs(self, path):
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 20, "f_bfree": 1 << 19,
                    "f_bavail": 1 << 19, "f_files": 1 << 16, "f_ffree": 1 << 15, "f_namemax": 255}

    try:
        FUSE(Lazy(), str(mountpoint), foreground=True, nothreads=True, default_permissions=True)
    finally:
        with state.lock:
            state.save(backing)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]))
