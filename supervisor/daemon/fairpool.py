"""The worker threads every job's checkpoint work shares, taken fairly, in turns.

Scans, hashes, re-proofs and deletions of a job's checkpoints run off the loop on a few
threads. With one shared FIFO queue, a job with a lot of slow work (found: a 100,000-file
entry, a 3000-deep tree, a dir swapped every 20 ms) queued every other user's scans
behind its own: their saves were confirmed late and their quota not applied. Here each job
has its own queue; free workers take the jobs in turn (round-robin), and one job has at
most `per_job` tasks under way at once (all workers but one by default).

That alone leaves a worker to the others only while one job is slow. Two jobs each
validating a 100 GiB checkpoint (a slow disk, a network file system) held both workers
for as long as the reads took, and a third job's 4 KiB save waited for them. So long work
takes turns: at every tick of its loop (budget.tick: each chunk hashed, each 256 names
listed) a task that has run for `slice_s` while another job waits hands its worker slot
back and queues its continuation first in its own job's queue; the thread parks until its
job's turn comes round again. At most `workers` tasks run at any instant; parked ones
only wait (a thread each, at most `max_threads` in all: past that nothing parks).

And long work can be cancelled: `cancel(owner)` (a job removed) and `shutdown()` (the
daemon stops) fail queued tasks at once and make each started one raise budget.Cancelled
at its next tick: nothing keeps hashing a checkpoint no one will read the verdict of.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from ..checkpoint import budget

log = logging.getLogger("trainsup.pool")

# How long a task runs before it lets another job's waiting work go first: a save's
# confirmation waits at most about this per job with long work under way.
# TRAINSUP_POOL_SLICE_S=inf: no turns (as before them; the bench compares both).
SLICE_S = float(os.environ.get("TRAINSUP_POOL_SLICE_S", "0.05"))


class _Run:
    """One task: its cancellation, and where it stands for the turns."""

    __slots__ = ("key", "owner", "fut", "fn", "args", "kwargs", "cancelled", "stopping", "turn_began",
                 "holds_slot", "granted", "began")

    def __init__(self, key: str, owner: object, fut: Future, fn: Callable[..., Any], args: tuple, kwargs: dict):
        self.key, self.owner, self.fut, self.fn, self.args, self.kwargs = key, owner, fut, fn, args, kwargs
        self.cancelled: str | None = None      # why, once cancelled
        self.stopping = False                  # the daemon stops: deletions under way end too
        self.turn_began = 0.0
        self.began = 0.0
        self.holds_slot = False
        self.granted = False                   # parked: its turn came (a slot is its own)


class _Parked:
    """A started task's continuation, waiting in its job's queue for a turn."""

    __slots__ = ("run",)

    def __init__(self, run: _Run):
        self.run = run


class FairPool:
    def __init__(self, workers: int = 2, per_job: int | None = None,
                 initializer: Callable[[], None] | None = None, name: str = "trainsup-work",
                 slice_s: float = SLICE_S, max_threads: int | None = None):
        self.workers = workers
        self.per_job = per_job if per_job is not None else max(1, workers - 1)
        self.slice_s = slice_s
        self.max_threads = max_threads if max_threads is not None else 4 * workers
        self.name = name
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque[_Run | _Parked]] = OrderedDict()
        self._started: dict[str, int] = {}      # a job's tasks under way, running or parked
        self._live: set[_Run] = set()           # every started task (cancel reaches them)
        self._free = workers                    # slots: tasks that may run at this instant
        self._idle = 0                          # threads waiting for a task
        self._stopping = False
        self._initializer = initializer
        self._threads: list[threading.Thread] = []
        self.parks = 0                          # turns handed back (tests and benches read it)
        with self._cond:
            for _ in range(workers):
                self._spawn()

    def for_job(self, key: str) -> JobExecutor:
        return JobExecutor(self, key)

    def submit(self, key: str, fn: Callable[..., Any], *args: Any, owner: object = None, **kwargs: Any) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queues.setdefault(key, deque()).append(_Run(key, owner, fut, fn, args, kwargs))
            self._cond.notify_all()
        return fut

    def pending(self, key: str) -> int:
        with self._cond:
            return sum(1 for it in self._queues.get(key, ()) if isinstance(it, _Run))

    def busy(self) -> int:
        """Tasks under way (running or parked)."""
        with self._cond:
            return len(self._live)

    def cancel(self, owner: object, why: str) -> int:
        """The work submitted by `owner` is no longer wanted: queued tasks are cancelled,
        started ones raise budget.Cancelled(why) at their next tick. How many were started."""
        with self._cond:
            for key in list(self._queues):
                q = self._queues[key]
                for it in [it for it in q if isinstance(it, _Run) and it.owner is owner and owner is not None]:
                    q.remove(it)
                    it.fut.cancel()
                if not q:
                    del self._queues[key]
            hit = [r for r in self._live if r.owner is owner and owner is not None]
            for r in hit:
                r.cancelled = r.cancelled or why
            self._cond.notify_all()
            return len(hit)

    def shutdown(self, wait: bool = False, cancel_futures: bool = True, timeout: float | None = None) -> list[str]:
        """Stop taking work; started tasks are cancelled at their next tick. With wait, the
        threads are joined (within `timeout` in all): returns the names of threads still
        busy after it."""
        with self._cond:
            self._stopping = True
            if cancel_futures:
                for q in self._queues.values():
                    for it in q:
                        if isinstance(it, _Run):
                            it.fut.cancel()
                self._queues = OrderedDict((k, deque(it for it in q if isinstance(it, _Parked)))
                                           for k, q in self._queues.items())
                self._queues = OrderedDict((k, q) for k, q in self._queues.items() if q)
                for r in self._live:
                    r.cancelled = r.cancelled or "the daemon stops"
                    r.stopping = True
            self._cond.notify_all()
            threads = list(self._threads)
        if not wait:
            return []
        end = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return [t.name for t in threads if t.is_alive()]

    # -- under the condition ----------------------------------------------------------
    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
        self._threads.append(t)
        t.start()

    def _next(self, exclude: str | None = None) -> tuple[str, _Run | _Parked] | None:
        """The head of the first job in turn that could go now (no slot needed to look)."""
        for key in list(self._queues):
            q = self._queues[key]
            if not q:
                del self._queues[key]
                continue
            if key == exclude:
                continue
            head = q[0]
            if isinstance(head, _Parked) or self._started.get(key, 0) < self.per_job:
                return key, head
        return None

    def _take(self) -> _Run | None:
        """With a slot free: parked continuations whose turn it is are granted their slot;
        the first new task in turn is returned for this thread to run."""
        while self._free > 0:
            got = self._next()
            if got is None:
                return None
            key, head = got
            self._queues[key].popleft()
            self._queues.move_to_end(key)      # the others come first next time
            self._free -= 1
            if isinstance(head, _Parked):
                head.run.granted = True
                self._cond.notify_all()
                continue
            if not head.fut.set_running_or_notify_cancel():
                self._free += 1
                continue
            self._started[key] = self._started.get(key, 0) + 1
            self._live.add(head)
            head.holds_slot = True
            return head
        return None

    def _grant_parked(self) -> None:
        """Slots freed: the parked continuations whose turn it is take them (their threads
        only wait; no idle worker is needed to run them)."""
        while self._free > 0:
            got = self._next()
            if got is None:
                return
            key, head = got
            if not isinstance(head, _Parked):
                return
            self._queues[key].popleft()
            self._queues.move_to_end(key)
            self._free -= 1
            head.run.granted = True
            self._cond.notify_all()

    def _others_wait(self, key: str) -> bool:
        """Whether another job has work that would run if this task handed its slot back."""
        got = self._next(exclude=key)
        if got is None:
            return False
        if isinstance(got[1], _Parked):
            return True
        if self._idle > 0:
            return True
        if len(self._threads) < self.max_threads:
            self._spawn()
            return True
        return False

    # -- in the worker threads --------------------------------------------------------
    def _pace(self, run: _Run, removing: bool = False) -> None:
        """At every tick of a task: raise Cancelled once it is cancelled (a deletion under
        way: only when the daemon stops); past its slice, while another job waits, park
        until this job's turn comes round again."""
        if run.cancelled and (run.stopping or not removing):
            raise budget.Cancelled(run.cancelled)
        if time.monotonic() - run.turn_began < self.slice_s:
            return
        with self._cond:
            if run.cancelled or self._stopping or not self._others_wait(run.key):
                run.turn_began = time.monotonic()
                return
            q = self._queues.setdefault(run.key, deque())
            q.appendleft(_Parked(run))
            self._queues.move_to_end(run.key)      # this job just had its turn
            run.holds_slot = False
            run.granted = False
            self._free += 1
            self.parks += 1
            self._grant_parked()
            self._cond.notify_all()
            while not run.granted and not (run.cancelled and (run.stopping or not removing)):
                self._cond.wait()
            if not run.granted:        # cancelled while parked: out of the queue, no slot
                q = self._queues.get(run.key)
                if q is not None:
                    for it in q:
                        if isinstance(it, _Parked) and it.run is run:
                            q.remove(it)
                            break
                    if not q:
                        del self._queues[run.key]
                raise budget.Cancelled(run.cancelled)
            run.holds_slot = True
            run.granted = False
            run.turn_began = time.monotonic()

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            with self._cond:
                self._idle += 1
                try:
                    while True:
                        run = self._take()
                        if run is not None or (self._stopping and not self._queues):
                            break
                        self._cond.wait()
                finally:
                    self._idle -= 1
            if run is None:
                return
            run.began = run.turn_began = time.monotonic()
            try:
                def pace(removing: bool, run: _Run = run) -> None:
                    self._pace(run, removing)
                with budget.paced(pace):
                    try:
                        run.fut.set_result(run.fn(*run.args, **run.kwargs))
                    except budget.Cancelled as e:
                        log.info("job %s: checkpoint work cancelled after %.1fs (%s)",
                                 run.key or "(rotation)", time.monotonic() - run.began, e)
                        run.fut.set_exception(e)
                    except BaseException as e:       # handed to whoever awaits it
                        run.fut.set_exception(e)
            finally:
                with self._cond:
                    n = self._started.get(run.key, 1) - 1
                    if n:
                        self._started[run.key] = n
                    else:
                        self._started.pop(run.key, None)
                    self._live.discard(run)
                    if run.holds_slot:
                        self._free += 1
                    self._grant_parked()
                    self._cond.notify_all()


class JobExecutor(Executor):
    """One job's door to the FairPool (what loop.run_in_executor takes). Its tasks are its
    own: cancel() reaches them, not those of a job of the same name that replaced it."""

    def __init__(self, pool: FairPool, key: str):
        self.pool = pool
        self.key = key

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        return self.pool.submit(self.key, fn, *args, owner=self, **kwargs)

    def cancel(self, why: str) -> int:
        return self.pool.cancel(self, why)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass        # the pool is the daemon's, shut down once
