"""Walks of a job's dirs: iterative, through dir fds, bounded in depth, in names per dir
and in names per checkpoint.

Found: a 3000-deep chain of dirs in a checkpoint dir made a recursive walk raise
RecursionError (HF's file walk emptied that job's whole index) and a 100,000-name dir was
listed into memory on every scan. Here each dir is opened beneath the one the walk
started from (jobfile.open_dir: no symlink, no mount crossing), listed up to a bound and
closed before anything is yielded; going past a bound is that entry's verdict (TooLarge),
never an exception that ends a scan.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator

from . import budget
from .jobfile import Invalid, open_dir

MAX_DEPTH = 16               # levels below a checkpoint entry (sharded saves nest 2-4)
MAX_DIR_NAMES = 50_000       # names listed from one dir
MAX_ENTRY_NAMES = 50_000     # names in one checkpoint, all its dirs together


class TooLarge(Invalid):
    """An entry past a walk bound: `unsupported` (never deleted on a guess, never offered)."""


# Dirs found past a names bound, by (dev, ino) -> (mtime_ns, ctime_ns, bound): while the
# dir's mtime and ctime stand still its names are the same, and it is past the bound
# again without a listing. Found: a job's 100,000-name dir listed to the bound at every
# scan of its dir (every 20 ms change of that dir asked for one) kept a worker thread
# taking and releasing the GIL twice per name; on a loaded machine the loop waited for
# the GIL behind it and `status` p99 went from 8 to 340 ms.
_PAST_BOUND: OrderedDict[tuple[int, int], tuple[int, int, int]] = OrderedDict()
_PAST_BOUND_MAX = 4096
_past_bound_lock = threading.Lock()


def _known_past_bound(st: os.stat_result, bound: int) -> bool:
    with _past_bound_lock:
        seen = _PAST_BOUND.get((st.st_dev, st.st_ino))
    # it had more names than a bound at least as large as this one
    return seen is not None and seen[:2] == (st.st_mtime_ns, st.st_ctime_ns) and seen[2] >= bound


def _remember_past_bound(st: os.stat_result, bound: int) -> None:
    with _past_bound_lock:
        _PAST_BOUND[(st.st_dev, st.st_ino)] = (st.st_mtime_ns, st.st_ctime_ns, bound)
        _PAST_BOUND.move_to_end((st.st_dev, st.st_ino))
        while len(_PAST_BOUND) > _PAST_BOUND_MAX:
            _PAST_BOUND.popitem(last=False)


def listdir(dir_fd: int, limit: int = MAX_DIR_NAMES) -> tuple[list[tuple[str, os.stat_result | None]], bool]:
    """(name, lstat) of up to `limit` names of a dir, and whether there were more.
    lstat is None for a name that vanished while listed."""
    out: list[tuple[str, os.stat_result | None]] = []
    more = False
    with os.scandir(dir_fd) as it:
        for e in it:
            if len(out) >= limit:
                more = True
                break
            try:
                st: os.stat_result | None = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                st = None
            out.append((e.name, st))
            if len(out) % 256 == 0:
                budget.tick()
    return out, more


def walk(root_fd: int, *, depth: int = MAX_DEPTH, names: int = MAX_ENTRY_NAMES,
         per_dir: int = MAX_DIR_NAMES) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to root_fd, lstat) of everything below it, each dir's names sorted
    and listed before anything below them. Raises TooLarge past a bound."""
    stack: list[tuple[str, int]] = [("", 0)]
    seen = 0
    while stack:
        rel, level = stack.pop()
        try:
            fd = open_dir(root_fd, rel)
        except FileNotFoundError:
            continue            # removed while walked
        except OSError as e:
            # a mount inside the entry is not walked into (nor ever deleted through:
            # deleter.py refuses it); a dir swapped for a link or a file meanwhile: not ours
            if rel and e.errno in (errno.EXDEV, errno.ELOOP, errno.ENOTDIR):
                continue
            raise
        what = f"{rel}/" if rel else "the entry"
        limit = min(per_dir, names - seen + 1)
        try:
            dst = os.fstat(fd)
            if _known_past_bound(dst, limit):
                raise TooLarge(f"{what}: more than {min(per_dir, names)} names "
                               f"(a walk stops there: unsupported)")
            listing, more = listdir(fd, limit)
        finally:
            os.close(fd)
        seen += len(listing)
        if more:
            _remember_past_bound(dst, limit)         # it holds more than `limit` names
        if more or seen > names:
            raise TooLarge(f"{what}: more than {min(per_dir, names)} names "
                           f"(a walk stops there: unsupported)")
        budget.tick()
        subdirs = []
        for name, st in sorted(listing, key=lambda t: t[0]):
            if st is None:
                continue
            child = f"{rel}/{name}" if rel else name
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                if level + 1 >= depth:
                    raise TooLarge(f"{child}/: deeper than {depth} levels (a walk stops there: unsupported)")
                subdirs.append((child, level + 1))
        stack.extend(reversed(subdirs))
