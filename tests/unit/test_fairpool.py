"""The workers every job's checkpoint work shares: one job's slow work never holds another's."""

from __future__ import annotations

import threading
import time

import pytest
from trainsup.daemon.fairpool import FairPool


@pytest.fixture
def pool():
    p = FairPool(workers=2)
    yield p
    p.shutdown(wait=False)


def test_one_jobs_slow_work_leaves_a_worker_for_another_job(pool):
    """Found: a job's scans of a 100,000-file entry and deletions of a 3000-deep tree held
    both shared workers; another user's saves waited seconds to be confirmed."""
    release = threading.Event()
    slow = [pool.submit("a", release.wait, 30) for _ in range(5)]
    t = time.monotonic()
    quick = pool.submit("b", lambda: "b done")
    assert quick.result(timeout=10) == "b done"
    assert time.monotonic() - t < 5
    assert not any(f.done() for f in slow)
    release.set()
    assert all(f.result(timeout=10) for f in slow)


def test_jobs_are_taken_in_turn(pool):
    gate = threading.Event()
    order: list[str] = []
    lock = threading.Lock()

    def note(k: str) -> None:
        gate.wait(10)
        with lock:
            order.append(k)

    # both workers busy first, then a queue of a's work with b's last
    blockers = [pool.submit("x", gate.wait, 10), pool.submit("y", gate.wait, 10)]
    fa = [pool.submit("a", note, "a") for _ in range(4)]
    fb = pool.submit("b", note, "b")
    gate.set()
    for f in [*blockers, *fa, fb]:
        f.result(timeout=10)
    assert order.index("b") <= 1, order       # b is not behind all of a's work


def test_a_failing_task_is_its_futures_only(pool):
    def boom():
        raise ValueError("hostile entry")
    f = pool.submit("a", boom)
    with pytest.raises(ValueError):
        f.result(timeout=5)
    assert pool.submit("a", lambda: 1).result(timeout=5) == 1


def test_job_executor_is_what_run_in_executor_takes(pool):
    import asyncio

    async def main():
        return await asyncio.get_running_loop().run_in_executor(pool.for_job("j"), sum, [1, 2, 3])
    assert asyncio.run(main()) == 6
