"""Memory pressure: the job's memory use, system MemAvailable, cgroup limits, the OOM decision.

A job in a cgroup of its own (trainsup.cgroup) is measured by that cgroup's counters
(CgroupSampler: v2 memory.current / memory.events, or its v1 memory cgroup on a hybrid
host), which the kernel's OOM decision uses too and which no process can leave. Without
one, TreeSampler sums RSS over the process tree.

Mechanism (samplers, read_mem_available, cgroup readers) is thin and reads /proc and
/sys; policy (memory_decision, classify_oom) is pure and table-tested.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil

from ...spec import MemorySpec
from ..launch.cgroup import JobCgroup, _keyed, _read, join_mount, read_mounts  # one reader of cgroup files
from ..launch.process import children_of

# Re-arm only after falling this far back past a threshold, so RSS wobbling around the
# line does not send a save signal on every sample.
REARM_FRACTION = 0.10

# cgroup v1 reports "no limit" as a page-rounded LONG_MAX, not as a word.
_V1_UNLIMITED = 1 << 62

_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ProcessLookupError)


class TreeSampler:
    """Sums RSS over a process and its descendants.

    psutil.Process objects are kept between samples: `Process.children()` scans all of
    /proc (about 1.7 ms here), while re-reading each known process's
    /proc/PID/task/TID/children files and one statm per process costs about 0.1 ms.
    A kept object also guards against pid reuse (psutil checks the start time).
    """

    def __init__(self, pid: int):
        self.pid = pid
        self._procs: dict[int, psutil.Process] = {}
        try:
            self._procs[pid] = psutil.Process(pid)
        except _GONE:
            pass
        self._children_files = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")

    def _child_pids(self, pid: int) -> list[int]:
        return children_of(pid)

    def _refresh(self) -> None:
        root = self._procs.get(self.pid)
        if root is None:
            self._procs = {}
            return
        if not self._children_files:
            # Kernels without CONFIG_PROC_CHILDREN: the slow full scan.
            try:
                kids = root.children(recursive=True)
            except _GONE:
                self._procs = {}
                return
            self._procs = {self.pid: root, **{p.pid: self._procs.get(p.pid, p) for p in kids}}
            return
        fresh: dict[int, psutil.Process] = {}
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            if pid in fresh:
                continue
            proc = self._procs.get(pid)
            if proc is None:
                try:
                    proc = psutil.Process(pid)
                except _GONE:
                    continue
            fresh[pid] = proc
            todo.extend(self._child_pids(pid))
        self._procs = fresh

    def sample(self) -> int:
        """RSS bytes of the whole tree now; 0 once the root process is gone."""
        self._refresh()
        total = 0
        for pid, proc in list(self._procs.items()):
            try:
                total += proc.memory_info().rss
            except _GONE:
                # Exited mid-sample (a DataLoader worker finishing): not part of the tree.
                del self._procs[pid]
        return total

    def pids(self) -> list[int]:
        return sorted(self._procs)


class CgroupSampler:
    """The job's memory from its own cgroup: one or two small reads per sample, whatever
    the number of processes, and it counts what the tree walk misses (processes that left
    the tree, tmpfs and kernel memory charged to the job)."""

    def __init__(self, cgroup: JobCgroup):
        self.cgroup = cgroup

    @staticmethod
    def usable(cgroup: JobCgroup | None) -> bool:
        return cgroup is not None and cgroup.memory()[0] is not None

    def sample(self) -> int:
        return self.cgroup.memory()[0] or 0

    def oom_kills(self) -> int | None:
        return self.cgroup.memory()[1]

    def pids(self) -> list[int]:
        return sorted(self.cgroup.pids())


def read_mem_available(path: str = "/proc/meminfo") -> int:
    """System MemAvailable in bytes."""
    # not a job path: /proc/meminfo
    with open(path) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{path}: no MemAvailable line")


# --- cgroups ---------------------------------------------------------------------------

def _cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[list, tuple | None]:
    """([(root, mount_point)] of v1 hierarchies with the memory controller, v2 (root, mp))."""
    mounts = read_mounts(mountinfo)
    return ([mounts.v1["memory"]] if "memory" in mounts.v1 else []), mounts.v2


_join = join_mount


def memory_cgroup_dir(pid: int) -> tuple[Path | None, int | None]:
    """(cgroup folder that accounts pid's memory, cgroup version 1|2), or (None, None)."""
    try:
        # not a job path: /proc
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
        v1, v2 = _cgroup_mounts()
    except OSError:
        return None, None
    v1_path = v2_path = None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    if v1_path is not None and v1:
        d = _join(v1[0][0], v1[0][1], v1_path)
        if (d / "memory.limit_in_bytes").exists():
            return d, 1
    if v2_path is not None and v2:
        d = _join(v2[0], v2[1], v2_path)
        if (d / "memory.max").exists() or (d / "memory.events").exists():
            return d, 2
    return None, None




def read_memory_cgroup(cg_dir: Path, version: int) -> tuple[int | None, int | None]:
    """(limit bytes or None when unlimited, oom_kill count or None when not reported).

    The limit is the tightest over the folder and its parents that carry one: a job in
    an unlimited cgroup under a 16 GiB slice is still killed at 16 GiB.
    """
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    limit = None
    d = cg_dir
    while (d / limit_file).exists():
        raw = (_read(d / limit_file) or "").strip()
        if raw and raw != "max":
            value = int(raw)
            if value < _V1_UNLIMITED:
                limit = value if limit is None else min(limit, value)
        if d.parent == d:
            break
        d = d.parent
    if version == 1:
        kills = _keyed(_read(cg_dir / "memory.oom_control"), "oom_kill")
    else:
        kills = _keyed(_read(cg_dir / "memory.events"), "oom_kill")
    return limit, kills


def cgroup_memory_of(pid: int) -> tuple[int | None, int | None]:
    """(limit bytes|None, oom_kill count|None) of the memory cgroup that holds pid."""
    cg_dir, version = memory_cgroup_dir(pid)
    if cg_dir is None or version is None:
        return None, None
    return read_memory_cgroup(cg_dir, version)


def classify_oom(before_count: int | None, after_count: int | None,
                 exit_signal: int | None, near_limit: bool = False) -> bool:
    """Was this exit an out-of-memory kill? (SPEC section 4: `oom-killed`.)

    The cgroup's oom_kill count rising while the job ran is the kernel's own word. Without
    it (no memory cgroup), a SIGKILL nobody here sent while the tree sat at its limit is
    the best evidence there is.
    """
    if before_count is not None and after_count is not None and after_count > before_count:
        return True
    return exit_signal == signal.SIGKILL and near_limit


# --- the decision ----------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEpisode:
    """Whether a memory episode is under way (its action already sent), and why."""
    active: bool = False
    reason: str = ""


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}GiB"


def memory_decision(state: MemoryEpisode, rss: int, mem_available: int | None,
                    spec: MemorySpec) -> tuple[str | None, MemoryEpisode]:
    """One sample -> (None | "save" | "stop", next state).

    An episode starts when RSS reaches save_at*limit or MemAvailable drops under
    min_available; it gives one action and ends only when every configured measure is
    back 10% past its threshold.
    """
    over, rearmed = [], True
    if spec.limit is not None:
        line = spec.save_at * spec.limit
        if rss >= line:
            over.append(f"tree RSS {_gib(rss)} >= {spec.save_at:g} x limit {_gib(spec.limit)}")
        if rss > line * (1 - REARM_FRACTION):
            rearmed = False
    if spec.min_available is not None and mem_available is not None:
        if mem_available < spec.min_available:
            over.append(f"MemAvailable {_gib(mem_available)} < {_gib(spec.min_available)}")
        if mem_available < spec.min_available * (1 + REARM_FRACTION):
            rearmed = False
    if state.active:
        return None, (MemoryEpisode() if rearmed else state)
    if over:
        return spec.action, MemoryEpisode(active=True, reason="; ".join(over))
    return None, state
