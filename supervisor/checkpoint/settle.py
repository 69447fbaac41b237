"""Flush an entry's files before its verdict is computed (why: reprove.py)."""

from __future__ import annotations

import os
import stat


def settle(path: str) -> None:
    """fsync every regular file of an entry (read-only fds; never through a link), so a
    later write through a shared mapping must fault and move ctime."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        _fsync(path)
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    _fsync(e.path)


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return      # the checker will report it
    try:
        os.fsync(fd)
    except OSError:
        pass        # EINVAL on special filesystems: nothing to settle there
    finally:
        os.close(fd)
