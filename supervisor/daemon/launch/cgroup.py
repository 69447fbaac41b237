"""Containment by cgroup: every launch of a job runs in a cgroup of its own.

The kernel then answers "which processes belong to this job" exactly, whatever they do:
a double fork, `setsid`, an environment scrubbed with `env -i` — none leaves the cgroup.
Stop ends with `cgroup.kill`, and "nothing of the job survives" is the cgroup reporting
`populated 0` in `cgroup.events`, which inotify reports (nothing is polled).

Layout. The daemon's own cgroup (from /proc/self/cgroup) holds a tree named after its
state dir, `trainsup-<hash>`, so two daemons with different state dirs never share job
cgroups; each launch gets `<tree>/<job>.<attempt>`. On a pure cgroup v2 host with
controllers delegated to the service (`Delegate=yes`), the daemon first moves itself into
the leaf `<own>/trainsup-<hash>.daemon` (v2 allows no processes in a cgroup whose
controllers are handed to children). On a hybrid host (v1 controllers, an empty v2
hierarchy) containment is the v2 tree and memory comes from a per-launch v1 memory cgroup.
Where only v1 exists, a v1 hierarchy holds the jobs ("cgroup v1": no `cgroup.kill`, no
populated notification, so killing and waiting loop over `cgroup.procs`). Where nothing is
writable (not root, no delegation), jobs fall back to their process group and the
subreaper sweep ("process-group").

Born inside, never moved. A v2 launch is clone3(CLONE_INTO_CGROUP) (trainsup.clone3): the
child exists only inside its cgroup. Where clone3 cannot be used, the spawning thread
enters the cgroup around a Popen (`entered`: cgroup membership is inherited at fork) —
for v1 a per-thread move, cheap; for v2 a move of the whole daemon, which takes the
kernel's global threadgroup lock and waits for an RCU grace period. A preexec_fn writing
`cgroup.procs` pays the same wait plus a full fork (and is unsafe with threads). Moving
the child after Popen returns is rejected: the job may fork before the write (a shell
line `worker &`) and those children stay outside for good, and a daemon killed between
spawn and move leaves a job no cgroup search can find. tests/bench/bench_containment.py
measures all of these.

Memory on a hybrid host: the launch's v1 memory cgroup is entered by the spawning thread
alone (writing "0" to v1 `tasks` moves only the caller and skips the global lock).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

log = logging.getLogger("trainsup.cgroup")

CGROUP_V2 = "cgroup v2"
CGROUP_V1 = "cgroup v1"
PROCESS_GROUP = "process-group"

# Controllers a job cgroup gets on a delegated v2 subtree, when the parent offers them.
_WANTED_CONTROLLERS = ("memory", "pids")
# v1 hierarchies usable as containment where there is no v2 (first found wins).
_V1_CONTAINERS = ("pids", "memory", "freezer", "cpuacct")

# Another thread of the daemon that forks while the spawning thread is inside a job's v2
# cgroup would put its child there too (v2 moves the whole process). Code that forks off
# the loop thread (the checkpoint deleter) takes this lock around its fork.
FORK_LOCK = threading.Lock()

IN_MODIFY = 0x00000002
IN_MOVE_SELF = 0x00000800
IN_DELETE_SELF = 0x00000400
_IN_MODIFY = IN_MODIFY
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


class CgroupError(Exception):
    """A cgroup operation failed (one line, naming the cgroup)."""


def tree_name(state_dir: os.PathLike | str) -> str:
    """`trainsup-<hash>`: the same for a daemon restarted on the same state dir, distinct
    for another daemon on another state dir."""
    real = os.path.realpath(os.fspath(state_dir))
    return "trainsup-" + hashlib.sha256(real.encode()).hexdigest()[:10]


# --- reading the host's layout ------------------------------------------------------------

@dataclass(frozen=True)
class Mounts:
    v2: tuple[str, str] | None               # (root, mount point) of the cgroup2 mount
    v1: dict[str, tuple[str, str]]              # controller -> (root, mount point)


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> Mounts:
    v2: tuple[str, str] | None = None
    v1: dict[str, tuple[str, str]] = {}
    # not a job path: /proc
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            root, mount_point = fields[3], fields[4]
            fstype, super_opts = rfields[0], rfields[2].split(",")
            if fstype == "cgroup2" and v2 is None:
                v2 = (root, mount_point)
            elif fstype == "cgroup":
                for opt in super_opts:
                    v1.setdefault(opt, (root, mount_point))
    return Mounts(v2, v1)


def read_own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller -> path; the v2 path under the key "" ."""
    out: dict[str, str] = {}
    # not a job path: /proc
    with open(proc_cgroup) as f:
        for line in f.read().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            hid, controllers, path = parts
            if hid == "0" and controllers == "":
                out[""] = path
            else:
                for c in controllers.split(","):
                    out[c] = path
    return out


