"""The daemon's side of `trainsup-shim` (_shim.c), the small parent each job runs under:
where it is, what a launch hands it, its start report, the exit status it leaves behind,
and how a daemon that did not launch it finds and verifies it.

Why a shim: a job whose parent is the daemon loses its parent when the daemon dies. Its
output pipe breaks (the next write is EPIPE or SIGPIPE) and its exit status goes to
whoever inherits it. With the shim in between, the job's output goes to its log and its
exit status to a file, daemon or no daemon, so a daemon crash, kill or re-exec costs the
job nothing: the next daemon takes the job over (trainsup.daemon.adoption).

How a shim is recognised (never by a pid alone, which can be reused): its command line
is `trainsup-shim <tree>/<job>.<attempt>` where <tree> names this daemon's state dir
(cgroup.tree_name); it runs as the daemon's user; and it is the one process of the
launch's cgroup whose parent is outside that cgroup (every process of the job descends
from it). Under process-group containment (no cgroup) the first two, with the pid and
start time the state database recorded, are what is left.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import signal
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .proctree import children_of

SHIM = Path(__file__).with_name("trainsup-shim")
NAME = b"trainsup-shim"
# TRAINSUP_SHIM=off launches jobs as the daemon's own children, as before the shim
# (benchmarks compare the two; a daemon restart then ends and relaunches them).
MODE_ENV = "TRAINSUP_SHIM"
_REPORT = struct.Struct("iiii")
_MAGIC = 0x4D485354
STAGES = {1: "stdio", 2: "workdir", 3: "setsid", 4: "user", 5: "exec", 6: "shim setup"}
START_TIMEOUT = 30.0          # the shim's exec, its vfork and the job's execve
_STATUS_MAX = 512
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@functools.lru_cache(maxsize=1)
def enabled() -> bool:
    """Whether this daemon launches jobs under a shim (decided once, at its first launch)."""
    return why_unavailable() is None


def why_unavailable() -> str | None:
    """None when jobs run under a shim, else why not (one line for the daemon's log)."""
    if os.environ.get(MODE_ENV) == "off":
        return f"{MODE_ENV}=off"
    if not os.access(SHIM, os.X_OK):
        return f"{SHIM} is missing (trainsup was installed without a C compiler)"
    return None


def tree_marker(tree: str, name: str) -> str:
    """argv[1] of a shim: `<tree>/<job>.<attempt>`."""
    return f"{tree}/{name}"


def exits_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "exits"


def status_path(state_dir: Path, name: str) -> Path:
    """Where the shim of launch `name` (<job>.<attempt>) leaves the job's exit status."""
    return exits_dir(state_dir) / name


@dataclass(frozen=True)
class Plan:
    """What a launch hands the shim besides the job's command and environment."""
    marker: str
    status: Path
    log: Path
    log_max: int
    log_backups: int

    def argv(self, execs: Sequence[bytes], argv: Sequence[str], cwd: str, uid: int | None,
             gid: int | None, groups: Iterable[int]) -> list[bytes]:
        drop = uid is not None and gid is not None
        gs = ",".join(str(g) for g in groups) if drop else ""
        return [NAME, self.marker.encode(), os.fsencode(self.status), os.fsencode(self.log),
                str(self.log_max).encode(), str(self.log_backups).encode(), os.fsencode(cwd),
                str(uid if drop else -1).encode(), str(gid if drop else -1).encode(), (gs or "-").encode(),
                str(len(execs)).encode(), *execs, b"--", *(os.fsencode(a) for a in argv)]


class ShimFailed(OSError):
    """The shim could not start the job: errno, and the stage it failed at."""


def read_start(fd: int, timeout: float = START_TIMEOUT) -> int:
    """The job's pid from the shim's start report on `fd`. Raises ShimFailed (the job
    could not be started: FileNotFoundError-like errno and the stage in the message) or
    OSError (the shim died or never answered)."""
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < _REPORT.size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise OSError(errno.ETIMEDOUT, f"trainsup-shim did not report within {timeout:g}s")
        chunk = os.read(fd, _REPORT.size - len(data))
        if not chunk:
            raise OSError(errno.EPIPE, "trainsup-shim ended before starting the job")
        data += chunk
    magic, stage, err, pid = _REPORT.unpack(data)
    if magic != _MAGIC:
        raise OSError(errno.EPROTO, "trainsup-shim: unexpected start report")
    if stage:
        raise ShimFailed(err, os.strerror(err), STAGES.get(stage, "start"))
    return pid


@dataclass(frozen=True)
class ExitStatus:
    """What a shim wrote when its job ended."""
    pid: int
    status: int          # the raw wait status
    at: float            # wall time of the exit, UTC epoch seconds

    @property
    def returncode(self) -> int:
        """Popen's convention: the exit code, or -N for a death by signal N."""
        return os.waitstatus_to_exitcode(self.status)


def read_status(path: Path) -> ExitStatus | None:
    """The exit status a shim left at `path`, or None (none yet, or not one of ours)."""
    try:
        # not a job path: the shim's exit status file (state dir; O_NOFOLLOW|O_NONBLOCK)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, _STATUS_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)
    lines = raw.decode("ascii", "replace").splitlines()
    if not lines or lines[0] != "trainsup-exit 1":
        return None
    fields = dict(line.partition(" ")[::2] for line in lines[1:])
    try:
        st = ExitStatus(int(fields["pid"]), int(fields["status"]), float(fields["at"]))
        st.returncode     # noqa: B018 (a status no process can have is refused here)
        return st
    except (KeyError, ValueError):
        return None


def discard_status(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".tmp")):
        try:
            os.unlink(p)
        except OSError:
            pass


