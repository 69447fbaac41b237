"""Backoff overflow and the start-rate limit, as tables (no processes, no sleeps).

Regressions: `restart.backoff.factor: 1.0e+300` raised OverflowError on the third crash
(and the default factor 2 after 1025 crashes in a row), wedging the job in `running`; a
job exiting 0 at once under `policy: always` relaunched 939 times a second, forever.
"""

import math

import pytest
from trainsup.daemon.backoff import RestartTracker
from trainsup.spec import BackoffSpec, RestartSpec


def tracker(**kw) -> RestartTracker:
    b = kw.pop("backoff", {})
    return RestartTracker(RestartSpec(backoff=BackoffSpec(**b), **kw))


@pytest.mark.parametrize("initial,factor,mx,consecutive,expected", [
    (1.0, 1e300, 300.0, 3, 300.0),        # the overflowing factor of the report
    (1.0, 1e300, 300.0, 2, 300.0),
    (1.0, 2.0, 300.0, 1025, 300.0),       # the default factor after 1025 crashes
    (1.0, 2.0, 300.0, 10**9, 300.0),
    (1e-300, 1e300, 300.0, 2, 1.0),       # huge factor, tiny initial: exact below the cap
    (1.0, 2.0, math.inf, 1100, math.inf),
    (1.0, 2.0, 300.0, 9, 256.0),
    (1.0, 2.0, 300.0, 10, 300.0),
    (5.0, 2.0, 1.0, 1, 1.0),              # initial above max: max
    (0.0, 1e300, 300.0, 5, 0.0),
    (1.0, 1.0, 300.0, 10**6, 1.0),
])
def test_backoff_factor_overflow_never_raises(initial, factor, mx, consecutive, expected):
    got = tracker(backoff={"initial": initial, "factor": factor, "max": mx}).delay_for(consecutive)
    assert got == pytest.approx(expected)


def test_backoff_factor_1e300_crash_loop_goes_through_backoff():
    t = tracker(max_restarts=10**6, max_restarts_without_progress=10**6, start_limit_interval=0,
                backoff={"initial": 0.1, "factor": 1e300, "max": 2.0})
    delays = [t.on_exit(crashed=True, now=i * 10.0, ran_for=0.1).delay for i in range(1100)]
    assert delays[:3] == [0.1, 2.0, 2.0] and set(delays[2:]) == {2.0}


@pytest.mark.parametrize("burst,interval,initial,expect_launches", [
    (5, 60.0, 0.0, 5),       # no backoff at all: the start limit alone ends it
    (5, 60.0, 0.05, 5),      # with backoff the quick exits are spaced out, then fail
    (3, 60.0, 0.0, 3),
    (1, 60.0, 0.0, 1),
])
def test_exit_0_under_always_ends_failed(burst, interval, initial, expect_launches):
    t = tracker(policy="always", start_limit_burst=burst, start_limit_interval=interval,
                backoff={"initial": initial, "factor": 2.0, "max": 300.0})
    now, relaunches, d = 0.0, 0, None
    for _ in range(100):
        d = t.on_exit(crashed=False, now=now, ran_for=0.001)
        if not d.restart:
            break
        relaunches += 1
        now += d.delay + 0.001
    assert d is not None and not d.restart and d.final_state == "failed"
    assert "start_limit_burst" in d.why
    assert relaunches == expect_launches


def test_exit_0_under_always_backs_off_growing():
    t = tracker(policy="always", start_limit_burst=1000, backoff={"initial": 1.0, "factor": 2.0, "max": 300.0})
    assert [t.on_exit(crashed=False, now=i, ran_for=0.01).delay for i in range(4)] == [1, 2, 4, 8]


def test_exit_0_after_a_long_run_relaunches_at_once():
    t = tracker(policy="always", start_limit_interval=60.0)
    assert t.on_exit(crashed=False, now=0, ran_for=0.01).delay == 1.0
    d = t.on_exit(crashed=False, now=1000, ran_for=900)
    assert d.restart and d.delay == 0.0


@pytest.mark.parametrize("gap,expect_fail", [
    (1.0, True),     # 6 relaunches 1 s apart: over burst 5 in 60 s
    (13.0, False),   # 13 s apart: never more than 5 in any 60 s
])
def test_start_limit_counts_relaunches_within_the_interval(gap, expect_fail):
    t = tracker(max_restarts=100, max_restarts_without_progress=100,
                start_limit_burst=5, start_limit_interval=60.0, backoff={"initial": 0.0})
    ds = [t.on_exit(crashed=True, now=i * gap, ran_for=0.5) for i in range(6)]
    assert (not ds[-1].restart) is expect_fail
    assert all(d.restart for d in ds[:5])


def test_progress_forgives_recent_starts():
    t = tracker(max_restarts=100, max_restarts_without_progress=100, start_limit_burst=2,
                start_limit_interval=60.0, backoff={"initial": 0.0})
    assert t.on_exit(crashed=True, now=0, ran_for=0.5).restart
    assert t.on_exit(crashed=True, now=1, ran_for=0.5).restart
    t.progress()
    assert t.on_exit(crashed=True, now=2, ran_for=0.5).restart


def test_start_limit_interval_0_disables_the_limit():
    t = tracker(policy="always", start_limit_interval=0, backoff={"initial": 0.0})
    assert all(t.on_exit(crashed=False, now=i * 1e-3, ran_for=1e-3).restart for i in range(1000))
