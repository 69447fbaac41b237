"""An attempt's first step: when a relaunched job trains again.

A job that writes its step to the heartbeat file (trainsup.training does, at every step)
writes it first when its first step after a launch is done: imports, restoring the
checkpoint and that step are behind it. The time from the launch to then is the resume
downtime that goodput counts and `history` shows (`first-step`, with `after_s`).

One inotify watch per launching attempt on its heartbeat file, through the loop's shared
inotify instance (launch/cgroup.py), removed at the first change: nothing is polled and
nothing happens per step. The daemon truncates the file before each launch and arms the
watch after that, so only the new attempt's write can fire it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..contract import HEARTBEAT_READ, parse_heartbeat
from .launch.cgroup import CgroupError, EventsWatcher

log = logging.getLogger("trainsup.progress")

_IN_MODIFY = 0x00000002
_IN_ATTRIB = 0x00000004      # `touch`: the contract allows a bare mtime as progress


class FirstStep:
    """Calls `on_step(step or None)` once, at the first write to `path` after arm()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: Path, on_step: Callable[[int | None], None]):
        self.loop = loop
        self.path = path
        self.on_step = on_step
        self._watcher: EventsWatcher | None = None
        self._wd: int | None = None

    def arm(self) -> bool:
        """Start watching; False (and nothing recorded later) when inotify cannot."""
        try:
            self._watcher = EventsWatcher.of(self.loop)
            self._wd = self._watcher.watch(self.path, self._fired, _IN_MODIFY | _IN_ATTRIB)
        except (CgroupError, OSError) as e:
            log.debug("no first-step watch on %s: %s", self.path, e)
            self._watcher = self._wd = None
            return False
        return True

    def cancel(self) -> None:
        if self._watcher is not None and self._wd is not None:
            self._watcher.unwatch(self._wd, self._fired)
        self._watcher = self._wd = None

    def _fired(self) -> None:
        if self._wd is None:
            return
        self.cancel()
        try:
            # O_NOFOLLOW|O_NONBLOCK: the job owns the file; never a link, never a fifo wait.
            # not a job path: the job's heartbeat file (O_NOFOLLOW|O_NONBLOCK, never a wait)
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                step = parse_heartbeat(os.read(fd, HEARTBEAT_READ))
            finally:
                os.close(fd)
        except OSError:
            step = None
        self.on_step(step)
