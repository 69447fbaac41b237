"""Restart policy as a table: facts in, decisions out (no processes, no sleeps)."""

import pytest
from trainsup.daemon.backoff import RestartTracker
from trainsup.spec import BackoffSpec, RestartSpec


def spec(**kw):
    b = kw.pop("backoff", {})
    return RestartSpec(backoff=BackoffSpec(**b), **kw)


@pytest.mark.parametrize("initial,factor,mx,expected", [
    (1.0, 2.0, 300.0, [1, 2, 4, 8, 16]),
    (1.0, 2.0, 5.0, [1, 2, 4, 5, 5]),
    (0.5, 1.0, 10.0, [0.5] * 5),
    (0.0, 2.0, 10.0, [0, 0, 0, 0, 0]),
])
def test_delay_grows_per_consecutive_crash(initial, factor, mx, expected):
    t = RestartTracker(spec(max_restarts=100, max_restarts_without_progress=100,
                            backoff=dict(initial=initial, factor=factor, max=mx)))
    got = [t.on_exit(crashed=True, now=i, ran_for=1).delay for i in range(5)]
    assert got == expected


def test_progress_resets_backoff_and_no_progress_count():
    t = RestartTracker(spec(max_restarts=100, max_restarts_without_progress=3))
    assert [t.on_exit(crashed=True, now=i, ran_for=1).delay for i in range(2)] == [1, 2]
    t.progress()
    d = t.on_exit(crashed=True, now=3, ran_for=1)
    assert d.restart and d.delay == 1


def test_a_run_as_long_as_the_window_resets_backoff():
    t = RestartTracker(spec(window=60, max_restarts=100))
    t.on_exit(crashed=True, now=0, ran_for=1)
    t.on_exit(crashed=True, now=1, ran_for=1)
    d = t.on_exit(crashed=True, now=100, ran_for=60)
    assert d.delay == 1


@pytest.mark.parametrize("policy,crashed,restart,final", [
    ("on-failure", False, False, "finished"),
    ("on-failure", True, True, None),
    ("always", False, True, None),
    ("always", True, True, None),
    ("never", True, False, "failed"),
    ("never", False, False, "finished"),
])
def test_policy_table(policy, crashed, restart, final):
    d = RestartTracker(spec(policy=policy)).on_exit(crashed=crashed, now=0, ran_for=1)
    assert d.restart is restart and d.final_state == final


def test_max_restarts_within_window_then_failed():
    t = RestartTracker(spec(max_restarts=3, window=10, max_restarts_without_progress=100))
    ds = [t.on_exit(crashed=True, now=i, ran_for=0.1) for i in range(4)]
    assert [d.restart for d in ds] == [True, True, True, False]
    assert ds[-1].final_state == "failed" and "max_restarts 3" in ds[-1].why


def test_crashes_outside_the_window_do_not_count():
    t = RestartTracker(spec(max_restarts=2, window=10, max_restarts_without_progress=100,
                            start_limit_interval=0))
    ds = [t.on_exit(crashed=True, now=i * 11, ran_for=0.1) for i in range(6)]
    assert all(d.restart for d in ds)


def test_without_progress_limit():
    t = RestartTracker(spec(max_restarts=100, max_restarts_without_progress=2))
    ds = [t.on_exit(crashed=True, now=i, ran_for=0.1) for i in range(2)]
    assert [d.restart for d in ds] == [True, False]
    assert "without a new valid checkpoint" in ds[-1].why
