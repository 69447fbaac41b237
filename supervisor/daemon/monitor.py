"""Per-attempt watchers of a running job: memory (OOM before the kernel's) and hang.

RSS growth and a silent heartbeat have no event to wait on, so these are timers, one
task per running attempt and only for jobs that configure `memory` or `hang`. The
decisions themselves are the pure functions in trainsup.notices; the monitor only reports
them (`on_decision`) and the Job applies them: nothing here touches a Job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ..spec import JobSpec
from .launch.cgroup import JobCgroup
from .notices import hang as hangmod
from .notices import memory as memmod

log = logging.getLogger("trainsup.monitor")

@functools.lru_cache(maxsize=1)
def _own_memory_cgroup() -> tuple:
    return memmod.memory_cgroup_dir(os.getpid())


# on_decision(kind, data): kind "memory" (data: action save|stop, rss, why) or "hang"
# (data: silent_s, timeout).
Decide = Callable[[str, dict], None]


class AttemptMonitor:
    def __init__(self, spec: JobSpec, pid: int, heartbeat_file: Path, on_decision: Decide,
                 job_cgroup: JobCgroup | None = None):
        self.spec = spec
        self.pid = pid
        self.heartbeat_file = heartbeat_file
        self.on_decision = on_decision
        self.rss: int | None = None
        self.sigstopped = False
        self.episode = memmod.MemoryEpisode()
        self.clock = hangmod.ProgressClock(time.monotonic())
        self.job_cgroup = job_cgroup if job_cgroup is not None and job_cgroup.counts_memory else None
        self.sampler: memmod.TreeSampler | memmod.CgroupSampler
        if self.job_cgroup is not None:
            # The launch's own cgroup: its counters, and a fresh cgroup has had no OOM kill.
            self.sampler = memmod.CgroupSampler(self.job_cgroup)
            self.cgroup, self.cg_version = None, None
            self.oom_before: int | None = 0
        else:
            self.sampler = memmod.TreeSampler(pid)
            # Without one, the daemon's own memory cgroup: resolved once, not per launch
            # (parsing mountinfo sits on the restart path).
            self.cgroup, self.cg_version = _own_memory_cgroup()
            self.oom_before = self._oom_count()
        self.near_limit = False
        self._sampled_at = float("-inf")
        self.task: asyncio.Task | None = None

    def _oom_count(self) -> int | None:
        if self.job_cgroup is not None:
            return self.job_cgroup.memory()[1]
        if self.cgroup is None or self.cg_version is None:
            return None
        try:
            return memmod.read_memory_cgroup(self.cgroup, self.cg_version)[1]
        except OSError:
            return None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        spec = self.spec
        if spec.memory.limit or spec.memory.min_available or spec.hang.timeout:
            self.task = loop.create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def sample_rss(self, max_age: float = 0.0) -> int:
        now = time.monotonic()
        if max_age and now - self._sampled_at < max_age and self.rss is not None:
            return self.rss       # `status` on 200 jobs must not walk 200 trees
        self._sampled_at = now
        rss = self.sampler.sample()
        self.rss = rss
        limit = self.spec.memory.limit
        self.near_limit = bool(limit and rss >= 0.95 * limit)
        return rss

    def oom_killed(self, exit_signal: str | None) -> bool:
        # The kernel's OOM killer only ever sends SIGKILL; a rising count with any other
        # exit is another process of the same cgroup being killed.
        if exit_signal != "SIGKILL":
            return False
        return memmod.classify_oom(self.oom_before, self._oom_count(), signal.SIGKILL,
                                   near_limit=self.near_limit)

    async def _run(self) -> None:
        spec = self.spec
        mem_on = bool(spec.memory.limit or spec.memory.min_available)
        hang_timeout = spec.hang.timeout
        tick = spec.memory.interval if mem_on else max(0.05, min(1.0, (hang_timeout or 1.0) / 10))
        if hang_timeout and mem_on:
            tick = min(tick, max(0.05, hang_timeout / 10))
        while True:
            await asyncio.sleep(tick)
            try:
                if mem_on:
                    self._check_memory()
                if hang_timeout:
                    self._check_hang(hang_timeout)
            except Exception:
                # A vanished /proc entry or a hostile cgroup file must not end monitoring.
                log.exception("pid %d: monitor check failed", self.pid)

    def _check_memory(self) -> None:
        rss = self.sample_rss()
        avail = memmod.read_mem_available() if self.spec.memory.min_available else None
        action, self.episode = memmod.memory_decision(self.episode, rss, avail, self.spec.memory)
        if action is not None:
            self.on_decision("memory", {"action": action, "rss": rss, "why": self.episode.reason})

    def _check_hang(self, timeout: float) -> None:
        now = time.monotonic()
        ck_dir = self.spec.checkpoint.dir if self.spec.checkpoint else None
        last = self.clock.observe(hangmod.progress_mtime(self.heartbeat_file, ck_dir), now)
        self.sigstopped = hangmod.is_stopped(self.pid)
        if hangmod.hang_decision(now, last, timeout):
            self.on_decision("hang", {"silent_s": round(now - last, 1), "timeout": timeout})
