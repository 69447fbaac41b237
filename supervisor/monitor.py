"""Per-attempt watchers of a running job: memory (OOM before the kernel's) and hang.

RSS growth and a silent heartbeat have no event to wait on, so these are timers, one
task per running attempt and only for jobs that configure `memory` or `hang`. The
decisions themselves are the pure functions in trainsup.notices.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Optional

from .notices import hang as hangmod
from .notices import memory as memmod

if TYPE_CHECKING:
    from .job import Job

log = logging.getLogger("trainsup.monitor")

@functools.lru_cache(maxsize=1)
def _own_memory_cgroup() -> tuple:
    return memmod.memory_cgroup_dir(os.getpid())


class AttemptMonitor:
    def __init__(self, job: "Job", pid: int):
        self.job = job
        self.pid = pid
        self.sampler = memmod.TreeSampler(pid)
        self.episode = memmod.MemoryEpisode()
        self.clock = hangmod.ProgressClock(time.monotonic())
        # A child just forked is in the daemon's own cgroup: resolve that once, not per
        # launch (parsing mountinfo sits on the restart path).
        self.cgroup, self.cg_version = _own_memory_cgroup()
        self.oom_before = self._oom_count()
        self.near_limit = False
        self._sampled_at = float("-inf")
        self.task: Optional[asyncio.Task] = None

    def _oom_count(self) -> Optional[int]:
        if self.cgroup is None:
            return None
        try:
            return memmod.read_memory_cgroup(self.cgroup, self.cg_version)[1]
        except OSError:
            return None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        spec = self.job.spec
        if spec.memory.limit or spec.memory.min_available or spec.hang.timeout:
            self.task = loop.create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def sample_rss(self, max_age: float = 0.0) -> int:
        now = time.monotonic()
        if max_age and now - self._sampled_at < max_age and self.job.memory_rss is not None:
            return self.job.memory_rss       # `status` on 200 jobs must not walk 200 trees
        self._sampled_at = now
        rss = self.sampler.sample()
        self.job.memory_rss = rss
        limit = self.job.spec.memory.limit
        self.near_limit = bool(limit and rss >= 0.95 * limit)
        return rss

    def oom_killed(self, exit_signal: Optional[str]) -> bool:
        # The kernel's OOM killer only ever sends SIGKILL; a rising count with any other
        # exit is another process of the same cgroup being killed.
        if exit_signal != "SIGKILL":
            return False
        return memmod.classify_oom(self.oom_before, self._oom_count(), signal.SIGKILL,
                                   near_limit=self.near_limit)

    async def _run(self) -> None:
        spec = self.job.spec
        mem_on = bool(spec.memory.limit or spec.memory.min_available)
        hang_timeout = spec.hang.timeout
        tick = spec.memory.interval if mem_on else max(0.05, min(1.0, hang_timeout / 10))
        if hang_timeout and mem_on:
            tick = min(tick, max(0.05, hang_timeout / 10))
        while True:
            await asyncio.sleep(tick)
            if mem_on:
                self._check_memory()
            if hang_timeout:
                self._check_hang(hang_timeout)

    def _check_memory(self) -> None:
        job = self.job
        rss = self.sample_rss()
        avail = memmod.read_mem_available() if job.spec.memory.min_available else None
        action, self.episode = memmod.memory_decision(self.episode, rss, avail, job.spec.memory)
        if action is None or not job.alive or job.busy:
            return
        job.event("memory", action=action, rss=rss, why=self.episode.reason)
        job.log.note(f"memory: {self.episode.reason}: {action}")
        if action == "save":
            job.request_save()
        else:
            job.stop(save=True, then_restart="oom", source="oom")

    def _check_hang(self, timeout: float) -> None:
        job = self.job
        now = time.monotonic()
        ck_dir = job.spec.checkpoint.dir if job.spec.checkpoint else None
        last = self.clock.observe(hangmod.progress_mtime(job.heartbeat_file, ck_dir), now)
        job.sigstopped = hangmod.is_stopped(self.pid)
        if job.busy or not job.alive:
            return
        if hangmod.hang_decision(now, last, timeout):
            job.event("hang", silent_s=round(now - last, 1), timeout=timeout)
            job.log.note(f"no heartbeat or checkpoint for {now - last:.0f}s: saving, then restarting")
            job.stop(save=True, then_restart="hang", source="hang")
