"""The mirror's own threads. Uploads, downloads and lease calls wait on the network for
seconds to minutes: never on the daemon's loop, and never on the shared 2-thread pool
that validates checkpoints (a slow store must not starve every job's save confirmation).

Work is queued per job (bounded) and taken round-robin across jobs, so one job with ten
large checkpoints never holds every thread while another job's emergency save waits;
urgent work (an emergency upload, a lease renewal) goes first, and one thread takes only
urgent work. Results go back to the loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("trainsup.mirror")

PER_JOB_QUEUE = 16


class QueueFull(Exception):
    pass


class Transfers:
    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int = 3) -> None:
        self.loop = loop
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque] = {}
        self._urgent: dict[str, collections.deque] = {}
        self._turn: collections.deque[str] = collections.deque()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, args=(i == 0,), daemon=True,
                                          name=f"trainsup-mirror-{i}") for i in range(max(2, threads))]
        for t in self._threads:
            t.start()

    def run(self, job: str, fn: Callable[[], Any], *, urgent: bool = False) -> asyncio.Future:
        """fn() on a mirror thread; the future (on the loop) gets its result or exception."""
        fut = self.loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("mirror transfers closed")
            queues = self._urgent if urgent else self._queues
            q = queues.setdefault(job, collections.deque())
            if len(q) >= PER_JOB_QUEUE:
                raise QueueFull(f"job {job}: {len(q)} mirror tasks queued")
            q.append((fn, fut))
            if job not in self._turn:
                self._turn.append(job)
            self._cond.notify_all()
        return fut

    def _take(self, urgent_only: bool) -> tuple[Callable[[], Any], asyncio.Future] | None:
        # Round-robin over jobs: the first job in turn that has work gives one task and
        # goes to the back of the line.
        for queues in ((self._urgent,) if urgent_only else (self._urgent, self._queues)):
            for _ in range(len(self._turn)):
                job = self._turn[0]
                self._turn.rotate(-1)
                q = queues.get(job)
                if q:
                    item = q.popleft()
                    if not q:
                        del queues[job]
                    return item
        return None

    def _work(self, urgent_only: bool) -> None:
        while True:
            with self._cond:
                item = self._take(urgent_only)
                while item is None:
                    if self._closed:
                        return
                    self._cond.wait()
                    item = self._take(urgent_only)
                self._turn = collections.deque(j for j in self._turn if j in self._queues or j in self._urgent)
            fn, fut = item
            try:
                result, error = fn(), None
            except BaseException as e:      # handed to the loop; a thread never dies of a task
                result, error = None, e
            try:
                self.loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:
                return          # the loop closed during shutdown

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for queues in (self._queues, self._urgent):
                for q in queues.values():
                    for _, fut in q:
                        self.loop.call_soon_threadsafe(fut.cancel)
                queues.clear()
            self._cond.notify_all()


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
