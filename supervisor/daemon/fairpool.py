"""The worker threads every job's checkpoint work shares, taken fairly.

Scans, hashes, re-proofs and deletions of a job's checkpoints run off the loop on a few
threads. With one shared FIFO queue, a job with a lot of slow work (found: a 100,000-file
entry, a 3000-deep tree, a dir swapped every 20 ms) queued every other user's scans
behind its own: their saves were confirmed late and their quota not applied. Here each job
has its own queue; free workers take the jobs in turn (round-robin), and one job runs at
most `per_job` tasks at once (all workers but one by default): whatever one job submits,
a worker stays free for the others.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_Task = tuple[Future, Callable[..., Any], tuple, dict]


class FairPool:
    def __init__(self, workers: int = 2, per_job: int | None = None,
                 initializer: Callable[[], None] | None = None, name: str = "trainsup-work"):
        self.per_job = per_job if per_job is not None else max(1, workers - 1)
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque[_Task]] = OrderedDict()
        self._running: dict[str, int] = {}
        self._stopping = False
        self._initializer = initializer
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{k}", daemon=True)
                         for k in range(workers)]
        for t in self._threads:
            t.start()

    def for_job(self, key: str) -> JobExecutor:
        return JobExecutor(self, key)

    def submit(self, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queues.setdefault(key, deque()).append((fut, fn, args, kwargs))
            self._cond.notify()
        return fut

    def pending(self, key: str) -> int:
        with self._cond:
            return len(self._queues.get(key, ()))

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        with self._cond:
            self._stopping = True
            if cancel_futures:
                for q in self._queues.values():
                    for fut, *_ in q:
                        fut.cancel()
                self._queues.clear()
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join()

    # -- workers ------------------------------------------------------------------
    def _take(self) -> tuple[str, _Task] | None:
        # caller holds the condition: the first job in turn with work and a slot free
        for key in list(self._queues):
            q = self._queues[key]
            if not q:
                del self._queues[key]
                continue
            if self._running.get(key, 0) >= self.per_job:
                continue
            task = q.popleft()
            self._queues.move_to_end(key)       # the others come first next time
            if not q:
                del self._queues[key]
            self._running[key] = self._running.get(key, 0) + 1
            return key, task
        return None

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            with self._cond:
                while True:
                    got = self._take()
                    if got is not None or (self._stopping and not self._queues):
                        break
                    self._cond.wait()
            if got is None:
                return
            key, (fut, fn, args, kwargs) = got
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args, **kwargs))
                    except BaseException as e:       # handed to whoever awaits it
                        fut.set_exception(e)
            finally:
                with self._cond:
                    n = self._running.get(key, 1) - 1
                    if n:
                        self._running[key] = n
                    else:
                        self._running.pop(key, None)
                    self._cond.notify_all()


class JobExecutor(Executor):
    """One job's door to the FairPool (what loop.run_in_executor takes)."""

    def __init__(self, pool: FairPool, key: str):
        self.pool = pool
        self.key = key

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        return self.pool.submit(self.key, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass        # the pool is the daemon's, shut down once
