"""Which checkpoint entries a writer may still be writing (never deleted while so).

An entry is live while any of these holds:
  - it is a trainsup tmp dir `.trainsup-tmp/step-N.<pid>` and that pid is alive with a
    start time no later than when the daemon first saw the dir (a reused pid started
    after it, so it is not the writer);
  - it is not valid and any file in it changed (size, mtime or ctime: the scan's lstat
    fingerprint) within the quiet window, as observed by the daemon's *monotonic* clock; the
    first sighting counts as a change. A wall-clock step (NTP, resume from suspend) changes
    nothing here, and a slow single-file save keeps moving its file even after its dir's
    mtime stops;
  - a valid entry is never live by this window, even one seen changing: its format
    proved the writer finished it (HDF5's closed superblock, a zip's central directory,
    TF's index CRCs, a commit marker). Holding such saves for the grace (h5py and Keras'
    ModelCheckpoint write in place; TF and HF are sighted mid-write) let rotation fall a
    grace's worth of saves behind its quota: 42 TF saves, 344 MB over a 4 KB quota in 25 s.
    An in-place rewrite of a valid file truncates it first (invalid again), and a writer
    of this job that holds it open is caught by the open-file rule below;
  - a process of the job has one of its files open (torch.save rewriting `latest.pth` in
    place: 0 bytes for a moment, and still open).
Tmp dirs of a dead writer that stopped changing are stale: rotation may collect them.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .dirhandle import DirHandle
from .format import TMP_DIR
from .index import CheckpointInfo
from .jobfile import Invalid, open_entry_dir
from .walk import walk

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def boottime() -> float:
    """Seconds since boot on the clock /proc/<pid>/stat start times use."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start(pid: int) -> float | None:
    """A process's start, in boottime seconds; None if it does not exist."""
    try:
        # not a job path: /proc
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # the comm field may hold spaces and parens: fields resume after the last ')'
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[19]) / _CLK_TCK


def open_inodes(pids: Iterable[int]) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every regular file the given processes have open."""
    out: set[tuple[int, int]] = set()
    for pid in pids:
        try:
            # not a job path: /proc
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
    return out


def entry_inodes(h: DirHandle, rel: str) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the entry and every file below it, through the held dir."""
    out: set[tuple[int, int]] = set()
    base = f"{h.io_root}/{rel}"
    try:
        st = os.lstat(base)
    except OSError:
        return out
    out.add((st.st_dev, st.st_ino))
    if not stat.S_ISDIR(st.st_mode):
        return out
    try:
        fd = open_entry_dir(base)
    except OSError:
        return out
    try:
        for _, est in walk(fd):         # iterative, bounded (an entry past the bounds is
            out.add((est.st_dev, est.st_ino))   # unsupported: never deleted anyway)
    except (Invalid, OSError):
        pass
    finally:
        os.close(fd)
    return out


@dataclass
class _Seen:
    fp: str
    changed: float          # monotonic: when the daemon last saw it differ (or first saw it)
    first_boot: float       # boottime: when the daemon first saw it
    moved: bool = False     # seen to differ at least once (not just first sighted)
    valid: bool = False     # the verdict when last observed: which window applies


class LivenessTracker:
    """Per job: remembers each entry's fingerprint and when it last moved (monotonic)."""

    def __init__(self, quiet: float, clock: Callable[[], float] = time.monotonic,
                 boot_clock: Callable[[], float] = boottime) -> None:
        self.quiet = quiet
        self.clock = clock
        self.boot_clock = boot_clock
        self._seen: dict[str, _Seen] = {}

    @staticmethod
    def key(i: CheckpointInfo) -> str:
        return f"{TMP_DIR}/{i.name}" if i.in_progress else i.name

    def observe(self, infos: Iterable[CheckpointInfo]) -> None:
        now, boot = self.clock(), self.boot_clock()
        present = {}
        for i in infos:
            if not i.managed:
                continue
            k = self.key(i)
            old = self._seen.get(k)
            fp = i.fp or f"{i.bytes}:{i.mtime}"
            if old is None:
                present[k] = _Seen(fp, now, boot, valid=i.valid)
            elif old.fp != fp:
                present[k] = _Seen(fp, now, old.first_boot, True, i.valid)
            else:
                old.valid = i.valid
                present[k] = old
        self._seen = present

    def live(self, infos: Iterable[CheckpointInfo], *, handle: DirHandle | None = None,
             job_pids: Iterable[int] = ()) -> set[str]:
        """Names (as rotation sees them: info.name) of entries that may still be written."""
        now = self.clock()
        out: set[str] = set()
        infos = list(infos)
        for i in infos:
            if not i.managed:
                continue
            seen = self._seen.get(self.key(i))
            # A first sighting counts as a change for what is not (yet) valid: it may be a
            # save under way. A valid entry is complete as proven; it is live only while the
            # job holds it open.
            if seen is None or (not i.valid and now - seen.changed < self.quiet):
                out.add(i.name)
            elif i.in_progress and i.pid is not None and self._writer_alive(i.pid, seen.first_boot):
                out.add(i.name)
        pids = list(job_pids)
        if handle is not None and pids:
            opened = open_inodes(pids)
            if opened:
                for i in infos:
                    if i.managed and i.name not in out and entry_inodes(handle, self.key(i)) & opened:
                        out.add(i.name)
        return out

    def next_quiet_in(self) -> float | None:
        """Seconds until the next entry's quiet window ends (None: none is running). Nothing
        else wakes rotation then: a save's last write was its last inotify event."""
        now = self.clock()
        waits = [end - now for s in self._seen.values()
                 if not s.valid and (end := s.changed + self.quiet) > now]
        return min(waits) if waits else None

    @staticmethod
    def _writer_alive(pid: int, first_seen_boot: float) -> bool:
        start = process_start(pid)
        # a pid started after we first saw its dir is a reuse, not the writer (1 s: the
        # kernel's start time is in clock ticks, the dir may be seen in the same tick)
        return start is not None and start <= first_seen_boot + 1.0
