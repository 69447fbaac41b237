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


# -- long work takes turns and can be cancelled -------------------------------------------

def _long_work(stop: threading.Event, seconds: float = 60.0, removing: bool = False) -> str:
    """What a 100 GiB validation looks like to the pool: a loop that ticks at every chunk
    (each 'chunk' here a millisecond's wait, as on a slow disk)."""
    from trainsup.checkpoint import budget
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        budget.tick(removing=removing)
        time.sleep(0.001)
    return "finished"


def _quick_latency(pool: FairPool, key: str) -> float:
    t = time.monotonic()
    assert pool.submit(key, lambda: "ok").result(timeout=60) == "ok"
    return time.monotonic() - t


def test_two_jobs_long_validations_do_not_delay_a_third_jobs_save_confirmation():
    """Two jobs each validating a huge checkpoint held both workers for as long as their
    reads took; a third job's 4 KiB save waited for them. Long work takes turns: the quick
    task runs within a slice or so, while both long ones are still under way."""
    pool = FairPool(workers=2)
    stop = threading.Event()
    try:
        floor = max(_quick_latency(pool, "b") for _ in range(5))
        longs = [pool.submit("a1", _long_work, stop), pool.submit("a2", _long_work, stop)]
        wait_for_busy(pool, 2)
        took = [_quick_latency(pool, "b") for _ in range(5)]
        assert not any(f.done() for f in longs), "the long work ended: the test proved nothing"
        assert max(took) < floor + 5.0, f"b waited {max(took):.2f}s (floor {floor:.3f}s)"
        assert pool.parks > 0
    finally:
        stop.set()
        pool.shutdown(wait=True, timeout=30)
    assert [f.result(timeout=5) for f in longs] == ["finished", "finished"]


def wait_for_busy(pool: FairPool, n: int) -> None:
    from conftest import wait_for
    wait_for(lambda: pool.busy() >= n, 30, f"{n} tasks under way")


def test_cancelled_work_stops_at_its_next_tick():
    """A removed job's validation stops at once instead of holding a worker to its end."""
    from trainsup.checkpoint import budget
    pool = FairPool(workers=2)
    stop = threading.Event()
    try:
        ex = pool.for_job("a")
        fut = ex.submit(_long_work, stop)
        queued = ex.submit(_long_work, stop)          # per_job 1: waits in a's queue
        other = pool.submit("b", _long_work, stop)
        wait_for_busy(pool, 2)
        assert ex.cancel("the job was removed") == 1
        with pytest.raises(budget.Cancelled, match="the job was removed"):
            fut.result(timeout=30)
        assert queued.cancelled()
        assert not other.done()                         # another job's work goes on
        wait_for_busy_le(pool, 1)
    finally:
        stop.set()
        pool.shutdown(wait=True, timeout=30)


def wait_for_busy_le(pool: FairPool, n: int) -> None:
    from conftest import wait_for
    wait_for(lambda: pool.busy() <= n, 30, f"at most {n} tasks under way")


def test_a_job_of_the_same_name_keeps_its_work_when_the_replaced_one_is_cancelled():
    pool = FairPool(workers=2)
    stop = threading.Event()
    try:
        old, new = pool.for_job("j"), pool.for_job("j")
        f_new = new.submit(_long_work, stop)
        wait_for_busy(pool, 1)
        assert old.cancel("replaced") == 0
        stop.set()
        assert f_new.result(timeout=30) == "finished"
    finally:
        stop.set()
        pool.shutdown(wait=True, timeout=30)


def test_work_parked_for_its_turn_is_cancelled_too():
    from trainsup.checkpoint import budget
    pool = FairPool(workers=1, per_job=1)
    stop = threading.Event()
    try:
        a, b = pool.for_job("a"), pool.for_job("b")
        fa, fb = a.submit(_long_work, stop), b.submit(_long_work, stop)
        wait_for_busy(pool, 2)                   # one runs, one is parked: they take turns
        assert a.cancel("removed") == 1
        with pytest.raises(budget.Cancelled):
            fa.result(timeout=30)
        assert not fb.done()
    finally:
        stop.set()
        pool.shutdown(wait=True, timeout=30)


def test_shutdown_ends_started_work_and_joins_every_thread():
    """The daemon stops: nothing keeps hashing (found: still alive 40 s after SIGTERM)."""
    from trainsup.checkpoint import budget
    pool = FairPool(workers=2)
    stop = threading.Event()
    futs = [pool.submit(k, _long_work, stop) for k in ("a1", "a2", "a3")]
    wait_for_busy(pool, 3)
    still = pool.shutdown(wait=True, timeout=30)
    stop.set()
    assert still == []
    for f in futs:
        with pytest.raises(budget.Cancelled, match="the daemon stops"):
            f.result(timeout=5)


def test_a_deletion_under_way_is_ended_by_the_stop_only():
    """A removed job's entry half emptied would stay in the trash: its deletion finishes;
    the daemon's stop ends it (the trash is emptied at the next start)."""
    from trainsup.checkpoint import budget
    pool = FairPool(workers=2)
    stop = threading.Event()
    ex = pool.for_job("a")
    fut = ex.submit(_long_work, stop, 60.0, True)
    wait_for_busy(pool, 1)
    ex.cancel("the job was removed")
    time.sleep(0.2)         # several ticks: it would have raised at the first
    assert not fut.done()
    assert pool.shutdown(wait=True, timeout=30) == []
    stop.set()
    with pytest.raises(budget.Cancelled):
        fut.result(timeout=5)


def test_threads_stay_bounded_however_many_jobs_wait():
    pool = FairPool(workers=2, max_threads=4)
    stop = threading.Event()
    try:
        futs = [pool.submit(f"j{k}", _long_work, stop) for k in range(12)]
        wait_for_busy(pool, 4)
        time.sleep(0.3)
        assert len(pool._threads) <= 4
        assert pool.busy() <= 4
        stop.set()
        assert all(f.result(timeout=30) == "finished" for f in futs)
    finally:
        stop.set()
        pool.shutdown(wait=True, timeout=30)


def test_every_job_with_long_work_gets_its_turns():
    """Three jobs' long work on two workers: each advances (found in the daemon: all three
    parked at once, two slots free and no thread left to hand them out)."""
    from trainsup.checkpoint import budget
    pool = FairPool(workers=2, slice_s=0.01)
    stop = threading.Event()
    ticks = {k: 0 for k in ("a", "b", "c")}

    def counting(k: str) -> None:
        while not stop.is_set():
            budget.tick()
            ticks[k] += 1
            time.sleep(0.001)

    try:
        futs = [pool.submit(k, counting, k) for k in ticks]
        from conftest import wait_for
        wait_for(lambda: all(n > 50 for n in ticks.values()), 30, f"every job's work advancing: {ticks}")
        before = dict(ticks)
        wait_for(lambda: all(ticks[k] > before[k] + 50 for k in ticks), 30, f"and going on advancing: {ticks}")
        assert pool.parks > 0
        stop.set()
        assert all(f.exception(timeout=30) is None for f in futs)
    finally:
        stop.set()
        pool.shutdown(wait=True, timeout=30)
