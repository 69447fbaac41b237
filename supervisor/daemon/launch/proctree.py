"""The process tree as /proc shows it: no psutil, cheap enough for the relaunch path."""

from __future__ import annotations

import os


def children_of(pid: int) -> list[int]:
    """The direct children of every thread of `pid` (/proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        # not a job path: /proc
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            # not a job path: /proc
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return out
