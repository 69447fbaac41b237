"""Flush an entry's files before its verdict is computed (why: reprove.py)."""

from __future__ import annotations

import os
import stat

from .jobfile import Invalid, open_entry_dir, open_entry_file, open_file
from .walk import walk


def settle(path: str) -> None:
    """fsync every regular file of an entry (read-only fds through the job's held dir,
    never through a link, never a wait on a FIFO; the walk within walk.py's bounds), so a
    later write through a shared mapping must fault and move ctime."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        try:
            fd, _ = open_entry_file(path)
        except (Invalid, OSError):
            return      # the checker will report it
        _fsync(fd)
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    try:
        dfd = open_entry_dir(path)
    except OSError:
        return
    try:
        for rel, est in walk(dfd):
            if stat.S_ISREG(est.st_mode):
                try:
                    fd, _ = open_file(dfd, rel)
                except (Invalid, OSError):
                    continue
                _fsync(fd)
    except (Invalid, OSError):
        pass            # past a bound or gone: the checker will report it
    finally:
        os.close(dfd)


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass        # EINVAL on special filesystems: nothing to settle there
    finally:
        os.close(fd)
