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
from collections.abc import Iterator

from . import budget
from .jobfile import Invalid, open_dir

MAX_DEPTH = 16               # levels below a checkpoint entry (sharded saves nest 2-4)
MAX_DIR_NAMES = 50_000       # names listed from one dir
MAX_ENTRY_NAMES = 50_000     # names in one checkpoint, all its dirs together


class TooLarge(Invalid):
    """An entry past a walk bound: `unsupported` (never deleted on a guess, never offered)."""


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
        try:
            listing, more = listdir(fd, min(per_dir, names - seen + 1))
        finally:
            os.close(fd)
        seen += len(listing)
        if more or seen > names:
            what = f"{rel}/" if rel else "the entry"
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