def join_mount(root: str, mount_point: str, cg_path: str) -> Path:
    # Inside a container the mount's root is the container's own cgroup, and
    # /proc/PID/cgroup paths are relative to the host's root: strip the common prefix.
    if root != "/" and (cg_path == root or cg_path.startswith(root + "/")):
        cg_path = cg_path[len(root):]
    return Path(mount_point) / cg_path.lstrip("/")


def _write(path: Path, text: str) -> None:
    # not a job path: cgroupfs
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        # not a job path: cgroupfs
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return None
    return None


# --- one launch's cgroup ------------------------------------------------------------------

@dataclass
class JobCgroup:
    path: Path                      # holds the job's processes (v2, or v1 where only v1)
    version: int                    # 2 | 1
    mem: Path | None = None      # per-launch v1 memory cgroup on a hybrid host

    @property
    def kind(self) -> str:
        return CGROUP_V2 if self.version == 2 else CGROUP_V1

    @property
    def name(self) -> str:
        return self.path.name

    def pids(self) -> list[int]:
        text = _read(self.path / "cgroup.procs") or ""
        return [int(p) for p in text.split()]

    def populated(self) -> bool:
        if self.version == 2:
            events = _read(self.path / "cgroup.events")
            if events is None:
                return False               # removed: nothing can be in it
            return _keyed(events, "populated") == 1
        return bool(self.pids())

    def signal_all(self, signum: int) -> int:
        """Send signum to every process in the cgroup (a pid listed in cgroup.procs is a
        member, so it cannot be a recycled stranger's unless it just exited)."""
        n = 0
        for pid in self.pids():
            try:
                os.kill(pid, signum)
                n += 1
            except (ProcessLookupError, PermissionError):
                pass
        return n

    def kill(self) -> None:
        """SIGKILL every process in the cgroup. v2 `cgroup.kill` does it at once, forks in
        flight included; without it (v1, kernels < 5.14) kill what is listed until the list
        stays empty (a fork racing the loop shows up on the next pass)."""
        if self.version == 2:
            try:
                _write(self.path / "cgroup.kill", "1")
                return
            except FileNotFoundError:
                if not self.path.exists():
                    return
            except OSError as e:
                raise CgroupError(f"cgroup {self.path}: cannot kill: {e.strerror}") from None
        for _ in range(1000):
            if not self.signal_all(signal.SIGKILL):
                return

    async def wait_empty(self, timeout: float | None = None) -> bool:
        """True once no process of the job is left (`populated 0`), False on timeout.
        v2: woken by inotify on cgroup.events; v1 has no such event: a 20 ms poll."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.version != 2:
            while self.populated():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.02)
            return True
        if not self.populated():
            return True              # the common case at an exit: no watch at all
        watcher = EventsWatcher.of(loop)
        fut: asyncio.Future = loop.create_future()

        def on_event() -> None:
            if not fut.done() and not self.populated():
                fut.set_result(True)

        try:
            wd = watcher.watch(self.path / "cgroup.events", on_event)
        except CgroupError:
            if not self.populated():
                return True          # removed meanwhile (by the exit path): nothing inside
            raise
        try:
            # Checked after the watch exists: an exit between the two is not missed.
            if not self.populated():
                return True
            try:
                await asyncio.wait_for(fut, None if deadline is None else max(0.0, deadline - time.monotonic()))
                return True
            except asyncio.TimeoutError:
                return not self.populated()
        finally:
            watcher.unwatch(wd, on_event)

    def remove(self) -> bool:
        """rmdir the launch's cgroups once empty; False while something is still inside."""
        ok = True
        for d in (self.path, self.mem):
            if d is None:
                continue
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("cgroup %s: cannot remove: %s", d, e.strerror)
                ok = False
        return ok

    @property
    def counts_memory(self) -> bool:
        """Whether this launch has memory counters of its own (a stat, no read)."""
        if self.mem is not None:
            return True
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return (self.path / name).exists()

    def memory(self) -> tuple[int | None, int | None]:
        """(bytes in use, oom_kill count) from the cgroup's own counters, None where absent.
        v1 usage counts page cache: the inactive file pages (reclaimable) are left out, as
        the kernel's OOM decision effectively does."""
        if self.version == 2 and (self.path / "memory.current").exists():
            cur = _read(self.path / "memory.current")
            return (int(cur) if cur and cur.strip().isdigit() else None,
                    _keyed(_read(self.path / "memory.events"), "oom_kill"))
        mem = self.mem if self.mem is not None else (self.path if self.version == 1 else None)
        if mem is None or not (mem / "memory.usage_in_bytes").exists():
            return None, None
        raw = (_read(mem / "memory.usage_in_bytes") or "").strip()
        usage = int(raw) if raw.isdigit() else None
        inactive = _keyed(_read(mem / "memory.stat"), "total_inactive_file") or 0
        if usage is not None:
            usage = max(0, usage - inactive)
        return usage, _keyed(_read(mem / "memory.oom_control"), "oom_kill")


