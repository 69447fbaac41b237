"""JobSchedule on a real APScheduler BackgroundScheduler."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest
from conftest import deadline_for
from trainsup.daemon.notices.schedule import JobSchedule, parse_cron, triggers_for
from trainsup.spec import ScheduleSpec


class Fires:
    def __init__(self):
        self.cond = threading.Condition()
        self.calls = []

    def __call__(self, name, what):
        with self.cond:
            self.calls.append((name, what, threading.current_thread().name))
            self.cond.notify_all()

    def wait(self, n, timeout=5.0):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.calls) >= n, deadline_for(timeout)), self.calls


@pytest.fixture
def sched():
    fires = Fires()
    s = JobSchedule(fires)
    s.start()
    yield s, fires
    s.stop()


def test_checkpoint_every_fires_repeatedly(sched):
    s, fires = sched
    s.set_job("mlp", ScheduleSpec(checkpoint_every=0.2))
    fires.wait(2, timeout=3.0)
    assert {c[:2] for c in fires.calls} == {("mlp", "checkpoint")}
    assert all(c[2] != threading.main_thread().name for c in fires.calls)


def test_cron_triggers_are_parsed_in_utc(sched):
    s, _ = sched
    s.set_job("big", ScheduleSpec(checkpoint_cron="0 * * * *", preempt_cron="30 2 * * *"))
    nxt = s.next_fire_times("big")
    assert set(nxt) == {"checkpoint_cron", "preempt_cron"}
    hourly, nightly = nxt["checkpoint_cron"], nxt["preempt_cron"]
    assert hourly.utcoffset().total_seconds() == 0
    assert (hourly.minute, hourly.second) == (0, 0)
    assert (nightly.hour, nightly.minute) == (2, 30)
    assert hourly > datetime.now(timezone.utc)


def test_set_job_replaces_and_remove_job_stops_fires(sched):
    s, fires = sched
    s.set_job("a", ScheduleSpec(checkpoint_every=0.1, preempt_cron="0 0 1 1 *"))
    s.set_job("b", ScheduleSpec(checkpoint_every=3600))
    s.set_job("a", ScheduleSpec(checkpoint_every=0.1))          # replaces a's triggers
    assert set(s.next_fire_times("a")) == {"checkpoint_every"}
    fires.wait(1)
    s.remove_job("a")
    n = len(fires.calls)
    time.sleep(0.5)   # settle window: five intervals in which nothing may fire
    assert len(fires.calls) == n
    assert s.next_fire_times("a") == {} and set(s.next_fire_times("b")) == {"checkpoint_every"}


def test_bad_cron_is_one_line_and_keeps_the_old_triggers(sched):
    s, _ = sched
    s.set_job("j", ScheduleSpec(checkpoint_every=60))
    with pytest.raises(ValueError, match=r"bad cron expression '61 \* \* \* \*'"):
        s.set_job("j", ScheduleSpec(checkpoint_cron="61 * * * *"))
    assert set(s.next_fire_times("j")) == {"checkpoint_every"}
    with pytest.raises(ValueError):
        parse_cron("every tuesday")


def test_triggers_for_only_the_keys_that_are_set():
    assert triggers_for(ScheduleSpec()) == {}
    assert set(triggers_for(ScheduleSpec(checkpoint_every=30, preempt_cron="0 2 * * *"))) == \
        {"checkpoint_every", "preempt_cron"}
    with pytest.raises(ValueError):
        triggers_for(ScheduleSpec(checkpoint_every=0))
