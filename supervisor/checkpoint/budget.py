"""What one verdict may cost, and where long work yields its worker and can be cancelled.

Every job's checks share the daemon's few worker threads. A verdict's reads are bounded
by the bytes its files really hold: each file a check opens (jobfile.open_file) adds twice
its *allocated* bytes (a reader may pass over a file twice: a zip's CRCs, then its
pickle) plus a small slack to the verdict's budget, and every read is counted. A 4 TiB
sparse file holds no blocks, so its budget is the slack: hashing its zeros stops at once
(found: two manifests listing one kept both pool threads hashing zeros for hours).

Long loops call `tick(nbytes)` (every streamed chunk, every 256 names of a walk, every
name a deletion removes): the points where long work yields its worker to other jobs'
work and can be cancelled. `paced(fn)` runs a block with `fn` called at every tick; the
daemon's pool (daemon/fairpool.py) installs one that waits for the job's next turn once
the task's time slice is spent, and raises Cancelled once the work is no longer wanted.
A deletion under way ticks with `removing=True`: it yields, but only the daemon's stop
cancels it (a removed job's entry half emptied would stay in the trash for good).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Bytes a verdict may read past twice the allocated bytes of the files it opened: headers
# read again, and the tail of a hole (a sparse file's zeros) before the budget stops it.
SLACK = 16 << 20


# Fault injection for tests and benches: every byte a verdict reads takes as long as on a
# disk of this many bytes per second (a 100 GiB checkpoint on a slow disk, at a scale that
# fits a test machine: the read is real, the wait models the disk).
_SLOW_READ_BPS = float(os.environ.get("TRAINSUP_TEST_SLOW_READ_BPS", "0") or 0)


def slow_read(nbytes: int) -> None:
    """Where a job's file was just read: with TRAINSUP_TEST_SLOW_READ_BPS, wait as long as
    that read would take on such a disk (the readers call it right after their pread)."""
    if _SLOW_READ_BPS and nbytes > 0:
        time.sleep(nbytes / _SLOW_READ_BPS)


class Cancelled(Exception):
    """The work was cancelled (the daemon stops, or the job went away): no verdict."""


class OverBudget(Exception):
    """A verdict read more than its files hold (a sparse file's holes, a bomb)."""


class Budget:
    """One verdict's read budget, grown as the check opens files."""

    def __init__(self) -> None:
        self.limit = SLACK
        self.used = 0
        self.files: set[tuple[int, int]] = set()
        self.holes: list[tuple[str, int, int]] = []     # (name, size, allocated) of sparse files

    def allow(self, key: tuple[int, int], allocated: int, name: str = "", size: int = 0) -> None:
        if key in self.files:
            return
        self.files.add(key)
        self.limit += 2 * allocated
        if size > allocated + SLACK:
            self.holes.append((name, size, allocated))

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            if self.holes:
                name, size, allocated = self.holes[0]
                raise OverBudget(f"{name}: a sparse file ({size} bytes, {allocated} allocated): "
                                 f"its holes are not read (unsupported)")
            raise OverBudget(f"read {self.used} bytes, more than its files hold "
                             f"({self.limit} allowed; unsupported)")


class _Local(threading.local):
    budget: Budget | None = None
    pace: Callable[[bool], None] | None = None      # set by the worker running this thread's task


_local = _Local()


@contextmanager
def verdict_budget() -> Iterator[Budget]:
    """The budget of one verdict (nested verdicts each get their own)."""
    outer = _local.budget
    b = _local.budget = Budget()
    try:
        yield b
    finally:
        _local.budget = outer


def current() -> Budget | None:
    return _local.budget


def tick(nbytes: int = 0, removing: bool = False) -> None:
    """Count `nbytes` read for the current verdict; maybe yield the worker; raise Cancelled
    when the work was cancelled."""
    b = _local.budget
    if b is not None and nbytes:
        b.spend(nbytes)
    pace = _local.pace
    if pace is not None:
        pace(removing)


@contextmanager
def paced(pace: Callable[[bool], None]) -> Iterator[None]:
    """Run the block with `pace` called at every tick (the fair worker's yield point)."""
    outer = _local.pace
    _local.pace = pace
    try:
        yield
    finally:
        _local.pace = outer
