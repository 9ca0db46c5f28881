"""A lazy file system for power-cut tests, in the spirit of LazyFS (written here, not copied): a FUSE file
system over a backing folder that keeps what a power cut would lose in memory, and drops it on command.

* A file's data reaches the durable state only when the file is fsynced (or fdatasynced).
* A folder's entries (new names, renames, unlinks, new folders) reach it only when the folder is fsynced.
* ``drop``: everything not durable is forgotten, exactly as a power cut would: the view becomes the durable
  state (a name made durable whose data never was is an empty file).

Commands go through a control file at the mount's root, ``.lazyfs-control``, one per write:

* ``drop``: forget everything pending (the file system stays usable).
* ``cut PID``: the power cut of a machine running process PID: SIGKILL it, drop what is pending, and fail
  every later operation with EIO until the unmount (nothing more can become durable).
* ``arm OPS WHEN NTH REGEX``: a cut at a chosen moment: at the NTH operation in OPS (comma-separated:
  create, mkdir, write, truncate, fsync, fsyncdir, rename, unlink, rmdir) on a path matching REGEX, the
  process that asked for it is killed and the power cut, ``before`` or ``after`` the operation takes effect
  (after an fsync: the data is durable, but the caller never learns it).
* ``disarm``: no armed cut; prints how many operations matched.

What happens is printed on stdout, one line each: ``cut <what>`` and ``matched <n>``. At unmount the durable
state is written to the backing folder, so a remount starts from what survived; a power-cut test cuts,
unmounts and mounts again (the kernel's caches of the old view go with the unmount).

SQLite on it: POSIX byte-range locks are left to the kernel (FUSE keeps them locally when the file system
implements no ``lock``), and mmap of the WAL index works through the page cache; both are fine for one
process, which is how the appliance uses its store.

Run: ``python -m tests.lazyfs BACKING MOUNTPOINT`` (foreground; ``fusermount -u MOUNTPOINT`` to stop), or
use ``Lazy`` below.
"""

from __future__ import annotations

import errno
import importlib
import itertools
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CONTROL = ".lazyfs-control"
OPERATIONS = {"create", "mkdir", "write", "truncate", "fsync", "fsyncdir", "rename", "unlink", "rmdir"}
ROOT = Path(__file__).resolve().parents[1]


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


@dataclass
class Armed:
    """A cut waiting for its moment: the ``nth`` operation in ``ops`` on a path matching ``pattern``."""

    ops: set[str]
    when: str  # "before" or "after" the operation takes effect
    nth: int
    pattern: re.Pattern
    matched: int = 0

    @classmethod
    def parse(cls, words: list[str]) -> "Armed":
        ops, when, nth, pattern = words[0], words[1], words[2], " ".join(words[3:])
        unknown = set(ops.split(",")) - OPERATIONS
        if unknown or when not in ("before", "after") or not nth.isdigit() or int(nth) < 1:
            raise ValueError(f"arm {' '.join(words)}: want OPS (of {sorted(OPERATIONS)}) before|after NTH REGEX")
        return cls(set(ops.split(",")), when, int(nth), re.compile(pattern))


def caller_process() -> int:
    """The process (thread group) of the thread whose request is being served."""
    from fuse import fuse_get_context

    tid = fuse_get_context()[2]
    try:
        status = Path(f"/proc/{tid}/status").read_text()
        return int(re.search(r"^Tgid:\s+(\d+)", status, re.M).group(1))
    except (OSError, AttributeError):
        return tid