class ShimLeader:
    """The shim as the process the daemon watches (its pidfd) and, when it is the
    daemon's own child, reaps. `wait()` answers with the *job's* exit: the status file."""

    def __init__(self, pid: int, status: Path, ours: bool):
        self.pid = pid
        self.status_path = status
        self.ours = ours                  # our child: ours to reap (a re-exec keeps them so)
        self.returncode: int | None = None
        self.exit: ExitStatus | None = None
        self.reaped = False               # it has exited and its status was read

    def wait(self) -> int | None:
        """Reap the shim (when ours) and read the job's exit status; None when the shim
        left none (it was killed before its job ended, or its status could not be written)."""
        if self.ours:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.ours = False
        self.reaped = True
        self.exit = read_status(self.status_path)
        self.returncode = self.exit.returncode if self.exit is not None else None
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode


# -- finding a shim again ------------------------------------------------------------------

def cmdline(pid: int) -> list[bytes]:
    try:
        # not a job path: /proc
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(4096).split(b"\0")
    except OSError:
        return []


def stat_fields(pid: int) -> list[bytes]:
    """/proc/PID/stat after the command name (field 3 first), [] when gone."""
    try:
        # not a job path: /proc
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return []


def parent_of(pid: int) -> int | None:
    f = stat_fields(pid)
    return int(f[1]) if len(f) > 1 else None


def start_time(pid: int) -> float | None:
    """The process's start, wall clock (psutil's create_time, without psutil)."""
    f = stat_fields(pid)
    if len(f) < 20:
        return None
    return _boot_time() + int(f[19]) / _CLK_TCK


_BOOT: list[float] = []


def _boot_time() -> float:
    if not _BOOT:
        # not a job path: /proc
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    _BOOT.append(float(line.split()[1]))
                    break
    return _BOOT[0] if _BOOT else 0.0


def owner_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def is_shim(pid: int, marker: str) -> bool:
    """The process at `pid` is the shim of this launch of this daemon's tree."""
    return cmdline(pid)[:2] == [NAME, marker.encode()] and owner_of(pid) == os.geteuid()


def job_of(shim_pid: int, hint: int | None = None) -> int | None:
    """The job leader under a shim: its first child (the job's orphans, which the shim
    also parents, were all started after it); `hint`, the pid the state database
    recorded, when it is one of them."""
    kids = [p for p in children_of(shim_pid) if parent_of(p) == shim_pid]
    if not kids:
        return None
    if hint in kids:
        return hint
    timed = [(t, p) for p in kids if (t := start_time(p)) is not None]
    return min(timed)[1] if timed else None


def shim_in(pids: Sequence[int], marker: str) -> int | None:
    """The shim among the processes of a launch's cgroup: the one named for this launch
    whose parent is outside the cgroup."""
    members = set(pids)
    for pid in pids:
        if is_shim(pid, marker) and parent_of(pid) not in members:
            return pid
    return None


def scan_shims(tree: str) -> dict[str, int]:
    """Every live shim of this tree on the machine: launch name -> pid (process-group
    containment has no cgroup to look in; a walk of /proc, once, at daemon start)."""
    prefix = (tree + "/").encode()
    me = os.geteuid()
    out: dict[str, int] = {}
    # not a job path: /proc
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmd = cmdline(pid)
        if len(cmd) > 1 and cmd[0] == NAME and cmd[1].startswith(prefix) and owner_of(pid) == me:
            f = stat_fields(pid)
            if f and f[0] != b"Z":
                out[cmd[1][len(prefix):].decode(errors="replace")] = pid
    return out


def open_verified(pid: int, check: Callable[[int], bool]) -> int | None:
    """A pidfd for `pid` if `check(pid)` holds after it was opened (then the pidfd is
    that process: one that held the pid before and exited would fail the check or the
    liveness probe). None otherwise."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        signal.pidfd_send_signal(fd, 0)
        if check(pid):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def environ_of(pid: int, keys: Iterable[str]) -> Mapping[str, str]:
    """Some of a process's initial environment (root or its owner may read it)."""
    want = {k.encode() for k in keys}
    out: dict[str, str] = {}
    try:
        # not a job path: /proc
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read(1 << 20).split(b"\0"):
                k, _, v = item.partition(b"=")
                if k in want:
                    out[k.decode()] = os.fsdecode(v)
    except OSError:
        pass
    return out
