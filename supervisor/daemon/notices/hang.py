"""Hang detection: has the job shown progress (heartbeat or checkpoint) lately? (SPEC 7)

File mtimes are wall-clock times, and the wall clock can jump; timers must not. So the
daemon only compares mtimes with each other to tell *whether* progress happened
(ProgressClock), and measures *how long ago* on the monotonic clock.
"""

from __future__ import annotations

import os

from ...checkpoint.jobfile import open_entry_dir
from ...checkpoint.walk import listdir

_MAX_NAMES = 4096

def hang_decision(now_mono: float, last_progress_mono: float, timeout: float | None) -> bool:
    """True when no progress was seen for `timeout` seconds (None: hang detection off)."""
    if timeout is None:
        return False
    return now_mono - last_progress_mono >= timeout


def _mtime(path: str | os.PathLike[str]) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def progress_mtime(heartbeat_file: str | os.PathLike[str] | None,
                   ckpt_dir: str | os.PathLike[str] | None) -> float | None:
    """Newest of the heartbeat file's mtime and the checkpoint dir's entries' mtimes.

    Entries count, the folder itself does not: rotation deleting an old checkpoint
    changes the folder's mtime without the job doing anything. In-progress saves
    (`.trainsup-tmp/`) count: a long save is progress. Missing paths are skipped.
    """
    times = []
    if heartbeat_file is not None:
        times.append(_mtime(heartbeat_file))
    if ckpt_dir is not None:
        try:
            fd = open_entry_dir(os.fspath(ckpt_dir))      # never through a symlink
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                # lstat of at most _MAX_NAMES names: a job's dir of 100,000 names cannot make
                # each progress check list all of them
                times += [st.st_mtime for _, st in listdir(fd, _MAX_NAMES)[0] if st is not None]
            except OSError:
                pass
            finally:
                os.close(fd)
    known = [t for t in times if t is not None]
    return max(known) if known else None


class ProgressClock:
    """Turns wall-clock mtimes into the monotonic time progress was last seen."""

    def __init__(self, now_mono: float):
        # A job counts as progressing when it starts; the timeout runs from launch.
        self.last_progress_mono = now_mono
        self._mtime: float | None = None

    def observe(self, mtime: float | None, now_mono: float) -> float:
        if mtime is not None and mtime != self._mtime:
            self.last_progress_mono = now_mono
            self._mtime = mtime
        return self.last_progress_mono


def is_stopped(pid: int) -> bool:
    """True when the process is stopped (SIGSTOP, 'T') or stopped by a tracer ('t').

    A stopped job makes no progress but is not hung in its own code: the daemon should
    say so rather than restart it as a hang.
    """
    try:
        # not a job path: /proc
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The command name may contain spaces and ')': the state follows the last ')'.
    rest = stat[stat.rfind(b")") + 2:]
    return rest[:1] in (b"T", b"t")