def serve(backing: Path, mountpoint: Path) -> None:
    from fuse import FUSE, FuseOSError, Operations

    state = LazyState()
    state.load(backing)
    power = {"off": False, "armed": None}

    def say(line: str) -> None:
        print(line, flush=True)

    def cut(pid: int, what: str) -> None:
        """SIGKILL ``pid`` and cut the power: pending changes dropped, every later operation an error."""
        if pid in (os.getpid(), os.getppid()):
            say(f"cut {what} (its caller {pid} is the test or the file system itself: not killed)")
        elif pid > 0:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        state.drop()
        power["off"], power["armed"] = True, None
        say(f"cut {what}")

    def command(text: str) -> None:
        words = text.split()
        if words == ["drop"]:
            state.drop()
        elif len(words) == 2 and words[0] == "cut" and words[1].isdigit():
            cut(int(words[1]), f"on command (pid {words[1]})")
        elif words[:1] == ["arm"] and len(words) >= 5:
            power["armed"] = Armed.parse(words[1:])
        elif words == ["disarm"]:
            armed, power["armed"] = power["armed"], None
            say(f"matched {armed.matched if armed else 0}")
        else:
            raise OSError(errno.EINVAL, f"unknown command {text!r}")

    def guarded(op: str | None = None):
        """Every operation: serialised, refused once the power is off, and the armed cut's moment checked
        (on the operation's path, and a rename's new path too)."""
        def wrap(fn):
            def run(*args):
                with state.lock:
                    if power["off"] and args[1] != "/" + CONTROL:
                        raise FuseOSError(errno.EIO)
                    armed = power["armed"]
                    fire = False
                    if armed is not None and op in armed.ops and (
                            armed.pattern.search(args[1]) or (op == "rename" and armed.pattern.search(args[2]))):
                        armed.matched += 1
                        fire = armed.matched == armed.nth
                    what = f"{armed.when if fire else ''} {op} {args[1]}".strip()
                    if fire and armed.when == "before":
                        cut(caller_process(), what)
                        raise FuseOSError(errno.EIO)
                    try:
                        out = fn(*args)
                    except KeyError:
                        raise FuseOSError(errno.ENOENT) from None
                    except OSError as exc:
                        raise FuseOSError(exc.errno or errno.EIO) from None
                    if fire:
                        cut(caller_process(), what)
                        raise FuseOSError(errno.EIO)  # the caller is gone: it never learns the outcome
                    return out
            return run
        return wrap

    class Lazy(Operations):
        use_ns = False

        @guarded()
        def getattr(self, path, fh=None):
            if path == "/" + CONTROL:
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
            node = state.lookup(path)
            kind = stat.S_IFDIR if node.is_dir else stat.S_IFREG
            return {"st_mode": kind | node.mode, "st_nlink": 2 if node.is_dir else 1,
                    "st_size": len(node.data), "st_mtime": node.mtime, "st_ctime": node.mtime,
                    "st_atime": node.mtime, "st_uid": os.getuid(), "st_gid": os.getgid()}

        @guarded()
        def readdir(self, path, fh):
            return [".", "..", *state.lookup(path).entries]

        @guarded("mkdir")
        def mkdir(self, path, mode):
            state.create(path, stat.S_IMODE(mode), is_dir=True)

        @guarded("create")
        def create(self, path, mode, fi=None):
            state.create(path, stat.S_IMODE(mode))
            return 0

        @guarded()
        def open(self, path, flags):
            if path != "/" + CONTROL:
                node = state.lookup(path)
                if flags & os.O_TRUNC:
                    node.data = bytearray()
            return 0

        @guarded()
        def read(self, path, size, offset, fh):
            return bytes(state.lookup(path).data[offset:offset + size])

        @guarded("write")
        def write(self, path, data, offset, fh):
            if path == "/" + CONTROL:
                command(data.decode(errors="replace"))
                return len(data)
            node = state.lookup(path)
            if offset > len(node.data):
                node.data.extend(b"\0" * (offset - len(node.data)))
            node.data[offset:offset + len(data)] = data
            node.mtime = time.time()
            return len(data)

        @guarded("truncate")
        def truncate(self, path, length, fh=None):
            if path == "/" + CONTROL:
                return
            node = state.lookup(path)
            del node.data[length:]
            node.data.extend(b"\0" * (length - len(node.data)))

        @guarded("unlink")
        def unlink(self, path):
            state.unlink(path)

        @guarded("rmdir")
        def rmdir(self, path):
            if state.lookup(path).entries:
                raise OSError(errno.ENOTEMPTY, path)
            state.unlink(path)

        @guarded("rename")
        def rename(self, old, new):
            state.rename(old, new)

        @guarded()
        def chmod(self, path, mode):
            state.lookup(path).mode = stat.S_IMODE(mode)

        def chown(self, path, uid, gid):
            return 0

        def utimens(self, path, times=None):
            return 0

        @guarded("fsync")
        def fsync(self, path, datasync, fh):
            state.fsync_file(state.lookup(path))

        @guarded("fsyncdir")
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


def fuse_missing() -> str | None:
    """Why the lazy file system cannot run here, or None."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if shutil.which("fusermount") is None:
        return "no fusermount (apt-get install fuse3)"
    try:
        importlib.import_module("fuse")  # fusepy loads libfuse as it is imported
    except (ImportError, OSError, EnvironmentError) as exc:
        return f"fusepy cannot load libfuse ({exc}; apt-get install libfuse2)"
    return None


class Lazy:
    """The lazy file system over ``backing``, mounted at ``mnt`` in a process of its own; what it says (its
    cuts, its counts) is kept in ``said``."""

    def __init__(self, backing: Path, mnt: Path):
        self.backing, self.mnt = Path(backing), Path(mnt)
        self.backing.mkdir(exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.lazyfs", str(backing), str(mnt)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.said: list[str] = []
        self._said = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mnt) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not os.path.ismount(self.mnt):
            self.proc.kill()
            raise RuntimeError(f"the lazy file system did not mount at {mnt}: {self.proc.stderr.read()[-2000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._said:
                self.said.append(line.strip())
                self._said.notify_all()

    def command(self, text: str) -> None:
        with open(self.mnt / CONTROL, "w") as f:
            f.write(text)

    def cut(self, pid: int = 0) -> None:
        """The power cut (SIGKILL ``pid`` first, when given), then the unmount: the durable state goes to the
        backing folder."""
        self.command(f"cut {pid}")
        self.unmount()

    def arm(self, ops: str, when: str, nth: int, pattern: str) -> None:
        self.command(f"arm {ops} {when} {nth} {pattern}")

    def disarm(self) -> int:
        """No armed cut any more; returns how many operations it matched."""
        n = len(self.said)
        self.command("disarm")
        with self._said:
            self._said.wait_for(lambda: any(s.startswith("matched ") for s in self.said[n:]), 10)
            return int(next(s for s in self.said[n:] if s.startswith("matched ")).split()[1])

    def cuts(self) -> list[str]:
        """What each cut so far was (``before fsync /spool/...``, ``on command (pid 12)``)."""
        with self._said:
            return [s[4:] for s in self.said if s.startswith("cut ")]

    def unmount(self) -> None:
        subprocess.run(["fusermount", "-u", str(self.mnt)], check=True, capture_output=True)
        self.proc.wait(20)

    def close(self) -> None:
        """Unmount whatever state it is in (for a test's cleanup)."""
        if self.proc.poll() is None:
            subprocess.run(["fusermount", "-uz", str(self.mnt)], capture_output=True)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]))