class EventsWatcher:
    """One inotify instance per event loop for every cgroup.events watch: closing an
    inotify fd waits for an SRCU grace period (~10 ms here, measured on the relaunch path),
    so the fd lives as long as the loop and waits only add and remove watches."""

    _by_loop: ClassVar[dict[int, EventsWatcher]] = {}

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> EventsWatcher:
        w = cls._by_loop.get(id(loop))
        if w is None or w.loop is not loop:
            for old in list(cls._by_loop.values()):
                if old.loop.is_closed():             # a finished asyncio.run (tests)
                    old.close()
            w = cls._by_loop[id(loop)] = cls(loop)
        return w

    def __init__(self, loop: asyncio.AbstractEventLoop):
        fd = _libc().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise CgroupError(f"inotify: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        self.loop = loop
        self.callbacks: dict[int, list] = {}
        loop.add_reader(fd, self._ready)

    def watch(self, path: Path, callback: Callable[[], None], mask: int = _IN_MODIFY) -> int:
        wd = _libc().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise CgroupError(f"inotify on {path}: {os.strerror(ctypes.get_errno())}")
        self.callbacks.setdefault(wd, []).append(callback)
        return wd

    def unwatch(self, wd: int, callback: Callable[[], None]) -> None:
        cbs = self.callbacks.get(wd, [])
        if callback in cbs:
            cbs.remove(callback)
        if not cbs and wd in self.callbacks:
            del self.callbacks[wd]
            _libc().inotify_rm_watch(self.fd, wd)    # EINVAL once the cgroup is gone: fine

    def _ready(self) -> None:
        wds = set()
        try:
            while True:
                buf = os.read(self.fd, 65536)
                off = 0
                while off + 16 <= len(buf):
                    wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                    wds.add(wd)
                    off += 16 + length
        except BlockingIOError:
            pass
        for wd in wds:
            for cb in list(self.callbacks.get(wd, [])):
                cb()

    def close(self) -> None:
        if self.fd >= 0:
            if not self.loop.is_closed():
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        self._by_loop.pop(id(self.loop), None)


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


# --- the daemon's tree --------------------------------------------------------------------

@dataclass
class Containment:
    """Where this daemon's job cgroups live, and how a launch enters one."""
    kind: str                        # CGROUP_V2 | CGROUP_V1 | PROCESS_GROUP
    root: Path | None = None      # the tree holding job cgroups
    home: Path | None = None      # the daemon's own cgroup, returned to after a spawn
    mem_root: Path | None = None  # hybrid host: the v1 memory tree
    mem_home: Path | None = None
    why: str = ""                    # for the log, when kind is PROCESS_GROUP

    @property
    def version(self) -> int:
        return 2 if self.kind == CGROUP_V2 else 1

    def create(self, job: str, attempt: int) -> JobCgroup | None:
        """The cgroup of one launch (None under process-group containment)."""
        if self.root is None:
            return None
        name = f"{job}.{attempt}"
        path = self.root / name
        try:
            _mkdir_fresh(path)
        except FileNotFoundError:
            self._recreate_tree()
            _mkdir_fresh(path)
        mem = None
        if self.mem_root is not None:
            try:
                mem = self.mem_root / name
                try:
                    _mkdir_fresh(mem)
                except FileNotFoundError:
                    self._recreate_tree()
                    _mkdir_fresh(mem)
            except (CgroupError, FileNotFoundError) as e:
                log.warning("%s; memory of job %s comes from its process tree", e, job)
                mem = None
        return JobCgroup(path, self.version, mem)

    def _recreate_tree(self) -> None:
        """Something else removed this daemon's tree while it was empty (a cleanup script,
        another cgroup manager): every later launch failed until the job was `failed`.
        Made again, as setup made it. Raises CgroupError."""
        for root in (self.root, self.mem_root):
            if root is None or root.is_dir():
                continue
            try:
                os.mkdir(root, 0o755)
            except FileExistsError:
                pass
            except OSError as e:
                raise CgroupError(f"cgroup {root}: removed by something else and cannot be made "
                                  f"again: {e.strerror}") from None
            if root == self.root and self.kind == CGROUP_V2:
                _enable_controllers(root)
            log.warning("cgroup %s was removed by something else; made it again", root)

    @contextmanager
    def entered(self, cg: JobCgroup | None) -> Iterator[None]:
        """Run the body (a fork) with the calling thread inside `cg`, so the child is born
        there; back home afterwards whatever happened."""
        if cg is None or self.home is None:
            yield
            return
        with FORK_LOCK:
            moved: list[tuple[Path, str]] = []
            try:
                if cg.version == 2:
                    # The whole daemon: the kernel's global threadgroup lock, an RCU grace
                    # period (~8 ms here). clone3 avoids this path where it can.
                    _write(cg.path / "cgroup.procs", "0")
                    moved.append((self.home / "cgroup.procs", "0"))
                else:
                    _write(cg.path / "tasks", "0")      # v1: this thread only, no global lock
                    moved.append((self.home / "tasks", "0"))
                if cg.mem is not None and self.mem_home is not None:
                    _write(cg.mem / "tasks", "0")
                    moved.append((self.mem_home / "tasks", "0"))
            except OSError as e:
                _go_home(moved)
                raise CgroupError(f"cgroup {cg.path}: cannot enter: {e.strerror}") from None
            try:
                yield
            finally:
                _go_home(moved)

    @contextmanager
    def entered_memory(self, cg: JobCgroup) -> Iterator[None]:
        """The calling thread inside the launch's v1 memory cgroup (hybrid host) for the
        body (a clone3 into the v2 cgroup): writing "0" to a v1 `tasks` file moves this
        thread alone and skips the kernel's global lock (0.03 ms)."""
        if cg.mem is None or self.mem_home is None:
            yield
            return
        try:
            _write(cg.mem / "tasks", "0")
        except OSError as e:
            log.warning("cgroup %s: cannot enter: %s; memory counted by process tree", cg.mem, e.strerror)
            cg.mem = None
            yield
            return
        try:
            yield
        finally:
            _go_home([(self.mem_home / "tasks", "0")])

    def job_cgroups(self) -> list[JobCgroup]:
        """Every launch cgroup of this daemon's tree (a dead daemon's included)."""
        if self.root is None:
            return []
        out = []
        try:
            # not a job path: cgroupfs
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return []
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                mem = self.mem_root / e.name if self.mem_root is not None else None
                out.append(JobCgroup(Path(e.path), self.version,
                                     mem if mem is not None and mem.is_dir() else None))
        return out

    async def end_leftovers(self, timeout: float = 10.0) -> list[str]:
        """At daemon start, before any launch: kill every job cgroup of this tree that is
        still populated (a dead daemon's jobs, whatever the state DB says) and wait for it
        to be empty; remove the empty ones. Returns the names of those killed."""
        killed = []
        for cg in self.job_cgroups():
            if cg.populated():
                log.warning("cgroup %s: processes left by a previous daemon; killing them", cg.path)
                cg.kill()
                if not await cg.wait_empty(timeout):
                    log.error("cgroup %s: still populated %.0fs after cgroup.kill", cg.path, timeout)
                killed.append(cg.name)
            cg.remove()
        self.remove_empty()
        return killed

    def close(self) -> None:
        """At daemon exit: remove the empty job cgroups, then the tree if it is empty."""
        self.remove_empty()
        for root in (self.mem_root, self.root):
            if root is not None:
                try:
                    os.rmdir(root)
                except OSError:
                    pass             # still holds a job that would not die: kept, logged at start

    def remove_empty(self) -> None:
        """rmdir every empty job cgroup of the tree (also those whose removal a crash cut
        short)."""
        for cg in self.job_cgroups():
            if not cg.populated():
                cg.remove()
        for root in (self.mem_root, self.root):
            if root is None:
                continue
            for d in _subdirs(root):
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def _subdirs(path: Path) -> list[Path]:
    try:
        # not a job path: cgroupfs
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _go_home(moved: list[tuple[Path, str]]) -> None:
    for path, who in reversed(moved):
        try:
            _write(path, who)
        except OSError as e:
            log.error("cannot return to cgroup %s: %s", path.parent, e.strerror)


def _mkdir_fresh(path: Path) -> None:
    """Raises FileNotFoundError when the tree above is gone (Containment makes it again),
    CgroupError for anything else."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CgroupError(f"cgroup {path}: cannot create: {e.strerror}") from None


def _enable_controllers(parent: Path) -> None:
    """Hand memory/pids to the children of `parent` where the parent has them (a
    delegated v2 subtree); harmless where it has none (a hybrid host's empty v2)."""
    offered = set((_read(parent / "cgroup.controllers") or "").split())
    enabled = set((_read(parent / "cgroup.subtree_control") or "").split())
    want = [c for c in _WANTED_CONTROLLERS if c in offered and c not in enabled]
    if want:
        try:
            _write(parent / "cgroup.subtree_control", " ".join("+" + c for c in want))
        except OSError as e:
            log.warning("cgroup %s: cannot enable %s: %s", parent, ",".join(want), e.strerror)


def setup(state_dir: os.PathLike | str, *, mountinfo: str = "/proc/self/mountinfo",
          proc_cgroup: str = "/proc/self/cgroup") -> Containment:
    """Find or create this daemon's tree; PROCESS_GROUP (with the reason) when no cgroup
    hierarchy is writable here, or when TRAINSUP_CONTAINMENT=process-group asks for the
    fallback (to compare the two in one run, and to test the fallback as root)."""
    if os.environ.get("TRAINSUP_CONTAINMENT") == PROCESS_GROUP:
        return Containment(PROCESS_GROUP, why="TRAINSUP_CONTAINMENT=process-group")
    name = tree_name(state_dir)
    try:
        mounts = read_mounts(mountinfo)
        own = read_own_cgroups(proc_cgroup)
    except OSError as e:
        return Containment(PROCESS_GROUP, why=f"cannot read cgroups: {e.strerror}")
    why = []
    if mounts.v2 is not None and "" in own:
        home = join_mount(*mounts.v2, own[""])
        try:
            return _setup_v2(name, home, mounts, own)
        except OSError as e:
            why.append(f"cgroup v2 {home}: {e.strerror}")
    for controller in _V1_CONTAINERS:
        if controller in mounts.v1 and controller in own:
            home = join_mount(*mounts.v1[controller], own[controller])
            base = home.parent if home.name == name + ".daemon" else home
            try:
                (base / name).mkdir(exist_ok=True)
                if not os.access(base / name / "tasks", os.W_OK):
                    raise PermissionError(errno.EACCES, "tasks not writable")
                # With the memory controller as container, JobCgroup.memory reads `path`.
                return Containment(CGROUP_V1, base / name, home)
            except OSError as e:
                why.append(f"cgroup v1 {controller} {base}: {e.strerror}")
            break
    return Containment(PROCESS_GROUP, why="; ".join(why) or "no cgroup hierarchy mounted")


def _setup_v2(name: str, home: Path, mounts: Mounts, own: dict[str, str]) -> Containment:
    base = home.parent if home.name == name + ".daemon" else home
    tree = base / name
    offered = set((_read(base / "cgroup.controllers") or "").split())
    if offered & set(_WANTED_CONTROLLERS) and home == base:
        # A delegated subtree with controllers: v2 forbids processes in a cgroup whose
        # controllers go to its children, so the daemon lives in a leaf of its own.
        leaf = base / (name + ".daemon")
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", "0")
        home = leaf
        _enable_controllers(base)
    tree.mkdir(exist_ok=True)
    if not os.access(tree / "cgroup.procs", os.W_OK):
        raise PermissionError(errno.EACCES, "cgroup.procs not writable")
    _enable_controllers(tree)
    mem_root = mem_home = None
    if "memory" not in set((_read(tree / "cgroup.controllers") or "").split()) \
            and "memory" in mounts.v1 and "memory" in own:
        # Hybrid host: memory accounting lives in the v1 memory controller.
        mem_home = join_mount(*mounts.v1["memory"], own["memory"])
        try:
            (mem_home / name).mkdir(exist_ok=True)
            if os.access(mem_home / name / "tasks", os.W_OK):
                mem_root = mem_home / name
        except OSError as e:
            log.warning("cgroup v1 memory %s: %s; job memory comes from process trees", mem_home, e.strerror)
        if mem_root is None:
            mem_home = None
    return Containment(CGROUP_V2, tree, home, mem_root, mem_home)

